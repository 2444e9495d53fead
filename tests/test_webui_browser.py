"""The chat page in a real browser: Playwright driving Debian's chromium against real servers,
each started once for the module: the default model behind --api-key (the key asked once;
streamed text growing in; Stop ending the request on the server; regenerate, edit, clear, JSON
mode, export) and a tiny LLaVA (an image from disk). A hostile answer and file name stay text.
Each test leaves screenshots in its tmp_path: <test name>.png at its end, and where the end
is an empty page, one of the moment worth seeing."""
from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.serving import KEY, metric, start_server, stop_server, wait_until
from tests.tiny_vlm import make_tiny_vlm, random_image

CHROMIUM = "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip(f"the browser tests drive Debian's chromium, and {CHROMIUM} is missing "
                "(apt-get install chromium; .ci/run installs it)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is a test extra")

# Without the background-networking flags chromium keeps trying to reach its services.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 120_000   # a shared 2-core box: the default model answers in seconds, not ms
HOSTILE = "<img src=x onerror=window.__pwned=1>"


def wait_for(cond, timeout: float, what: str) -> None:
    """tests.serving.wait_until for sync code under Playwright, whose loop holds this thread."""
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, wait_until(cond, timeout, what)).result()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def default_server():
    proc, url = start_server(["--kv-cache-memory", "64MiB", "--max-model-len", "2048",
                              "--api-key", KEY], timeout=900)
    yield url
    code, out = stop_server(proc)
    assert code == 0, out


@pytest.fixture(scope="module")
def llava_server(tmp_path_factory):
    folder = make_tiny_vlm(str(tmp_path_factory.mktemp("llava")), "LlavaForConditionalGeneration")
    proc, url = start_server(["serve", folder, "--served-model-name", "llava",
                              "--kv-cache-memory", "8MiB", "--max-model-len", "512"])
    yield url
    code, out = stop_server(proc)
    assert code == 0, out


@pytest.fixture
def page(browser, tmp_path, request):
    """A fresh profile (empty local storage) per test; its screenshot is saved at the end."""
    context = browser.new_context(accept_downloads=True)
    context.set_default_timeout(TIMEOUT_MS)
    context.add_init_script("window.__violations = []; document.addEventListener("
                            "'securitypolicyviolation', (e) => "
                            "window.__violations.push(e.violatedDirective));")
    tab = context.new_page()
    yield tab
    snap(tab, tmp_path, request.node.name)
    context.close()


def snap(page, tmp_path, name: str) -> None:
    page.screenshot(path=str(tmp_path / f"{name}.png"), full_page=True)


def open_chat(page, url: str, key: str | None = None) -> None:
    page.goto(url)
    if key is not None:
        page.wait_for_selector("#key-dialog[open]")
        page.fill("#key", key)
        page.click("#key-save")
    page.wait_for_function("() => document.getElementById('model').options.length > 0")
    page.click("#settings > summary")   # system prompt, temperature, max tokens, JSON mode


def ask(page, text: str, max_tokens: int) -> None:
    page.fill("#temperature", "0")
    page.fill("#max-tokens", str(max_tokens))
    page.fill("#prompt", text)
    page.click("#send")


def wait_answers(page, n: int) -> list[str]:
    """Until n answers have finished (each shows its stats line); -> their stats lines."""
    # NOTE: predicates as functions: an expression would be eval'ed, which the page's CSP refuses
    page.wait_for_function("(n) => [...document.querySelectorAll('#log .assistant .stats')]"
                           ".filter((s) => s.textContent).length === n", arg=n)
    return page.locator("#log .assistant .stats").all_text_contents()


def chat_bodies(requests: list) -> list[dict]:
    return [json.loads(r.post_data) for r in requests if r.url.endswith("/v1/chat/completions")]


@pytest.mark.slow
def test_key_asked_once_and_the_answer_streams_in(page, default_server, tmp_path):
    requests = []
    page.on("request", lambda r: requests.append(r) if "/v1/" in r.url else None)
    open_chat(page, default_server, key=KEY)
    # every length the answer's text takes, in order, as the page renders it
    page.evaluate("""() => {
        window.__lengths = [];
        new MutationObserver(() => {
            const answer = document.querySelector('#log .assistant .content');
            const n = answer ? answer.textContent.length : 0;
            if (n && window.__lengths.at(-1) !== n) window.__lengths.push(n);
        }).observe(document.getElementById('log'),
                   {childList: true, subtree: true, characterData: true});
    }""")
    ask(page, "Write three sentences about the sea.", 48)
    [stats] = wait_answers(page, 1)
    lengths = page.evaluate("window.__lengths")
    assert len(lengths) >= 3 and lengths == sorted(lengths), lengths
    assert re.fullmatch(r"\d+ tokens · TTFT \d+\.\d\d s · \d+\.\d tok/s · (stop|length)", stats)
    answer = page.locator("#log .assistant .content").text_content()
    assert len(answer) == lengths[-1]
    assert page.locator("#log .assistant .error").text_content() == ""
    # the key: asked for after the first 401, then sent with every call
    auth = [r.all_headers().get("authorization") for r in requests]
    assert auth == [None, f"Bearer {KEY}", f"Bearer {KEY}"], auth
    assert chat_bodies(requests)[0]["stream"] is True

    with page.expect_download() as download:
        page.click("#export")
    exported = json.loads(open(download.value.path()).read())
    assert [(m["role"], m["text"]) for m in exported["messages"]] == [
        ("user", "Write three sentences about the sea."), ("assistant", answer)]
    assert exported["messages"][1]["stats"]["num_tokens"] > 0

    snap(page, tmp_path, "answer")
    page.reload()   # the key is remembered: no dialog this time
    page.wait_for_function("() => document.getElementById('model').options.length > 0")
    assert page.locator("#key-dialog[open]").count() == 0
    assert page.evaluate("window.__violations") == []


@pytest.mark.slow
def test_stop_aborts_the_request_on_the_server(page, default_server):
    open_chat(page, default_server, key=KEY)
    model = page.input_value("#model")
    aborted = f'vllm:request_success_total{{finished_reason="abort",model_name="{model}"}}'
    before = metric(default_server, aborted)
    ask(page, "Write a long story about a dragon who learns to fly.", 1500)
    page.wait_for_function("() => document.querySelector('#log .assistant .content')"
                           "?.textContent.length >= 40")   # a few tokens in: mid-answer
    assert metric(default_server, "vllm:num_requests_running") == 1
    page.click("#stop")
    wait_for(lambda: metric(default_server, aborted) == before + 1
             and metric(default_server, "vllm:num_requests_running") == 0
             and metric(default_server, "vllm:kv_cache_usage_perc") == 0, 60,
             "the abort counted, no request running and its KV blocks freed")
    [stats] = wait_answers(page, 1)
    assert stats.endswith("stopped")
    assert page.is_enabled("#send") and not page.is_enabled("#stop")


@pytest.mark.slow
def test_regenerate_edit_clear_and_json_mode(page, default_server, tmp_path):
    requests = []
    page.on("request", lambda r: requests.append(r))
    open_chat(page, default_server, key=KEY)
    page.check("#json-mode")
    page.fill("#system", "You answer in JSON.")
    ask(page, "Name a colour.", 12)
    wait_answers(page, 1)
    page.click("#regenerate")  # drops the answer at once and streams a new one
    wait_answers(page, 1)      # the old answer replaced, not kept beside the new one
    first, second = chat_bodies(requests)
    assert first == second
    assert first["response_format"] == {"type": "json_object"}
    assert first["messages"] == [{"role": "system", "content": "You answer in JSON."},
                                 {"role": "user", "content": "Name a colour."}]
    assert first["temperature"] == 0 and first["max_tokens"] == 12
    assert page.locator("#log .msg").count() == 2
    snap(page, tmp_path, "regenerated")

    page.click("#edit")         # the last question back in the box, it and its answer gone
    assert page.input_value("#prompt") == "Name a colour."
    assert page.locator("#log .msg").count() == 0
    page.fill("#prompt", "Name a fruit.")
    page.click("#send")
    wait_answers(page, 1)
    assert chat_bodies(requests)[-1]["messages"][-1] == {"role": "user",
                                                         "content": "Name a fruit."}
    page.click("#clear")
    assert page.locator("#log .msg").count() == 0


@pytest.mark.slow
def test_hostile_answer_and_file_name_stay_text(page, default_server, tmp_path):
    """The answer (content, a code block, reasoning, a tool call) comes from a route that
    replies with markup aimed at the page; the file name and the question carry it too."""
    thought = f"thinking {HOSTILE}"
    content = f"Look: {HOSTILE}\n```html\n<script>window.__pwned=2</script>\n```\nbye"
    call = {"index": 0, "id": "call_1", "type": "function",
            "function": {"name": "<b>f</b>", "arguments": json.dumps({"a": HOSTILE})}}
    chunks = [{"delta": {"role": "assistant", "content": ""}}, {"delta": {"reasoning_content":
              thought}}, {"delta": {"content": content}}, {"delta": {"tool_calls": [call]}},
              {"delta": {}, "finish_reason": "tool_calls"}]
    sse = "".join(f"data: {json.dumps({'choices': [c]})}\n\n" for c in chunks)
    sse += "data: " + json.dumps({"choices": [], "usage": {"completion_tokens": 9}}) + "\n\n"
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, headers={"content-type": "text/event-stream"}, body=sse + "data: [DONE]\n\n"))
    open_chat(page, default_server, key=KEY)
    png = io.BytesIO()
    random_image(32, 24).save(png, format="PNG")
    page.set_input_files("#attach", files=[{"name": f"{HOSTILE}.png", "mimeType": "image/png",
                                            "buffer": png.getvalue()}])
    page.wait_for_selector("#attachments .file")
    ask(page, HOSTILE, 16)
    [stats] = wait_answers(page, 1)
    assert stats.startswith("9 tokens") and stats.endswith("tool_calls")

    assert page.locator("#log .user .content").text_content() == HOSTILE
    assert page.locator("#log .user .file span").text_content() == f"{HOSTILE}.png"
    assert page.locator("#log .assistant .content").text_content() == \
        f"Look: {HOSTILE}\n<script>window.__pwned=2</script>bye"
    assert page.locator("#log .assistant pre code").text_content() == \
        "<script>window.__pwned=2</script>"
    assert page.locator("#log .call").text_content() == f'<b>f</b>({{"a": "{HOSTILE}"}})'
    reasoning = page.locator("#log .assistant details.reasoning")
    assert reasoning.get_attribute("open") is None      # shown apart, collapsed
    assert reasoning.locator(".text").text_content() == thought
    # no element made from the text, nothing run, nothing even tried against the policy
    made = page.evaluate("document.querySelectorAll('#log img[src=\"x\"], #log script, "
                         "#log b, [onerror]').length")
    assert made == 0
    assert page.evaluate("window.__pwned") is None
    assert page.evaluate("window.__violations") == []


def test_image_from_disk_to_a_vision_model(page, llava_server, tmp_path):
    path = tmp_path / "photo.png"
    random_image(64, 48).save(path)
    open_chat(page, llava_server)
    requests = []
    page.on("request", lambda r: requests.append(r))
    page.set_input_files("#attach", str(path))
    page.wait_for_selector("#attachments .file img")
    assert page.locator("#attachments .file span").text_content() == "photo.png"
    ask(page, "What is in this image?", 8)
    [stats] = wait_answers(page, 1)
    assert page.locator("#log .assistant .error").text_content() == ""
    assert re.match(r"\d+ tokens", stats) and stats.endswith(("stop", "length"))
    assert page.locator("#log .user .file span").text_content() == "photo.png"
    assert page.locator("#attachments .file").count() == 0
    [body] = chat_bodies(requests)
    text, image = body["messages"][0]["content"]
    assert text == {"type": "text", "text": "What is in this image?"}
    prefix = "data:image/png;base64,"
    assert image["type"] == "image_url" and image["image_url"]["url"].startswith(prefix)
    assert base64.b64decode(image["image_url"]["url"][len(prefix):]) == path.read_bytes()
