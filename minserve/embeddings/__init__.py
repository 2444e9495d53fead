"""Embeddings: /v1/embeddings and LLM.embed. models (which models, where their files are, task
detection) -> embedder (tokenize, batch, forward, pool) -> service (one worker thread, coalescing
concurrent requests) -> routes (the HTTP handler) with protocol (request/response bodies) and
pooling (mean/cls/last, normalize, Matryoshka dimensions). protocol, routes and models never
import torch, so the server imports them freely."""
