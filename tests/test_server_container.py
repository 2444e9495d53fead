"""The Containerfile (no container engine runs here, so its text is checked): its install steps
are the README's, it serves on 0.0.0.0 with a /health HEALTHCHECK, the model cache is a volume,
and one build argument selects the CPU-only image."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [(m[1].upper(), m[2].strip()) for m in re.finditer(r"^(\w+)\s+(.*)$", joined, re.M)]


def _pip_installs(command: str) -> list[str]:
    """`python -m pip install ...` commands, minus options that only choose where wheels come
    from or how pip caches (the README's commands choose neither)."""
    out = []
    for part in command.split("&&"):
        part = " ".join(part.split())
        if part.startswith("python -m pip install"):
            part = re.sub(r" --index-url \S+| --no-cache-dir", "", part)
            out.append(part)
    return out


def test_containerfile_installs_as_the_readme_says():
    inst = _instructions((ROOT / "Containerfile").read_text())
    readme = (ROOT / "README.md").read_text()
    readme_cmds = {c for line in readme.splitlines() for c in _pip_installs(line.strip())}
    installs = [c for kind, args in inst if kind == "RUN" for c in _pip_installs(args)]
    assert "python -m pip install -e ." in installs
    assert any(c.startswith("python -m pip install torch==") for c in installs)
    for cmd in installs:
        assert cmd in readme_cmds, f"{cmd!r} is not one of the README's set-up commands"


def test_containerfile_serves_checks_health_and_keeps_the_cache():
    text = (ROOT / "Containerfile").read_text()
    inst = _instructions(text)
    kinds = [k for k, _ in inst]
    entry = dict(inst).get("ENTRYPOINT") or dict(inst)["CMD"]
    assert entry == '["python", "-m", "minserve", "--host", "0.0.0.0"]'
    health = dict(inst)["HEALTHCHECK"]
    assert health.endswith('CMD ["python", "-m", "minserve.healthcheck"]')
    volumes = dict(inst)["VOLUME"]
    env = dict(inst)["ENV"]
    assert "/root/.cache/minserve" in volumes and "MINSERVE_CACHE=/root/.cache/minserve" in env
    # one build argument picks the base: a CUDA PyTorch image or a CPU-only one
    assert inst[0] == ("ARG", "DEVICE=cuda") and "FROM base-${DEVICE}" in text
    froms = [a for k, a in inst if k == "FROM"]
    assert any("cuda" in f and f.endswith("AS base-cuda") for f in froms)
    assert any(f.endswith("AS base-cpu") for f in froms)
    assert kinds.count("HEALTHCHECK") == 1 and "EXPOSE" in kinds


def test_healthcheck_finds_the_server_from_its_command_line():
    from minserve.healthcheck import health_url, server_argv

    entry = [b"python", b"-m", b"minserve", b"--host", b"0.0.0.0"]
    assert server_argv(b"\0".join(entry) + b"\0") == ["--host", "0.0.0.0"]
    tini = b"\0".join([b"/sbin/tini", b"--", *entry, b"--port", b"9000"])
    assert health_url(server_argv(tini)) == "http://127.0.0.1:9000/health"
    assert server_argv(b"/bin/sh\0-c\0sleep 1") == []
    assert health_url([]) == "http://127.0.0.1:8000/health"
    assert health_url(["serve", "m", "--port=8443", "--ssl-certfile", "c.pem",
                       "--ssl-keyfile", "k.pem"]) == "https://127.0.0.1:8443/health"
    assert health_url(["--host", "::", "--port", "1"]) == "http://[::1]:1/health"
    assert health_url(["--host", "10.0.0.5"]) == "http://10.0.0.5:8000/health"
