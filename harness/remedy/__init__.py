"""Remedies applied around the cut, behind one registry: `none`, `recovery` (the paper's
pre-pruning reconstruction, before scoring) and `bias` (FLAP's compensation, after the cut)."""

from __future__ import annotations

REMEDIES = ("none", "recovery", "bias")


def check(name: str) -> str:
    if name not in REMEDIES:
        raise ValueError(f"unknown remedy {name!r}; accepted: {', '.join(REMEDIES)}")
    return name
