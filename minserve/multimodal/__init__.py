"""Images for vision-language models, torch-free (the server imports it): fetching (fetch.py),
decoding (image.py), each model's preprocessing in numpy + Pillow and its placeholder tokens
(processor.py, llava.py, qwen2_vl.py, idefics3.py), and the prompt they make (inputs.py)."""
