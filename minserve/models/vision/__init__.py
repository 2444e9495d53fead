"""Vision-language models: the towers (clip.py, siglip.py, qwen_vit.py, on vit.py's blocks), and
the wrappers that put their image embeddings into a Llama/Qwen2 language model (llava.py,
qwen2_vl.py, idefics3.py, on base.py). Image preprocessing is minserve/multimodal's (torch-free)."""
