"""The /v1/embeddings route: parse the body, ask the App which embedding model answers (the
routing policy is server.py's), embed on app.embedding, send the response. No torch here."""
from __future__ import annotations

import time
from typing import Any

from minserve.embeddings.protocol import build_embeddings_response, parse_embeddings_request
from minserve.http import Http


async def embeddings(app: Any, http: Http) -> None:
    arrival = time.monotonic()
    req = parse_embeddings_request(await http.read_json())
    model = app.embedding_model(req.model)
    vectors, num_tokens = await app.embedding.embed(
        req.inputs, truncate_prompt_tokens=req.truncate_prompt_tokens, dimensions=req.dimensions)
    app.metrics.on_pooling_request(model, num_tokens, time.monotonic() - arrival)
    await http.send_json(200, build_embeddings_response(model, vectors, req.encoding_format,
                                                         num_tokens))


ROUTES = {"/v1/embeddings": {"POST": embeddings}}
