"""Model code in torch (llama.py, bert.py, vision/ for the vision-language models; layers.py,
linear.py), the architecture registry, and weight loading (loader.py; gguf.py converts .gguf
files). The server must not import this package."""
