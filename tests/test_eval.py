"""Perplexity protocol pinned; zero-shot offline tasks load fully and score through lm-eval."""

import copy
import json
import math

import pytest
import torch

from harness.data import evaluation_text
from harness.evaluate import windows as windows_module
from harness.evaluate.perplexity import evaluate, perplexity_of
from harness.evaluate.windows import windows


def test_windows_are_non_overlapping_and_drop_the_tail():
    ids = torch.arange(10)
    w = windows(ids, 4)
    assert w.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert windows(ids, 4, max_tokens=5).tolist() == [[0, 1, 2, 3]]


def test_bos_per_window_starts_every_window_and_keeps_the_context_length():
    ids = torch.arange(10)
    assert windows(ids, 4, bos_id=99).tolist() == [[99, 0, 1, 2], [99, 3, 4, 5], [99, 6, 7, 8]]
    assert windows(ids, 4, max_tokens=8, bos_id=99).tolist() == [[99, 0, 1, 2], [99, 3, 4, 5]]


def test_bos_placement_is_recorded_and_changes_what_is_fed(zoo):
    model, tok = zoo("tiny-llama")
    tok = copy.deepcopy(tok)
    tok.bos_token = tok.eos_token  # the zoo tokenizer has no BOS of its own
    stream = evaluate(model, tok, "ptb", "llmpruner", 64, max_tokens=64 * 8)
    window = evaluate(model, tok, "ptb", "llmpruner", 64, max_tokens=64 * 8, bos="window")
    assert (stream.bos, window.bos) == ("stream", "window")
    assert stream.windows == window.windows == 8 and stream.value != window.value
    with pytest.raises(ValueError, match="accepted: stream, window"):
        evaluate(model, tok, "ptb", "llmpruner", 64, max_tokens=64, bos="every")


def test_protocol_token_and_window_counts_are_pinned(zoo):
    """WikiText-2 test, LLM-Pruner join, tiny-llama tokenizer (no BOS added), seqlen 128."""
    _, tok = zoo("tiny-llama")
    text, split = evaluation_text("wikitext2", "llmpruner")
    assert split == "test" and len(text) == 1_294_336
    ids = tok(text)["input_ids"]
    assert len(ids) == PINNED_WIKITEXT2_TOKENS
    assert len(ids) // 128 == 4087  # windows; the 15-token tail is dropped


# Measured once with the committed tokenizer; a change means the protocol or tokenizer moved.
PINNED_WIKITEXT2_TOKENS = 523_151


@pytest.mark.parametrize("piece_rows", [None, 5])  # the whole batch in one log-softmax piece, or in pieces of 5 positions
def test_perplexity_equals_brute_force(zoo, monkeypatch, piece_rows):

    model, tok = zoo("tiny-gpt2")
    if piece_rows:
        monkeypatch.setattr(windows_module, "NLL_PIECE_BYTES", 4 * model.config.vocab_size * piece_rows)
    ids = torch.randint(0, 4096, (3 * 16 + 5,), generator=torch.Generator().manual_seed(0))
    progress: dict = {}
    ppl, n, _ = perplexity_of(model, ids, seqlen=16, batch_size=2, progress=progress)
    nll, count = [], 0
    with torch.no_grad():
        for k in range(3):
            win = ids[k * 16 : (k + 1) * 16]
            nll.append(model(win[None], labels=win[None]).loss.item() * 15)  # the model's own mean loss
            count += 15
    assert n == 3 and ppl == pytest.approx(math.exp(sum(nll) / count), rel=1e-5)
    assert progress["nll_windows"] == pytest.approx(nll, rel=1e-5)  # each window's own sum


def test_stored_window_sums_reproduce_the_recorded_perplexity(zoo):
    from harness import uncertainty

    model, tok = zoo("tiny-llama")
    r = evaluate(model, tok, "ptb", "llmpruner", 64, batch_size=3, max_tokens=64 * 40)
    nll = uncertainty.decode_floats(r.nll_windows)
    assert len(nll) == r.windows == 40 and r.tokens_per_window == 63
    assert math.exp(math.fsum(nll) / (40 * 63)) == r.value  # exactly
    assert math.exp(nll.sum() / (40 * 63)) == pytest.approx(r.value, rel=1e-12)  # any summation order
    assert r.interval == uncertainty.ppl_interval(nll, 63) and r.interval["low"] < r.value < r.interval["high"]
    assert r.interval_delta["low"] < r.value < r.interval_delta["high"]


class _Killed(Exception):
    pass


def test_interrupted_perplexity_resumes_to_the_uninterrupted_value(zoo):
    """The loop is cut after 2 of 5 batches (as a signal would); resuming from the progress
    it left runs only the other 3 batches and returns the uninterrupted value exactly."""
    model, _ = zoo("tiny-gpt2")
    ids = torch.randint(0, 4096, (10 * 16,), generator=torch.Generator().manual_seed(1))
    whole, n, _ = perplexity_of(model, ids, seqlen=16, batch_size=2)
    calls, kill_at = [], [3]

    def forward(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        if len(calls) == kill_at[0]:
            raise _Killed
        return model(*args, **kwargs)

    forward.parameters = model.parameters
    progress: dict = {}
    with pytest.raises(_Killed):
        perplexity_of(forward, ids, seqlen=16, batch_size=2, progress=progress)
    assert progress["windows_done"] == 4 and progress["tokens"] == 4 * 15
    saved = json.loads(json.dumps(progress))  # what the record holds
    calls.clear()
    kill_at[0] = None
    resumed, n2, _ = perplexity_of(forward, ids, seqlen=16, batch_size=2, progress=saved)
    assert calls == [2, 2, 2] and n2 == n == 10
    assert resumed == whole
    # Progress from another window layout is not reused.
    other = {**saved, "windows_total": 99}
    assert perplexity_of(model, ids, seqlen=16, batch_size=2, progress=other)[0] == whole


def test_evaluate_records_protocol(zoo):
    model, tok = zoo("tiny-llama")
    r = evaluate(model, tok, "ptb", "llmpruner", seqlen=128, max_tokens=1024)
    assert (r.split, r.windows, r.tokens, r.seqlen) == ("validation", 8, 1024, 128)
    assert r.stream_tokens > 100_000 and 1 < r.value < 4096  # trained: far below uniform


EXPECTED_SIZES = {"boolq": 3270, "piqa": 1838, "hellaswag": 10042, "winogrande": 1267,
                  "arc_easy": 2376, "arc_challenge": 1172, "openbookqa": 500}


@pytest.mark.parametrize("task", list(EXPECTED_SIZES))
def test_offline_task_loads_all_examples(task):
    from harness.data.zeroshot_tasks import _docs

    docs = _docs(task)
    assert len(docs) == EXPECTED_SIZES[task]


def test_task_by_task_equals_one_lm_eval_call_and_resumes(zoo, monkeypatch):
    """Per-task calls (so an interrupted evaluation keeps its finished tasks) score exactly
    what one lm-eval call over all tasks scores; a resumed call evaluates only the rest."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from harness.data.zeroshot_tasks import offline_task_dir
    from harness.evaluate.zeroshot import evaluate as zs_evaluate

    model, tok = zoo("tiny-llama")
    tasks = ["piqa", "arc_easy", "winogrande"]
    cfg = {"tasks": tasks, "limit": 6, "batch_size": 4, "source": "offline"}
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=4, add_bos_token=False)
    whole = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=0, limit=6, bootstrap_iters=100,
                                    task_manager=TaskManager(include_path=str(offline_task_dir(tasks)),
                                                             include_defaults=False), log_samples=True)
    samples, whole = whole["samples"], whole["results"]

    real, called, saved = lm_eval.simple_evaluate, [], []

    def dies_on_the_second_task(**kw):
        called.append(kw["tasks"])
        if len(called) == 2:
            raise KeyboardInterrupt
        return real(**kw)

    monkeypatch.setattr(lm_eval, "simple_evaluate", dies_on_the_second_task)
    out = {}
    with pytest.raises(KeyboardInterrupt):
        zs_evaluate(model, tok, cfg, out, save=lambda: saved.append(set(out["zeroshot"])))
    assert saved == [{"piqa"}] and set(out["zeroshot"]) == {"piqa"} and "zeroshot_avg" not in out

    monkeypatch.setattr(lm_eval, "simple_evaluate", lambda **kw: called.append(kw["tasks"]) or real(**kw))
    zs_evaluate(model, tok, cfg, out)
    assert called == [["piqa"], ["arc_easy"], ["arc_easy"], ["winogrande"]]
    for t in tasks:
        assert out["zeroshot"][t]["acc"] == whole[t]["acc,none"], t
        assert out["zeroshot"][t]["acc_norm"] == whole[t].get("acc_norm,none"), t  # winogrande has none
        assert out["zeroshot"][t]["acc_stderr"] == whole[t]["acc_stderr,none"], t  # lm-eval's own
    _check_per_question_bits(out, samples)


def _check_per_question_bits(out: dict, samples: dict) -> None:
    """The stored bits are lm-eval's logged per-question scores in doc order; their mean is the
    accuracy and their sample stderr lm-eval's; the average's se combines the tasks'."""
    from harness import uncertainty

    for task, entry in out["zeroshot"].items():
        by_doc = sorted(samples[task], key=lambda s: s["doc_id"])
        for metric in ("acc", "acc_norm"):
            if entry.get(metric) is None:
                continue
            bits = uncertainty.decode_bits(entry["correct"][metric], entry["n"])
            assert bits.tolist() == [bool(s[metric]) for s in by_doc], (task, metric)
            assert bits.mean() == pytest.approx(entry[metric], abs=1e-12)
            assert uncertainty.accuracy_stderr(bits) == pytest.approx(entry[f"{metric}_stderr"], rel=1e-12)
    averaged = out["zeroshot_protocol"]["average_metrics"]
    ses = [e[f"{averaged[t]}_stderr"] if e.get(averaged[t]) is not None else e["acc_stderr"]
           for t, e in out["zeroshot"].items()]
    assert out["zeroshot_avg_stderr"] == pytest.approx(math.sqrt(sum(se * se for se in ses)) / len(ses))


def test_lm_eval_scores_every_task_on_a_few_examples(zoo):
    from harness.evaluate.zeroshot import TASKS, fitting_batch_size
    from harness.evaluate.zeroshot import evaluate as zs_evaluate

    model, tok = zoo("tiny-llama")
    r = zs_evaluate(model, tok, {"tasks": list(TASKS), "limit": 4, "batch_size": None})  # sized to the device
    assert set(r["zeroshot"]) == set(TASKS)
    for task, v in r["zeroshot"].items():
        assert v["n"] == 4 and 0 <= v["acc"] <= 1, task
        assert v["batch_size"] == fitting_batch_size(model) and v["tokens_per_second"] > 0, task
    assert r["zeroshot_protocol"]["source"] == "offline"
    assert 0 <= r["zeroshot_avg"] <= 1


def test_zero_shot_batch_fits_half_the_free_memory(zoo):
    from harness.evaluate.zeroshot import MAX_BATCH, REQUEST_TOKENS, fitting_batch_size

    model, _ = zoo("tiny-llama")
    cfg = model.config
    per_sample = (3 * cfg.vocab_size + 4 * max(cfg.intermediate_size, 4 * cfg.hidden_size)) * 4 * REQUEST_TOKENS
    assert fitting_batch_size(model, free_bytes=2 * 5 * per_sample + 1) == 5
    assert fitting_batch_size(model, free_bytes=per_sample) == 1  # never below one
    assert fitting_batch_size(model, free_bytes=10**15) == MAX_BATCH
