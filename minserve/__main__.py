"""`python -m minserve [serve] ...` -> cli.main(); `python -m minserve run-batch ...` ->
batch/offline.py (which builds on cli's flags, so cli does not import it)."""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "run-batch":
        from minserve.batch.offline import main as run_batch
        return run_batch(argv[1:])
    from minserve.cli import main as serve
    return serve(argv)


if __name__ == "__main__":
    main()
