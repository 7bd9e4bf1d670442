"""Perplexity protocol pinned; zero-shot offline tasks load fully and score through lm-eval."""

import math

import pytest
import torch
import torch.nn.functional as F

from harness.data import evaluation_text
from harness.evaluate.perplexity import evaluate, perplexity_of, windows


def test_windows_are_non_overlapping_and_drop_the_tail():
    ids = torch.arange(10)
    w = windows(ids, 4)
    assert w.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert windows(ids, 4, max_tokens=5).tolist() == [[0, 1, 2, 3]]


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


def test_perplexity_equals_brute_force(zoo):
    model, tok = zoo("tiny-gpt2")
    ids = torch.randint(0, 4096, (3 * 16 + 5,), generator=torch.Generator().manual_seed(0))
    ppl, n, _ = perplexity_of(model, ids, seqlen=16, batch_size=2)
    nll, count = 0.0, 0
    with torch.no_grad():
        for k in range(3):
            win = ids[k * 16 : (k + 1) * 16]
            logits = model(win[None]).logits[0, :-1]
            nll += F.cross_entropy(logits, win[1:], reduction="sum").item()
            count += 15
    assert n == 3 and ppl == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_evaluate_records_protocol(zoo):
    model, tok = zoo("tiny-llama")
    r = evaluate(model, tok, "ptb", "llmpruner", seqlen=128, max_tokens=1024)
    assert (r.split, r.windows, r.tokens, r.seqlen) == ("validation", 8, 1024, 128)
    assert r.stream_tokens > 100_000 and 1 < r.value < 4096  # trained: far below uniform


EXPECTED_SIZES = {"boolq": 3270, "piqa": 1838, "hellaswag": 10042, "winogrande": 1267,
                  "arc_easy": 2376, "arc_challenge": 1172, "openbookqa": 500}


@pytest.mark.parametrize("task", list(EXPECTED_SIZES))
def test_offline_task_loads_all_examples(task):
    from harness.evaluate.zeroshot import _docs

    docs = _docs(task)
    assert len(docs) == EXPECTED_SIZES[task]


def test_lm_eval_scores_every_task_on_a_few_examples(zoo):
    from harness.evaluate.zeroshot import TASKS
    from harness.evaluate.zeroshot import evaluate as zs_evaluate

    model, tok = zoo("tiny-llama")
    r = zs_evaluate(model, tok, {"tasks": list(TASKS), "limit": 4, "batch_size": 8})
    assert set(r["zeroshot"]) == set(TASKS)
    for task, v in r["zeroshot"].items():
        assert v["n"] == 4 and 0 <= v["acc"] <= 1, task
    assert r["zeroshot_protocol"]["source"] == "offline"
    assert 0 <= r["zeroshot_avg"] <= 1
