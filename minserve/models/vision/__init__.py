"""Vision-language models: per family a wrapper (llava.py, qwen2_vl.py, idefics3.py, on base.py)
beside its torch-free image processor (*_processor.py, on processor.py), over the towers (clip.py,
siglip.py, qwen_vit.py, on vit.py). Fetching and decoding images is minserve/multimodal's."""
