"""Model code in torch (llama.py, bert.py; layers.py, linear.py), the architecture registry, and
weight loading (loader.py; gguf.py converts .gguf files). The server must not import this package."""
