"""Multi-LoRA serving: PEFT adapters read and checked (adapter.py), the LoRA delta added to the
model's linear layers for a batch that mixes adapters (layers.py), device slots and a CPU LRU of
loaded adapters (manager.py). Torch lives here; LoRARequest (request.py) is torch-free."""
