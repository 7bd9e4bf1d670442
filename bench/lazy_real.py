"""Resident against lazy on a real checkpoint (`make bench-lazy-real`): the same run of the
harness, `model.lazy=false` and `model.lazy=true`, each in a fresh process; JSON + Markdown in
results/bench/lazy_real.*.

    python -m bench.lazy_real                  # Qwen2.5-Coder-1.5B, `ours` at 20% (about half an hour)
    python -m bench.lazy_real --smoke          # tiny-llama (a minute; the test suite runs it)

Each run is `python -m harness` with the scale experiment's calibration (32 C4 windows of 128
tokens, bfloat16) and perplexity on the first TOKENS tokens of WikiText-2, started by a wrapper
process that reports its child's peak resident set size (getrusage; Linux) and wall time. A
process of its own first converts the model's GGUF if it is not cached yet and reads the
converted checkpoint once, so neither measured run pays the one-time conversion and both read
a warm page cache. The two records must agree: the units each block lost, the parameter count
and the perplexity (the difference is reported, not assumed to be 0: lazy evaluation runs the
blocks in groups).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.run import cli, gib, report

ROOT = Path(__file__).resolve().parent.parent
FULL = {"model": "qwen2.5-coder-1.5b", "tokens": 4096, "n_samples": 32}
SMOKE = {"model": "tiny-llama", "tokens": 1024, "n_samples": 8}
# Runs the command given as arguments; prints its wall time and peak RSS (bytes; Linux's
# ru_maxrss is in KiB) as the last line.
_WRAPPER = ("import json, resource, subprocess, sys, time; t = time.perf_counter(); "
            "rc = subprocess.run(sys.argv[1:]).returncode; s = time.perf_counter() - t; "
            "print(json.dumps({'rc': rc, 'seconds': s, "
            "'peak_rss': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))")


def overrides(case: dict, lazy: bool, out_dir: Path) -> list[str]:
    return [f"model={case['model']}", "+method=ours", "sparsity=0.2", "dtype=bfloat16", "calibration=c4",
            f"calibration.n_samples={case['n_samples']}", "eval=ppl", "eval.ppl.datasets=[wikitext2]",
            f"eval.ppl.max_tokens={case['tokens']}", "eval.efficiency=null", "logger=none", "resume=false",
            f"model.lazy={str(lazy).lower()}", f"out_dir={out_dir}"]


def warm_up(model: str) -> None:
    """(In a process of its own) convert the model if it is not cached yet, and read its
    checkpoint files once, 64 MiB at a time: the page cache both measured runs read."""
    from omegaconf import OmegaConf

    from harness.models.loading import model_dir

    for f in Path(model_dir(OmegaConf.load(ROOT / "conf" / "model" / f"{model}.yaml"))).glob("*.safetensors"):
        with f.open("rb") as stream:
            while stream.read(1 << 26):
                pass


def measured_run(case: dict, lazy: bool, out_dir: Path) -> dict:
    """One run in a fresh process: its wall time, peak RSS and record."""
    cmd = [sys.executable, "-c", _WRAPPER, sys.executable, "-m", "harness", *overrides(case, lazy, out_dir)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    lines = done.stdout.strip().splitlines()
    stats = json.loads(lines[-1]) if done.returncode == 0 and lines else {"rc": done.returncode}
    if stats["rc"] != 0:
        raise RuntimeError(f"model.lazy={lazy} run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    (path,) = out_dir.glob("*/result.json")
    return {**stats, "record": json.loads(path.read_text())}


def removed(record: dict) -> list[dict]:
    return [{k: layer[k] for k in ("layer", "attention_units_removed", "mlp_channels_removed")}
            for layer in record["pruning"]["per_layer"]]


def run(smoke: bool, out: Path) -> dict:
    case = SMOKE if smoke else FULL
    subprocess.run([sys.executable, "-c", "import sys; from bench.lazy_real import warm_up; warm_up(sys.argv[1])",
                    case["model"]], check=True, cwd=ROOT)
    with tempfile.TemporaryDirectory() as tmp:
        runs = {mode: measured_run(case, mode == "lazy", Path(tmp) / mode) for mode in ("resident", "lazy")}
    resident, lazy = runs["resident"]["record"], runs["lazy"]["record"]
    ppl = {mode: r["record"]["eval"]["ppl"]["wikitext2"]["value"] for mode, r in runs.items()}
    result = {"case": case, "command": "python -m harness " + " ".join(overrides(case, False, Path("DIR"))),
              "params_before": resident["model"]["params_before"], "params_after": resident["model"]["params_after"],
              "same_units_removed": removed(resident) == removed(lazy),
              "same_params": resident["model"]["params_after"] == lazy["model"]["params_after"],
              "lazy_setting": {mode: r["record"]["config"]["model"]["lazy"] for mode, r in runs.items()},
              "ppl": ppl, "ppl_abs_difference": abs(ppl["resident"] - ppl["lazy"]),
              **{mode: {"seconds": r["seconds"], "peak_rss": r["peak_rss"],
                        "prune_seconds": r["record"]["pruning"]["seconds"]} for mode, r in runs.items()}}
    return report(out, "lazy_real", result, markdown)


def markdown(r: dict) -> str:
    c = r["case"]
    return "\n".join([
        f"# Resident against lazy on {c['model']} (`ours` at 20%, bfloat16)", "",
        f"{r['params_before']:,} -> {r['params_after']:,} parameters; {c['n_samples']} C4 windows of 128 tokens; "
        f"WikiText-2 perplexity on the first {c['tokens']:,} tokens. Each run in a fresh process:", "",
        "| | peak RSS (GiB) | wall time (s) | pruning (s) | WikiText-2 |", "| --- | ---: | ---: | ---: | ---: |",
        *(f"| `model.lazy={str(mode == 'lazy').lower()}` | {gib(r[mode]['peak_rss'])} | {r[mode]['seconds']:.0f} | "
          f"{r[mode]['prune_seconds']:.0f} | {r['ppl'][mode]:.4f} |" for mode in ("resident", "lazy")), "",
        f"Same units removed in every block: {r['same_units_removed']}; same parameter count: {r['same_params']}; "
        f"perplexity difference {r['ppl_abs_difference']:.2e}.", "",
        f"    {r['command'].replace('model.lazy=false', 'model.lazy=false|true')}", ""])


def main(argv: list[str] | None = None) -> None:
    cli(argv, __doc__, run, "lazy_real.md")


if __name__ == "__main__":
    main()
