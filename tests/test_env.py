"""minserve/env.py is the one reader of the environment: no other module of minserve/ or kernels/
reads os.environ (writing variables for libgomp is allowed), the README's table names the
variables env.py reads, and the typed readers read what they say."""
from __future__ import annotations

import ast
import pathlib
import re

from minserve import env
from tests.test_imports import MODULES

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def _env_reads(source: str) -> list[int]:
    """Lines that read the environment: os.getenv(...), or os.environ used any way but as the
    target of a write (os.environ[k] = v, del os.environ[k], os.environ.update(...))."""
    tree = ast.parse(source)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    lines = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id == "os" and node.attr in ("environ", "getenv")):
            continue
        parent = parents.get(node)
        is_write = (node.attr == "environ" and (
            (isinstance(parent, ast.Subscript) and isinstance(parent.ctx, (ast.Store, ast.Del)))
            or (isinstance(parent, ast.Attribute) and parent.attr == "update")))
        if not is_write:
            lines.append(node.lineno)
    return sorted(lines)


def test_only_env_py_reads_the_environment():
    reads = {name: _env_reads(path.read_text()) for name, path in MODULES.items()
             if name != "minserve.env"}
    assert {name: lines for name, lines in reads.items() if lines} == {}
    # the checker sees reads, and lets writes pass
    assert _env_reads("import os\na = os.environ.get('A')\nb = os.getenv('B')\n"
                      "c = 'C' in os.environ\nd = os.environ['D']\n") == [2, 3, 4, 5]
    assert _env_reads("import os\nos.environ['A'] = '1'\nos.environ.update({})\n"
                      "del os.environ['A']\n") == []


def _table_names(text: str) -> set[str]:
    """The variable names in the first column of a markdown table's rows."""
    names = set()
    for line in text.splitlines():
        cells = line.strip().strip("|").split("|")
        if line.lstrip().startswith("|") and len(cells) > 1:
            names.update(re.findall(r"\b[A-Z][A-Z0-9]*_[A-Z0-9_]+\b|\bCC\b", cells[0]))
    return names


def test_readme_lists_the_variables_env_py_reads():
    readme = README.read_text()
    section = readme.split("### Environment variables\n", 1)[1].split("\n### ", 1)[0]
    documented = _table_names(section)
    assert "MINSERVE_CACHE" in documented and "CC" in documented and len(documented) >= 14
    source = pathlib.Path(env.__file__).read_text()
    read = set(re.findall(r'"([A-Z][A-Z0-9_]+)"', source))
    assert read == documented


def test_the_readers_parse_and_default(monkeypatch, tmp_path):
    for name in ("MINSERVE_STEP_TIMEOUT", "VLLM_ALLOW_RUNTIME_LORA_UPDATING", *env.API_KEY_ENVS):
        monkeypatch.delenv(name, raising=False)
    assert env.step_timeout_s() == 300.0 and env.api_key() is None
    assert not env.allow_runtime_lora()
    monkeypatch.setenv("MINSERVE_STEP_TIMEOUT", "15")
    monkeypatch.setenv("MINSERVE_API_KEY", "second")
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "TRUE")
    assert env.step_timeout_s() == 15.0 and env.api_key() == "second"
    assert env.allow_runtime_lora()
    monkeypatch.setenv("VLLM_API_KEY", "first")
    assert env.api_key() == "first"
    monkeypatch.setenv("MINSERVE_CACHE", str(tmp_path))
    assert env.cache_dir() == str(tmp_path)
