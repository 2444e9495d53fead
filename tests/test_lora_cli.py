"""The LoRA flags: vLLM's names and defaults, `--lora-modules a=x b=y` (and JSON) after one flag
without swallowing the positional model, and bad values as start-up errors naming the flag."""
from __future__ import annotations

import pytest

from minserve import cli
from minserve.config import LoRAModule


def test_lora_modules_do_not_swallow_the_model():
    args = cli.parse_args(["serve", "--enable-lora", "--lora-modules", "sql=/a/sql",
                           '{"name": "poet", "path": "/a/poet", "base_model_name": "b"}',
                           "/models/base", "--max-loras", "4"])
    assert args.model == "/models/base"
    lora = args.engine_config.lora
    assert lora.lora_modules == [LoRAModule("sql", "/a/sql"), LoRAModule("poet", "/a/poet", "b")]
    assert (lora.max_loras, lora.max_lora_rank, lora.max_cpu_loras) == (4, 16, 4)
    s = cli.server_config(args)
    assert [m.name for m in s.lora_modules] == ["sql", "poet"] and not s.allow_runtime_lora


def test_defaults_repeated_flag_and_runtime_env(monkeypatch):
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
    args = cli.parse_args(["/m", "--enable-lora", "--lora-modules", "a=/x", "--lora-modules=b=/y",
                           "--max-lora-rank", "64", "--max-cpu-loras", "3",
                           "--lora-dtype", "bfloat16"])
    lora = args.engine_config.lora
    assert [m.name for m in lora.lora_modules] == ["a", "b"]
    assert (lora.max_loras, lora.max_lora_rank, lora.max_cpu_loras, lora.lora_dtype) == (
        1, 64, 3, "bfloat16")
    assert cli.server_config(args).allow_runtime_lora
    assert cli.parse_args(["/m"]).engine_config.lora is None


@pytest.mark.parametrize("argv,match", [
    (["--enable-lora", "--max-loras", "0"], "--max-loras"),
    (["--enable-lora", "--max-lora-rank", "12"], "--max-lora-rank 12"),
    (["--enable-lora", "--max-loras", "4", "--max-cpu-loras", "2"], "--max-cpu-loras"),
    (["--enable-lora", "--lora-dtype", "int4"], "--lora-dtype"),
    (["--enable-lora", "--lora-modules", "a=/x", "a=/y"], "given twice"),
    (["--enable-lora", "--lora-modules", '{"name": "a"}'], "--lora-modules"),
    (["--enable-lora", "--lora-modules", '{"name": "a", bad'], "--lora-modules: bad JSON"),
    (["--enable-lora", "--lora-modules"], "--lora-modules"),
    (["--lora-modules", "a=/x"], "needs --enable-lora"),
])
def test_bad_values_name_the_flag(argv, match, capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(["/m", *argv])
    assert match in capsys.readouterr().err
