"""How often tool_choice "auto" calls the tool: the vLLM guide's Task 7 request (get_weather,
"What's the weather like in San Francisco?") over N seeds against a running server, e.g.

    python -m minserve --enable-auto-tool-choice &
    python bench/tool_choice.py --seeds 20 --max-tokens 150

Prints each seed's outcome and the share of well-formed get_weather calls. Stdlib only."""
from __future__ import annotations

import argparse
import json
import time
import urllib.request

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a given location",
    "parameters": {"type": "object", "properties": {
        "location": {"type": "string", "description": "City and state, e.g., 'San Francisco, CA'"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["location", "unit"]}}}]


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--seeds", type=int, default=20)
    p.add_argument("--max-tokens", type=int, default=150)
    args = p.parse_args()
    with urllib.request.urlopen(args.base_url + "/v1/models", timeout=60) as r:
        model = json.loads(r.read())["data"][0]["id"]
    calls = 0
    for seed in range(args.seeds):
        t0 = time.perf_counter()
        out = post(args.base_url + "/v1/chat/completions", {
            "model": model, "seed": seed, "max_tokens": args.max_tokens, "tools": TOOLS,
            "tool_choice": "auto",
            "messages": [{"role": "user", "content": "What's the weather like in San Francisco?"}]})
        choice = out["choices"][0]
        tcs = choice["message"].get("tool_calls") or []
        ok = [c for c in tcs if c["function"]["name"] == "get_weather"
              and set(json.loads(c["function"]["arguments"])) == {"location", "unit"}]
        calls += bool(ok)
        what = ok[0]["function"]["arguments"] if ok else repr((choice["message"]["content"]
                                                              or "")[:70])
        print(f"seed {seed:2d}  {time.perf_counter() - t0:5.1f} s  {choice['finish_reason']:<10} "
              f"{out['usage']['completion_tokens']:4d} tok  {what}", flush=True)
    print(f"{calls}/{args.seeds} seeds called get_weather with valid arguments")


if __name__ == "__main__":
    main()
