"""The /v1/models routes: a card per model this server answers (the chat model and its LoRA
adapters, the embedding models, every pooled model with its status). Torch-free."""
from __future__ import annotations

from typing import Any

from minserve import pool_routes
from minserve.http import Http, model_not_found


def _model_card(app: Any, name: str) -> dict[str, Any]:
    if app.pool is not None and app.pool.has(name):
        return pool_routes.model_card(app, name)
    lora = app.lora_adapters.get(name)
    if lora is not None:   # vLLM's card: parent = the base model, root = the adapter's path
        return {"id": name, "object": "model", "created": int(app.started),
                "owned_by": "minserve", "root": lora.path,
                "parent": lora.base_model_name or app.model_name,
                "max_model_len": app.chat_serving().ctx.max_model_len, "permission": []}
    return {"id": name, "object": "model", "created": int(app.started), "owned_by": "minserve",
            "root": app.cfg.model_root or name, "parent": None,
            "max_model_len": app.model_max_len(name), "permission": []}


async def list_models(app: Any, http: Http) -> None:
    pooled = list(app.pool.models) + list(app.pool.adapters) if app.pool is not None else []
    await http.send_json(200, {"object": "list", "data": [
        _model_card(app, name) for name in app.model_names() + list(app.lora_adapters) + pooled]})


async def get_model(app: Any, http: Http) -> None:
    name = http.path_params["model"]
    if name not in app.model_names() and name not in app.lora_adapters and \
            not (app.pool is not None and app.pool.has(name)):
        raise model_not_found(name, app.model_names())
    await http.send_json(200, _model_card(app, name))


ROUTES = {"/v1/models": {"GET": list_models}, "/v1/models/{model:path}": {"GET": get_model}}
