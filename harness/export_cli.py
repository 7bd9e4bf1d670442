"""`harness export RUN [--out DIR] [--format hf|gguf]`: a run's pruned model as a transformers
folder, or as one GGUF file for llama.cpp (models/gguf_export.py).

RUN is a run id (looked up under --out-dir, default results/runs), a record (result.json or
its folder) or a saved-model / checkpoint folder. The model comes from the run's saved model
(`save_model=true`) or its checkpoint if one is there; otherwise the run is pruned again from
its recorded config (pruning is deterministic), and the result must remove exactly the units
the record lists. The folder gets a model card and the record (models/export.py); a GGUF export
writes `<out>/model.gguf` beside them, its tokenizer copied from the GGUF the model was loaded
from (or `--vocab FILE.gguf`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from harness import config as schema
from harness import records
from harness.checks import ConfigError
from harness.config import writable_dir
from harness.models import loading
from harness.models.export import export, load_exported, write_card
from harness.models.gguf_export import GGUF_DTYPES, GGUFRefused, write_gguf
from harness.run import load_and_prune

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


def _pruned(record: dict) -> list:
    """What pruning did, to compare a re-pruned run with its record: per block, the units removed
    (structured) or each masked layer's fraction of zeros (unstructured / N:M); the blocks removed (depth)."""
    if record["pruning"].get("sparsity_type") == "depth":
        return record["pruning"].get("sub_blocks_removed") or record["pruning"]["blocks_removed"]
    if "pattern" in record["pruning"]:
        return [row.get("sparsity") for row in record["pruning"]["per_layer"]]
    return [(row["attention_units_removed"], row["mlp_channels_removed"]) for row in record["pruning"]["per_layer"]]


def check_target(out: Path, run_id: str | None, overwrite: bool) -> None:
    """Before any model loads: `out` must be creatable, and empty unless it holds an earlier
    export of the same run (replaced) or `overwrite` is given."""

    try:
        writable_dir("--out", out)
    except ConfigError as e:
        raise SystemExit(f"harness export: {e}") from None
    if out.is_file():
        raise SystemExit(f"harness export: --out {out} is a file; accepted: a folder (new, empty, or an earlier export)")
    if not out.is_dir() or not any(out.iterdir()) or overwrite:
        return
    earlier = out / "record.json"
    if earlier.exists() and run_id is not None and json.loads(earlier.read_text()).get("run_id") == run_id:
        log.info("replacing the earlier export of run %s in %s", run_id, out)
        return
    raise SystemExit(f"harness export: --out {out} is not empty and holds no earlier export of this run; "
                     "accepted: a new or empty folder, or --overwrite to write into it anyway")


def model_for(record_path: Path | None, folder: Path | None):
    """(model, tokenizer, record) for a located run."""
    from transformers import AutoTokenizer


    record = records.read(record_path) if record_path else None
    for candidate in [folder] if folder else [record_path.parent / "model", record_path.parent / "checkpoint"]:
        if candidate is not None and (candidate / "config.json").exists():
            log.info("exporting the saved model in %s", candidate)
            return load_exported(candidate), AutoTokenizer.from_pretrained(candidate), record
    if record is None or "pruning" not in record:
        raise SystemExit(f"harness export: {record_path} has no pruning entry and no saved model to export")

    log.info("no saved model for run %s: pruning again from its recorded config", record["run_id"])
    cfg = dict(record["config"], out_dir=str(record_path.parent.parent))
    run_config = schema.typed(cfg)
    device = loading.resolve_device(run_config.device)
    again: dict = {}
    held = load_and_prune(run_config, schema.as_dict(run_config), again, device,
                          loading.resolve_dtype(run_config.dtype, device))
    if _pruned(again) != _pruned(record):
        raise SystemExit(f"harness export: pruning run {record['run_id']} again removed other units (or masked other "
                         "weights) than its record lists (a changed version or nondeterministic device); export refused")
    return held.model, held.tok, record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="harness export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="run id, record, run folder, or saved-model / checkpoint folder")
    parser.add_argument("--out", type=Path, help="target folder (default: <run folder>/export)")
    parser.add_argument("--out-dir", type=Path, default=Path("results/runs"), help="where run ids are looked up")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --out folder")
    parser.add_argument("--format", choices=("hf", "gguf"), default="hf",
                        help="hf: a transformers folder; gguf: model.gguf for llama.cpp")
    parser.add_argument("--gguf-dtype", choices=GGUF_DTYPES, default="f16", help="the GGUF's weight type")
    parser.add_argument("--vocab", type=Path, help="a GGUF file to copy the tokenizer from (default: the GGUF "
                        "the run's model was loaded from)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    record_path, folder = _locate(args.run, args.out_dir)
    out = args.out or ((record_path.parent if record_path else folder.parent) / "export")
    run_id = json.loads(record_path.read_text()).get("run_id") if record_path else None
    vocab = _vocab(args.vocab, record_path) if args.format == "gguf" else None
    check_target(out, run_id, args.overwrite)
    model, tok, record = model_for(record_path, folder)
    if args.format == "gguf":
        try:
            path = write_gguf(model, out / "model.gguf", vocab, args.gguf_dtype,
                              (record or {}).get("model", {}).get("name", ""))
        except GGUFRefused as e:
            raise SystemExit(f"harness export: --format gguf refused: {e}") from None
        if record is not None:
            write_card(out, record, "gguf")
        print(f"exported to {path} (llama.cpp, {args.gguf_dtype})")
        return
    export(model, tok, out, record)
    route = json.loads((out / "config.json").read_text())["harness_pruning"]["route"]
    print(f"exported to {out} ({'stock config' if route == 'stock' else 'with modeling_pruned.py: trust_remote_code=True'})")


def _vocab(given: Path | None, record_path: Path | None) -> Path:
    """The GGUF file whose tokenizer a GGUF export copies, checked before any model loads."""
    if given is not None:
        if not given.is_file():
            raise SystemExit(f"harness export: --vocab {given} is not a file; accepted: a GGUF file with a tokenizer")
        return given
    model = records.read(record_path)["config"]["model"] if record_path else None
    if model is None or model.get("source") != "gguf" or model.get("path"):
        raise SystemExit("harness export: --format gguf copies the tokenizer from the GGUF the model was loaded from; "
                         f"this run's model source is {(model or {}).get('source', 'unknown')}: give --vocab FILE.gguf")
    from omegaconf import OmegaConf

    return loading.gguf_source(OmegaConf.create(model))


if __name__ == "__main__":
    main(sys.argv[1:])
