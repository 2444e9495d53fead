"""`python -m minserve` flags: vLLM's names and defaults map onto EngineConfig/ServerConfig, and
what we do not support is an error that says so."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from minserve import cli, env, launch

# Every flag issue 3 lists, with a value where it takes one.
VLLM_FLAGS = [
    ["--host", "0.0.0.0"], ["--port", "8123"], ["--served-model-name", "a", "b"],
    ["--api-key", "k"], ["--dtype", "float32"], ["--max-model-len", "4k"],
    ["--gpu-memory-utilization", "0.5"], ["--kv-cache-memory", "2GiB"], ["--max-num-seqs", "8"],
    ["--max-num-batched-tokens", "2048"], ["--enable-prefix-caching"],
    ["--no-enable-prefix-caching"], ["--block-size", "32"], ["--chat-template", "t.jinja"],
    ["--generation-config", "vllm"], ["--load-format", "dummy"], ["--seed", "3"],
    ["--enforce-eager"], ["--disable-log-requests"], ["--log-level", "debug"],
    ["--uvicorn-log-level", "warning"], ["--allowed-origins", '["https://a.example"]'],
    ["--root-path", "/api"], ["--ssl-keyfile", "k.pem", "--ssl-certfile", "c.pem"],
    ["--trust-remote-code"], ["--tensor-parallel-size", "1"],
    ["--structured-outputs-config", '{"backend": "guidance", "disable_any_whitespace": true}'],
    ["--enable-metrics"], ["--disable-log-stats"],
    ["--override-generation-config", '{"temperature": 0.5, "max_new_tokens": 64}'],
]


@pytest.mark.parametrize("flag", VLLM_FLAGS, ids=lambda f: f[0])
def test_each_vllm_flag_is_accepted(flag):
    cli.parse_args(flag)


def test_flags_map_onto_configs(monkeypatch):
    for name in env.API_KEY_ENVS:
        monkeypatch.delenv(name, raising=False)
    args = cli.parse_args([
        "serve", "/models/m", "--served-model-name", "a", "b", "--max-model-len", "4K",
        "--kv-cache-memory", "2GiB", "--no-enable-prefix-caching", "--block-size", "32",
        "--max-num-seqs", "8", "--max-num-batched-tokens", "2048", "--dtype", "float32",
        "--seed", "3", "--load-format", "dummy", "--generation-config", "vllm",
        "--uvicorn-log-level", "warning", "--allowed-origins", "https://a.example,https://b",
        "--root-path", "/api/", "--enforce-eager", "--chat-template", "t.jinja"])
    e = args.engine_config
    assert (e.model, e.max_model_len, e.kv_cache_memory, e.enable_prefix_caching,
            e.block_size, e.max_num_seqs, e.max_num_batched_tokens, e.dtype, e.seed,
            e.load_format, e.generation_config, e.enforce_eager, e.chat_template) == (
        "/models/m", 4096, 2 << 30, False, 32, 8, 2048, "float32", 3, "dummy", "vllm", True,
        "t.jinja")
    assert (args.host, args.port, args.log_level) == ("127.0.0.1", 8000, "warning")
    s = cli.server_config(args)
    assert s.served_model_names == ["a", "b"] and s.api_keys == []
    assert s.allowed_origins == ["https://a.example", "https://b"] and s.root_path == "/api"
    assert cli.parse_args(["--model", "/m"]).engine_config.model == "/m"
    d = cli.parse_args([])
    assert (d.engine_config.model, d.engine_config.enable_prefix_caching, d.port) == (
        None, True, 8000)
    assert cli.server_config(d).served_model_names == [cli.DEFAULT_MODEL_NAME]


def test_api_key_from_environment(monkeypatch):
    monkeypatch.setenv("VLLM_API_KEY", "from-env")
    assert cli.server_config(cli.parse_args([])).api_keys == ["from-env"]
    assert cli.server_config(cli.parse_args(["--api-key", "flag"])).api_keys == ["flag"]


def test_structured_outputs_config_sets_the_spec_defaults():
    args = cli.parse_args(["--structured-outputs-config", '{"disable_any_whitespace": true, '
                           '"disable_additional_properties": false}'])
    assert cli.server_config(args).structured_defaults == {"any_whitespace": False,
                                                           "additional_properties": True}
    assert cli.server_config(cli.parse_args([])).structured_defaults == {}


@pytest.mark.parametrize("argv, word", [
    (["--quantization", "bitsandbytes"], "invalid choice: 'bitsandbytes'"),
    (["--kv-cache-dtype", "int8"], "invalid choice: 'int8'"),
    (["--quantization", "gguf", "--gguf-dequantize"], "contradicts --gguf-dequantize"),
    (["--speculative-config", "{}"], 'give "method"'),
    (["--kv-transfer-config", "{}"], "unsupported argument(s): --kv-transfer-config"),
    (["-tp", "2", "--task", "embed", "--nnodes", "2"], "runs on one node"),
    (["--port", "70000"], "--port"),
    (["--ssl-keyfile", "k.pem"], "go together"),
    (["--block-size", "12"], "--block-size"),
    (["--dtype", "int3"], "--dtype"),
    (["/a", "--model", "/b"], "two models"),
    (["--structured-outputs-config", "{nope"], "must be a JSON object"),
    (["--structured-outputs-config", '{"disable_any_whitespac": true}'], "unknown key(s)"),
    (["--structured-outputs-config", '{"disable_any_whitespace": 1}'], "must be a boolean"),
    (["--timeout-keep-alive", "0"], "--timeout-keep-alive"),
    (["--override-generation-config", "[1]"], "must be a JSON object"),
    (["--override-generation-config", '{"temprature": 1}'], "unknown key(s) temprature"),
    (["--override-generation-config", '{"max_new_tokens": 1.5}'], "max_new_tokens must be"),
])
def test_bad_flags_are_errors_that_say_why(argv, word, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.parse_args(argv)
    assert exc.value.code == 2
    assert word in capsys.readouterr().err


def test_generation_overrides_set_the_default_sampling(tiny_model_dir):
    """--override-generation-config (LLM: override_generation_config) sets the sampling
    defaults over the model's generation_config.json; max_new_tokens becomes max_tokens."""
    from minserve import LLM
    from minserve.config import ConfigError

    llm = LLM(tiny_model_dir, override_generation_config={"max_new_tokens": 3, "top_k": 5},
              kv_cache_memory=1 << 20)
    params = llm.get_default_sampling_params()
    assert (params.max_tokens, params.top_k) == (3, 5)
    assert len(llm.generate(["hello"], params)[0].outputs[0].token_ids) <= 3
    with pytest.raises(ConfigError, match="top_k must be a non-negative integer"):
        LLM(tiny_model_dir, override_generation_config={"top_k": 0.5})


def test_help_says_trust_remote_code_changes_nothing():
    text = cli.build_parser().format_help()
    assert "never runs code from a model repository" in " ".join(text.split())
    for flag in VLLM_FLAGS:
        assert flag[0] in text, flag[0]


def test_engine_that_fails_to_load_exits_non_zero(tmp_path):
    """A model that cannot load: the server logs why and exits 1 instead of serving 503s."""
    (tmp_path / "config.json").write_text('{"architectures": ["NoSuchForCausalLM"]}')
    p = subprocess.run([sys.executable, "-m", "minserve", "serve", str(tmp_path), "--port", "0"],
                       capture_output=True, text=True, timeout=120)
    out = p.stdout + p.stderr
    assert p.returncode == 1, out
    errors = [line for line in out.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "engine failed to start" in errors[0], out
    assert "Traceback" not in out and "panic" not in out, out  # bench/failed_load.py: x50


def test_sizes_read_as_vllm_reads_them():
    assert [cli._size(t) for t in ("4096", "4k", "4K", "1.5k", "2M", "2GiB", "512MB", "1gib")] == [
        4096, 4000, 4096, 1500, 2 << 20, 2 << 30, 512 << 20, 1 << 30]


def test_ready_line_at_any_log_level_and_no_granian_warning(tiny_model_dir):
    """--uvicorn-log-level warning (the guides' spelling) and --enable-metrics: the loading,
    ready and URL lines still print, granian's "experimental" warning does not, /metrics is on."""
    import urllib.request

    from tests.serving import start_server, stop_server

    proc, url = start_server(["serve", tiny_model_dir, "--uvicorn-log-level", "warning",
                              "--enable-metrics", "--kv-cache-memory", "4MiB"])
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
            assert b"vllm:num_requests_running" in r.read()
    finally:
        code, out = stop_server(proc)
    assert code == 0, out
    assert "ready: OpenAI API at http://127.0.0.1:" in out and "loading" in out, out
    assert "experimental" not in out, out


def test_hub_id_offline_is_one_error_line(tmp_path):
    """An unfetchable hub id: exit 1 with one error line naming the alternatives, no traceback."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    p = subprocess.run([sys.executable, "-m", "minserve", "serve", "someorg/some-model",
                        "--port", "0"], capture_output=True, text=True, timeout=120, env=env)
    out = p.stdout + p.stderr
    assert p.returncode == 1, out
    assert "Traceback" not in out, out
    errors = [line for line in out.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "local model folder" in errors[0] and ".gguf" in errors[0], out


def test_connection_limit_follows_the_open_files_limit(monkeypatch):
    """Connections get file descriptors: the soft open-files limit is raised to the hard one, and
    the connection limit stays FD_RESERVE below it (and at most MAX_CONNECTIONS)."""
    import resource

    state = {"soft": 1024, "hard": 4096}
    monkeypatch.setattr(resource, "getrlimit", lambda _: (state["soft"], state["hard"]))
    monkeypatch.setattr(resource, "setrlimit", lambda _, lim: state.update(soft=lim[0]))
    assert launch.connection_limit() == 4096 - launch.FD_RESERVE and state["soft"] == 4096
    state.update(soft=1024, hard=1 << 20)
    assert launch.connection_limit() == launch.MAX_CONNECTIONS
    assert state["soft"] == launch.MAX_CONNECTIONS + launch.FD_RESERVE
