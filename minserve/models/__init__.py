"""Model code in torch (llama.py, bert.py, cross_encoder.py, vision/ for the vision-language
models; layers.py, linear.py), the architecture table (registry.py), and weight loading
(loader.py; gguf.py converts .gguf files). Torch-free, since the serving layer uses them:
registry.py (task detection) and the image processors (vision/*_processor.py)."""
