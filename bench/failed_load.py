"""Start `python -m minserve` with a model that cannot load, N times (issue 19.10): every run
must exit 1 with exactly one error line and no panic or traceback. Prints the tally.

    python bench/failed_load.py [N=50]
"""
from __future__ import annotations

import collections
import subprocess
import sys
import tempfile


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    tally: collections.Counter = collections.Counter()
    with tempfile.TemporaryDirectory() as folder:
        with open(f"{folder}/config.json", "w") as f:
            f.write('{"architectures": ["NoSuchForCausalLM"]}')
        for _ in range(n):
            p = subprocess.run([sys.executable, "-m", "minserve", "serve", folder, "--port", "0"],
                               capture_output=True, text=True, timeout=120)
            out = p.stdout + p.stderr
            errors = [line for line in out.splitlines() if " ERROR " in line]
            ok = p.returncode == 1 and len(errors) == 1 and "panic" not in out \
                and "Traceback" not in out
            tally["ok" if ok else f"rc={p.returncode} errors={len(errors)}"] += 1
            if not ok:
                print(out[-2000:], file=sys.stderr)
    print(dict(tally))
    return 0 if tally["ok"] == n else 1


if __name__ == "__main__":
    sys.exit(main())
