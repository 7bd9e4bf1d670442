"""Figures from the runs frame and the records: perplexity against sparsity or calibration
size (Figure 4), the perplexity ratio to dense against model size and the head-similarity
graph of one block (Figure 3)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from harness import depth, metrics
from harness.collect.frame import METHOD, ppl_columns, rows_of
from harness.collect.scale import method_rows, model_sizes


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: Path, stem: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.{ext}" for ext in ("png", "pdf")]
    for p in paths:
        fig.savefig(p, dpi=150, bbox_inches="tight")  # the canvas grows to hold an outside legend
    fig.clear()
    return paths


# One colour per metric (fixed across figures), one line style per remedy, one marker per
# remaining variant (allocation, attention unit, ...): 9 metrics x 3 remedies stay legible,
# and a metric keeps its colour everywhere.
_STYLE = {"none": "-", "bias": "--", "recovery": ":"}
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


_PALETTE = ("C0", "C1", "C2", "C3", "C4", "C5", "C6", "C8", "C9")  # tab10 without its grey (C7)


def _known() -> list[str]:
    return metrics.names() + [m for m in depth.names() if m not in metrics.names()]


def _colour(metric: str) -> str:
    known = _known()
    return _PALETTE[known.index(metric) % len(_PALETTE)] if metric in known else "black"


def _distinct_colours(present) -> dict[str, str]:
    """A colour per metric of one figure, none shared (in the registries' order, so the same
    set of metrics is coloured alike in every figure)."""
    known = _known()
    ordered = sorted(set(present), key=lambda m: (known.index(m) if m in known else len(known), m))
    return {m: _PALETTE[i % len(_PALETTE)] for i, m in enumerate(ordered)}


def plot_ppl_vs(df: pd.DataFrame, out: Path, x: str, fixed: list[str], stem: str) -> list[Path]:
    """One figure per (model, fixed..., dataset): perplexity against `x`, a line per method
    (colour: metric, line style: remedy, marker: allocation) and the dense model's value as a
    grey reference line; only where some method has at least two values of `x`."""
    plt = _pyplot()
    from matplotlib.lines import Line2D

    paths = []
    pruned, dense = df[df["sparsity"] > 0], df[df["sparsity"] == 0]
    for key, sub in pruned.groupby(["model", *fixed]):
        methods = rows_of(sub, METHOD, exclude=(x, *fixed))
        key = key if isinstance(key, tuple) else (key,)
        if sub.groupby(methods)[x].nunique().max() < 2:
            continue
        lines = list(sub.groupby(methods))
        reference = dense[(dense["model"] == key[0]) & dense["ppl_tokens"].isin(sub["ppl_tokens"].unique())]
        for col in ppl_columns(sub):
            fig, ax = plt.subplots(figsize=(5.5, 3.5))
            variant_of = {}
            for method, g in lines:
                parts = dict(zip(methods, method if isinstance(method, tuple) else (method,), strict=True))
                variant = " ".join(f"{v}" for k, v in parts.items() if k not in ("metric", "remedy"))
                marker = _MARKERS[variant_of.setdefault(variant, len(variant_of)) % len(_MARKERS)]
                g = error_bars(g, x, col)
                colour = _colour(parts["metric"])
                _line_with_bars(ax, g, colour, parts["remedy"], marker)
            handles = [Line2D([], [], color=_colour(m), label=m) for m in sorted(set(sub["metric"]))]
            handles += [Line2D([], [], color="black", linestyle=_STYLE.get(r, "-."), label=f"remedy={r}")
                        for r in sorted(set(sub["remedy"]))]
            if len(variant_of) > 1:
                handles += [Line2D([], [], color="black", linestyle="none", marker=_MARKERS[i % len(_MARKERS)],
                                   label=variant) for variant, i in variant_of.items()]
            if col in reference and reference[col].notna().any():
                value = reference[col].mean()
                ax.axhline(value, color="grey", linewidth=1.5, linestyle=(0, (1, 3)))
                handles.append(Line2D([], [], color="grey", linewidth=1.5, linestyle=(0, (1, 3)), label=f"dense {value:.2f}"))
            settings = " ".join(f"{f}={k:g}" if isinstance(k, float) else f"{f}={k}"
                                for f, k in zip(fixed, key[1:], strict=True))
            ax.set(xlabel=x, ylabel=f"{col.removeprefix('ppl.')} perplexity", yscale="log")
            ax.set_title(f"{key[0]}\n{settings}\nbars: mean +- sd over seeds, or one run's 95% interval", fontsize=8)
            if x == "n_samples":
                ax.set_xscale("log", base=2)
            ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
            suffix = "_".join(f"{k:g}" if isinstance(k, float) else str(k) for k in key)
            paths += _save(fig, out, f"{stem}_{suffix}_{col.removeprefix('ppl.')}")
            plt.close(fig)
    return paths


def _line_with_bars(ax, bars: pd.DataFrame, colour: str, remedy: str, marker: str, label: str | None = None) -> None:
    """One method's line through error_bars' means (line style: its remedy), with its bars."""
    ax.plot(bars.index, bars["mean"], color=colour, linestyle=_STYLE.get(remedy, "-."), marker=marker, markersize=4,
            label=label)
    ax.errorbar(bars.index, bars["mean"], yerr=[bars["mean"] - bars["low"], bars["high"] - bars["mean"]], color=colour,
                linestyle="none", capsize=2, linewidth=0.8)


def error_bars(runs: pd.DataFrame, x: str, col: str) -> pd.DataFrame:
    """Per value of `x`: the mean of `col` over its runs (seeds) and the bar around it: mean +- sd
    over two or more seeds, else the one run's own 95% evaluation interval (none in older records)."""
    rows = {}
    for value, g in runs.dropna(subset=[col]).groupby(x):
        seeds = g.groupby("seed")[col].mean()  # repeated runs of one seed are one sample
        mean = seeds.mean()
        if len(seeds) > 1:
            sd = seeds.std(ddof=1)
            low, high = mean - sd, mean + sd
        elif f"{col}.low" in g and g[f"{col}.low"].notna().all():
            low, high = g[f"{col}.low"].iloc[0], g[f"{col}.high"].iloc[0]
        else:
            low = high = mean
        rows[value] = {"mean": mean, "low": low, "high": high, "n": len(seeds)}
    return pd.DataFrame.from_dict(rows, orient="index", columns=["mean", "low", "high", "n"]).sort_index()


def plot_ratio_vs_size(ratios: pd.DataFrame, out: Path) -> list[Path]:
    """Per (sparsity, dataset) with two or more models (scale.ratio_frame's runs): perplexity as
    a ratio to the model's dense run against the dense model's parameter count, a line per
    method (colour: metric, distinct within the figure; line style: remedy; marker: the rest);
    bars as in plot_ppl_vs (sd over seeds, or one run's paired interval against its dense run)."""
    if ratios.empty:
        return []
    plt = _pyplot()
    paths = []
    for sparsity, sub in ratios.groupby("sparsity"):
        if sub["model"].nunique() < 2:
            continue
        methods = method_rows(sub)
        colours = _distinct_colours(sub["metric"])
        for col in ppl_columns(sub):
            fig, ax = plt.subplots(figsize=(5.5, 3.5))
            variant_of: dict[str, int] = {}
            for method, g in sub.groupby(methods, dropna=False):
                parts = dict(zip(methods, method if isinstance(method, tuple) else (method,), strict=True))
                variant = _variant(parts, sub)
                marker = _MARKERS[variant_of.setdefault(variant, len(variant_of)) % len(_MARKERS)]
                g = error_bars(g, "params_dense", col)
                if g.empty:
                    continue
                colour = colours[parts["metric"]]
                label = " ".join(p for p in (parts["metric"], variant) if p)
                label += "" if parts["remedy"] == "none" else f" + {parts['remedy']}"
                _line_with_bars(ax, g, colour, parts["remedy"], marker, label)
            _size_axes(ax, sub, col)
            allocation = f", {sub['allocation'].iloc[0]} allocation" if sub["allocation"].nunique() == 1 else ""
            ax.set_title(f"{sparsity:.0%} of the parameters removed{allocation}\nbars: mean +- sd over seeds, or one "
                         "run's 95% interval paired against its dense run", fontsize=8)
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
            paths += _save(fig, out, f"ppl_ratio_vs_size_{sparsity:g}_{col.removeprefix('ppl.')}")
            plt.close(fig)
    return paths


def _variant(parts: dict, runs: pd.DataFrame) -> str:
    """What tells a line apart besides its metric and remedy: `key=value` of the other row keys
    that vary (the track where it does: `depth` / `structured`)."""
    shown = [f"{k}={v}" for k, v in parts.items()
             if k not in ("metric", "remedy", "sparsity_type") and runs[k].nunique(dropna=False) > 1]
    if runs["sparsity_type"].nunique() > 1:
        shown.insert(0, f"({parts['sparsity_type']})")
    return " ".join(shown)


def _size_axes(ax, runs: pd.DataFrame, col: str) -> None:
    """Log-log axes: one tick per model at its dense parameter count, the dense level (1) dotted."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.axhline(1.0, color="grey", linewidth=1.5, linestyle=(0, (1, 3)))
    sizes = model_sizes(runs)
    ax.set_xscale("log")
    ax.set_xticks(sizes.values, [f"{m}\n{n / 1e6:.0f}M" for m, n in sizes.items()], fontsize=6)
    ax.minorticks_off()
    ax.set(xlabel="dense model (parameters)", ylabel=f"{col.removeprefix('ppl.')} perplexity / dense", yscale="log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _heads_per_unit(layer: dict, n_heads: int) -> int:
    removed = len(layer["attention_units_removed"])
    return (n_heads - layer["heads_kept"]) // removed if removed else 1


def plot_head_graph(rec: dict, out: Path, layer: int | None = None, tau: float | None = None) -> list[Path]:
    """Figure 3: the heads of one block as nodes, an edge where their mean JS distance is below
    tau (default: the median over the block's head pairs); removed heads are drawn filled."""
    import math

    plt = _pyplot()
    layers = {lay["layer"]: lay for lay in rec["pruning"]["per_layer"] if "head_divergence" in lay}
    if not layers:
        return []
    if layer is None:
        layer = sorted(layers)[len(layers) // 2]
    if layer not in layers:
        raise ValueError(f"run {rec['run_id']} has no head divergences for block {layer}; blocks with them: {sorted(layers)}")
    lay = layers[layer]
    div = lay["head_divergence"]
    n = len(div)
    pairs = [(div[i][j], i, j) for i in range(n) for j in range(i + 1, n)]
    if tau is None:
        tau = sorted(d for d, _, _ in pairs)[len(pairs) // 2]
    hpu = _heads_per_unit(lay, n)
    removed = {u * hpu + k for u in lay["attention_units_removed"] for k in range(hpu)}
    pos = [(math.cos(2 * math.pi * i / n), math.sin(2 * math.pi * i / n)) for i in range(n)]
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for d, i, j in pairs:
        if d < tau:
            ax.plot([pos[i][0], pos[j][0]], [pos[i][1], pos[j][1]], color="tab:blue", lw=0.6 + 2.5 * (1 - d / tau), zorder=1)
    for i, (px, py) in enumerate(pos):
        ax.scatter(px, py, s=420, zorder=2, color="tab:red" if i in removed else "white", edgecolors="black")
        ax.annotate(str(i), (px, py), ha="center", va="center", fontsize=8, zorder=3)
    cfg = rec["config"]
    ax.set_title(f"{cfg['model']['name']} block {layer}: JS distance < {tau:.3f}\n(filled: removed by {cfg['metric']['name']})", fontsize=9)
    ax.set_axis_off()
    ax.set_aspect("equal")
    paths = _save(fig, out, f"head_similarity_{cfg['model']['name']}_block{layer}_{rec['run_id']}")
    plt.close(fig)
    return paths


def figure3_records(recs: list[dict], run_id: str | None) -> list[dict]:
    """The run to draw per model: `run_id`, else the first run (by id) with head divergences."""
    if run_id is not None:
        chosen = [r for r in recs if r["run_id"] == run_id]
        if not chosen:
            raise ValueError(f"no complete record with run id {run_id!r}")
        return chosen
    first: dict[str, dict] = {}
    for r in sorted(recs, key=lambda r: r["run_id"]):
        if any("head_divergence" in lay for lay in r["pruning"]["per_layer"]):
            first.setdefault(r["config"]["model"]["name"], r)
    return list(first.values())


