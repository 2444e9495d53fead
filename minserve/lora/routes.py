"""POST /v1/load_lora_adapter and /v1/unload_lora_adapter, as vLLM has them: present only when
VLLM_ALLOW_RUNTIME_LORA_UPDATING=True (otherwise 404), bodies {lora_name, lora_path} and
{lora_name}, a plain-text success line, and OpenAI error objects (400) for what is refused.
Torch-free: AsyncEngine.add_lora reads the adapter in a worker thread and hands it to the engine
thread between two steps; remove_lora runs on the engine thread."""
from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

from minserve.config import LoRAModule
from minserve.engine.async_engine import EngineError
from minserve.http import Http, OpenAIError


def _field(body: Any, name: str) -> str:
    value = body.get(name) if isinstance(body, dict) else None
    if not isinstance(value, str) or not value:
        raise OpenAIError(400, f"{name}: must be a non-empty string", param=name)
    return value


def _check_enabled(app: Any, http: Http) -> None:
    if not app.cfg.allow_runtime_lora or app.chat is None:
        raise OpenAIError(404, f"Not Found: POST {http.path} (runtime LoRA updates need "
                          "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and --enable-lora)",
                          type="NotFoundError")


async def _engine_call(param: str, call: Awaitable[None]) -> None:
    try:
        await call
    except EngineError as e:
        raise OpenAIError(e.status, e.message, param=param if e.status == 400 else None) from None


async def load_lora_adapter(app: Any, http: Http) -> None:
    _check_enabled(app, http)
    body = await http.read_json()
    name, path = _field(body, "lora_name"), _field(body, "lora_path")
    if name in app.lora_adapters or name in app.model_names():
        raise OpenAIError(400, f"The lora adapter '{name}' has already been loaded.",
                          param="lora_name")
    await _engine_call("lora_path", app.chat.add_lora(name, path))
    app.lora_adapters[name] = LoRAModule(name, path)
    await http.send_body(200, f"Success: LoRA adapter '{name}' added successfully.".encode(),
                         [(b"content-type", b"text/plain; charset=utf-8")])


async def unload_lora_adapter(app: Any, http: Http) -> None:
    _check_enabled(app, http)
    body = await http.read_json()
    name = _field(body, "lora_name")
    if name not in app.lora_adapters:
        raise OpenAIError(400, f"The lora adapter '{name}' is not loaded.", param="lora_name")
    await _engine_call("lora_name", app.chat.remove_lora(name))
    del app.lora_adapters[name]
    await http.send_body(200, f"Success: LoRA adapter '{name}' removed successfully.".encode(),
                         [(b"content-type", b"text/plain; charset=utf-8")])


ROUTES = {
    "/v1/load_lora_adapter": {"POST": load_lora_adapter},
    "/v1/unload_lora_adapter": {"POST": unload_lora_adapter},
}
