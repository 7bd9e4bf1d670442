"""`harness [hydra overrides]` runs; `harness collect ...` builds tables (harness.collect)."""

from __future__ import annotations

import sys


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "collect":
        from harness.collect import main as collect_main

        sys.argv = [f"{sys.argv[0]} collect", *sys.argv[2:]]
        collect_main()
        return
    from harness.run import main as run_main

    run_main()
