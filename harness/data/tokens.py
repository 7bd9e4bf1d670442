"""Text -> token ids, memoised within a process.

A sweep run by Hydra's basic launcher evaluates every configuration in one process, each
with a freshly loaded copy of the same tokenizer, and re-tokenising WikiText-2 costs more
than pruning and evaluating a small model. The memo is keyed by content (the tokenizer's
serialised definition and its special-token settings, a hash of the text), never by object,
so a hit is exactly what tokenising again would give; it keeps the last few streams only."""

from __future__ import annotations

import contextlib
import hashlib
import weakref
from collections import OrderedDict

import torch

_KEPT_STREAMS = 8
_streams: OrderedDict[tuple, torch.Tensor] = OrderedDict()
_fingerprints: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def fingerprint(tokenizer) -> str | None:
    """A hash of what decides the tokenizer's output; None where it cannot be serialised."""
    try:
        return _fingerprints[tokenizer]
    except (KeyError, TypeError):
        pass
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    settings = repr((type(tokenizer).__name__, getattr(tokenizer, "add_bos_token", None),
                     getattr(tokenizer, "add_eos_token", None), sorted(tokenizer.special_tokens_map.items())))
    value = hashlib.sha256((backend.to_str() + settings).encode()).hexdigest()
    with contextlib.suppress(TypeError):  # not weak-referenceable: hashed again next time
        _fingerprints[tokenizer] = value
    return value


def token_ids(tokenizer, text: str, add_special_tokens: bool) -> torch.Tensor:
    """LongTensor [n] of `text`'s ids; callers must not modify it (it may be shared)."""
    tok = fingerprint(tokenizer)
    key = (tok, hashlib.sha256(text.encode()).hexdigest(), add_special_tokens)
    if tok is not None and key in _streams:
        _streams.move_to_end(key)
        return _streams[key]
    ids = torch.tensor(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"], dtype=torch.long)
    if tok is not None:
        _streams[key] = ids
        while len(_streams) > _KEPT_STREAMS:
            _streams.popitem(last=False)
    return ids


# Where BOS goes: once at the stream start as the tokenizer adds it, or at the start of every window.
BOS_PLACEMENTS = ("stream", "window")


def bos_token_id(tokenizer, bos: str) -> int | None:
    """The id to start every window with (`bos=window`), or None (`bos=stream`)."""
    if bos not in BOS_PLACEMENTS:
        raise ValueError(f"unknown bos placement {bos!r}; accepted: {', '.join(BOS_PLACEMENTS)}")
    if bos == "stream":
        return None
    if tokenizer.bos_token_id is None:
        raise ValueError("bos=window but the tokenizer has no BOS token; use bos=stream")
    return tokenizer.bos_token_id
