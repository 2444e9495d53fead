"""Vision-language models, per family a wrapper (llava.py, qwen2_vl.py, idefics3.py, on base.py)
and beside it its image processor (*_processor.py, on processor.py: numpy + Pillow, torch-free),
over the towers (clip.py, siglip.py, qwen_vit.py, on vit.py's blocks). Fetching and decoding
images is minserve/multimodal's."""
