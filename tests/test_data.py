"""Data layer: fallbacks in order, clear errors naming every place looked, corruption detected."""

import copy
import json

import pytest

from harness.data import corpora


@pytest.fixture(autouse=True)
def _fresh_cache():
    corpora.documents.cache_clear()
    yield
    corpora.documents.cache_clear()


def test_wikitext2_test_from_data_dir_matches_checksum():
    rows = corpora.documents("wikitext2", "test")
    assert len(rows) == 4358


def test_missing_data_names_every_place(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_DATA_DIR", str(tmp_path))
    with pytest.raises(corpora.DataNotFoundError) as e:
        corpora.documents("wikitext2", "train", data_dir=str(tmp_path / "other"))
    msg = str(e.value)
    assert "hub Salesforce/wikitext" in msg
    assert str(tmp_path / "other" / "wikitext-2-raw-v1" / "train.jsonl") in msg
    assert str(tmp_path / "wikitext-2-raw-v1" / "train.jsonl") in msg
    assert "HARNESS_DATA_DIR" in msg


def test_truncated_jsonl_is_reported(tmp_path):
    d = tmp_path / "wikitext-2-raw-v1"
    d.mkdir()
    (d / "train.jsonl").write_text(json.dumps({"text": "a"}) + "\n" + '{"text": "trunc')
    with pytest.raises(corpora.CorruptDataError, match="train.jsonl:2"):
        corpora.documents("wikitext2", "train", data_dir=str(tmp_path))


def test_wrong_checksum_is_reported(tmp_path):
    d = tmp_path / "wikitext-2-raw-v1"
    d.mkdir()
    (d / "test.jsonl").write_text(json.dumps({"text": "not wikitext"}) + "\n")
    with pytest.raises(corpora.CorruptDataError, match="sha256"):
        corpora.documents("wikitext2", "test", data_dir=str(tmp_path))


def test_ptb_falls_back_to_pip_package():
    rows = corpora.documents("ptb", "test")
    assert sum(len(r.split()) + 1 for r in rows) == 82_430  # words with <eos>, as DATA.md


def test_unknown_corpus_and_protocol_list_accepted():
    with pytest.raises(ValueError, match="accepted: wikitext2, ptb, c4"):
        corpora.documents("nope", "test")
    with pytest.raises(ValueError, match="accepted: llmpruner, gptq"):
        corpora.evaluation_text("ptb", "nope")


def test_calibration_is_seeded_and_shaped(zoo):
    from harness.data import calibration

    _, tok = zoo("tiny-llama")
    a = calibration.batches(tok, "c4", 4, 32, seed=1)
    b = calibration.batches(tok, "c4", 4, 32, seed=1)
    c = calibration.batches(tok, "c4", 4, 32, seed=2)
    assert a.shape == (4, 32) and a.equal(b) and not a.equal(c)


def test_selfgen_samples_from_the_model(zoo):
    from harness.data import calibration

    model, tok = zoo("tiny-llama")
    ids = calibration.batches(tok, "selfgen", 3, 16, seed=0, model=model)
    assert ids.shape == (3, 16) and ids.equal(calibration.batches(tok, "selfgen", 3, 16, seed=0, model=model))


def test_calibration_with_bos_per_window_starts_each_sample_with_bos(zoo):
    from harness.data import calibration

    _, tok = zoo("tiny-llama")
    tok = copy.deepcopy(tok)
    tok.bos_token = tok.eos_token  # the zoo tokenizer has no BOS of its own
    ids = calibration.batches(tok, "ptb", 4, 32, seed=1, bos="window")
    plain = calibration.batches(tok, "ptb", 4, 32, seed=1)
    assert ids.shape == (4, 32) and (ids[:, 0] == tok.bos_token_id).all()
    assert (plain[:, 0] != tok.bos_token_id).any()
    # the rest of each sample is one contiguous span of the tokenised text
    text = tok("\n\n".join(corpora.documents("ptb", "train")[:4000]), add_special_tokens=False)["input_ids"]
    joined = " ".join(map(str, text))
    assert all(" ".join(map(str, row[1:].tolist())) in joined for row in ids)


def test_memoised_token_ids_equal_tokenising_again_and_follow_the_tokenizer(zoo):
    from transformers import AutoTokenizer

    from harness.data import tokens

    _, tok = zoo("tiny-llama")
    text = "\n\n".join(corpora.documents("ptb", "validation")[:200])
    fresh = tokens.token_ids(tok, text, add_special_tokens=False)
    again_by_a_new_copy = tokens.token_ids(AutoTokenizer.from_pretrained(tok.name_or_path), text, False)
    assert again_by_a_new_copy is fresh  # a hit across copies of one tokenizer ...
    assert fresh.tolist() == tok(text, add_special_tokens=False)["input_ids"]  # ... equals tokenising again
    assert tokens.fingerprint(zoo("tiny-gpt2")[1]) == tokens.fingerprint(tok)  # the zoo shares one tokenizer
    with_bos = tokens.token_ids(tok, text, add_special_tokens=True)
    assert with_bos.tolist() == tok(text)["input_ids"]
    changed = copy.deepcopy(tok)
    changed.add_tokens(["the"])  # one more token: a different key, different ids
    assert tokens.fingerprint(changed) != tokens.fingerprint(tok)
    assert tokens.token_ids(changed, text, False).tolist() == changed(text, add_special_tokens=False)["input_ids"] != fresh.tolist()
