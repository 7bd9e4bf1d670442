"""The loop every engine script shares (stdlib only: it runs in the engines' own environments).

    python serving/<script>.py CASES.json OUT.json

Each case of CASES.json (a list of dicts with a "name") goes through the script's `run`; OUT.json
maps each name to what `run` returned, or to {"error": ...} with the exception it raised.
"""

import json
import sys
from collections.abc import Callable
from pathlib import Path


def main(run: Callable[[dict], dict]) -> None:
    cases = json.loads(Path(sys.argv[1]).read_text())
    results = {}
    for case in cases:
        try:
            results[case["name"]] = run(case)
        except Exception as e:  # noqa: BLE001 - reported per case; the caller decides what a failure means
            results[case["name"]] = {"error": f"{type(e).__name__}: {str(e)[:2000]}"}
        print(case["name"], "error" if "error" in results[case["name"]] else "ok", flush=True)
    Path(sys.argv[2]).write_text(json.dumps(results))
