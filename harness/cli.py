"""`harness [hydra overrides]` runs; `harness collect ...` builds tables (harness.collect);
`harness export RUN` writes a run's pruned model as a transformers folder (harness.export_cli)."""

from __future__ import annotations

import sys


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "collect":
        from harness.collect import main as collect_main

        sys.argv = [f"{sys.argv[0]} collect", *sys.argv[2:]]
        collect_main()
        return
    if len(sys.argv) > 1 and sys.argv[1] == "export":
        from harness.export_cli import main as export_main

        export_main(sys.argv[2:])
        return
    from harness.run import command_line

    command_line()
