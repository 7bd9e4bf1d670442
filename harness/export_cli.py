"""`harness export RUN [--out DIR]`: a run's pruned model as a transformers folder.

RUN is a run id (looked up under --out-dir, default results/runs), a record (result.json or
its folder) or a saved-model / checkpoint folder. The model comes from the run's saved model
(`save_model=true`) or its checkpoint if one is there; otherwise the run is pruned again from
its recorded config (pruning is deterministic), and the result must remove exactly the units
the record lists. The folder gets a model card and the record (models/export.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("harness.export")


def _locate(run: str, out_dir: Path) -> tuple[Path | None, Path | None]:
    """(the record's path or None, a model folder or None) for RUN."""
    p = Path(run).expanduser()
    if p.is_file():
        return p, None
    if p.is_dir() and (p / "result.json").exists():
        return p / "result.json", None
    if p.is_dir() and (p / "config.json").exists():  # a saved model or checkpoint folder
        record = p.parent / "result.json"
        return (record if record.exists() else None), p
    if (out_dir / run / "result.json").exists():
        return out_dir / run / "result.json", None
    raise SystemExit(f"harness export: {run!r} is not a record, a run folder, a model folder or a run id under {out_dir}")


def _removed(record: dict) -> list:
    return [(row["attention_units_removed"], row["mlp_channels_removed"]) for row in record["pruning"]["per_layer"]]


def model_for(record_path: Path | None, folder: Path | None):
    """(model, tokenizer, record) for a located run."""
    from transformers import AutoTokenizer

    from harness import records
    from harness.models.pruned import load_pruned

    record = records.read(record_path) if record_path else None
    for candidate in [folder] if folder else [record_path.parent / "model", record_path.parent / "checkpoint"]:
        if candidate is not None and (candidate / "config.json").exists():
            log.info("exporting the saved model in %s", candidate)
            return load_pruned(candidate), AutoTokenizer.from_pretrained(candidate), record
    if record is None or "pruning" not in record:
        raise SystemExit(f"harness export: {record_path} has no pruning entry and no saved model to export")
    from harness import config as schema
    from harness.models import loading
    from harness.run import _load_and_prune

    log.info("no saved model for run %s: pruning again from its recorded config", record["run_id"])
    cfg = dict(record["config"], out_dir=str(record_path.parent.parent))
    run_config = schema.typed(cfg)
    device = loading.resolve_device(run_config.device)
    again: dict = {}
    model, tok = _load_and_prune(run_config, schema.as_dict(run_config), again, device,
                                 loading.resolve_dtype(run_config.dtype, device))
    if _removed(again) != _removed(record):
        raise SystemExit(f"harness export: pruning run {record['run_id']} again removed other units than its record "
                         "lists (a changed version or nondeterministic device); export refused")
    return model, tok, record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="harness export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="run id, record, run folder, or saved-model / checkpoint folder")
    parser.add_argument("--out", type=Path, help="target folder (default: <run folder>/export)")
    parser.add_argument("--out-dir", type=Path, default=Path("results/runs"), help="where run ids are looked up")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    record_path, folder = _locate(args.run, args.out_dir)
    model, tok, record = model_for(record_path, folder)
    from harness.models.export import export

    out = args.out or ((record_path.parent if record_path else folder.parent) / "export")
    export(model, tok, out, record)
    route = json.loads((out / "config.json").read_text())["harness_pruning"]["route"]
    print(f"exported to {out} ({'stock config' if route == 'stock' else 'with modeling_pruned.py: trust_remote_code=True'})")


if __name__ == "__main__":
    main(sys.argv[1:])
