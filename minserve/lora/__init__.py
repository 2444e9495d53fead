"""Multi-LoRA serving: PEFT adapters read and checked (adapter.py), each wrapped linear layer's
device slots (layers.py; the layer adds the delta of the step's LoRA mapping, which the runner
passes down with the model inputs), slot residency and a CPU LRU of loaded adapters (manager.py,
owned by the runner). Torch lives here; LoRARequest (request.py) is torch-free."""
