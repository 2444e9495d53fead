"""`python -m minserve` flags: vLLM's names and defaults map onto EngineConfig/ServerConfig, and
what we do not support is an error that says so."""
from __future__ import annotations

import subprocess
import sys

import pytest

from minserve import cli

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
]


@pytest.mark.parametrize("flag", VLLM_FLAGS, ids=lambda f: f[0])
def test_each_vllm_flag_is_accepted(flag):
    cli.parse_args(flag)


def test_flags_map_onto_configs(monkeypatch):
    for env in cli.API_KEY_ENVS:
        monkeypatch.delenv(env, raising=False)
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


@pytest.mark.parametrize("argv, word", [
    (["--quantization", "awq"], "unsupported argument(s): --quantization"),
    (["--speculative-config", "{}"], "unsupported argument(s): --speculative-config"),
    (["--tensor-parallel-size", "2"], "tensor parallelism is not implemented"),
    (["-tp", "4"], "tensor parallelism is not implemented"),
    (["--port", "70000"], "--port"),
    (["--ssl-keyfile", "k.pem"], "go together"),
    (["--block-size", "12"], "--block-size"),
    (["--dtype", "int3"], "--dtype"),
    (["/a", "--model", "/b"], "two models"),
    (["--timeout-keep-alive", "0"], "--timeout-keep-alive"),
])
def test_bad_flags_are_errors_that_say_why(argv, word, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.parse_args(argv)
    assert exc.value.code == 2
    assert word in capsys.readouterr().err


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
    assert p.returncode == 1, p.stdout + p.stderr
    assert "engine failed to start" in p.stdout + p.stderr


def test_sizes_read_as_vllm_reads_them():
    assert [cli._size(t) for t in ("4096", "4k", "4K", "1.5k", "2M", "2GiB", "512MB", "1gib")] == [
        4096, 4000, 4096, 1500, 2 << 20, 2 << 30, 512 << 20, 1 << 30]


def test_connection_limit_follows_the_open_files_limit(monkeypatch):
    """Connections get file descriptors: the soft open-files limit is raised to the hard one, and
    the connection limit stays FD_RESERVE below it (and at most MAX_CONNECTIONS)."""
    import resource

    state = {"soft": 1024, "hard": 4096}
    monkeypatch.setattr(resource, "getrlimit", lambda _: (state["soft"], state["hard"]))
    monkeypatch.setattr(resource, "setrlimit", lambda _, lim: state.update(soft=lim[0]))
    assert cli.connection_limit() == 4096 - cli.FD_RESERVE and state["soft"] == 4096
    state.update(soft=1024, hard=1 << 20)
    assert cli.connection_limit() == cli.MAX_CONNECTIONS
    assert state["soft"] == cli.MAX_CONNECTIONS + cli.FD_RESERVE
