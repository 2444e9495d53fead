"""Model code (llama.py, layers.py), the architecture registry, and weight loading (loader.py,
gguf.py). Imports torch; the server must not import this package."""
