"""Experiment tracking (Weights & Biases) and the console summary.

Mode `auto`: online when credentials exist (WANDB_API_KEY or a netrc entry), otherwise
offline (files under the run folder; `wandb sync` later). A wandb failure is logged and
never fails the run or touches the local record.
"""

from __future__ import annotations

import logging
import math
import netrc
import os
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)


def _has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def resolve_mode(mode: str) -> str:
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if mode == "auto":
        return "online" if _has_credentials() else "offline"
    return mode


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


class Tracker:
    """Thin wrapper: every call is a no-op once wandb failed or when disabled. `status` says
    where the run's tracking went (it is written into the record)."""

    def __init__(self, run=None, status: str = "none"):
        self.run, self.status = run, status

    def summary(self, metrics: dict) -> None:
        if self.run is None:
            return
        try:
            for k, v in flatten(metrics).items():
                self.run.summary[k] = v
        except Exception as e:  # noqa: BLE001
            log.warning("wandb summary failed: %s", e)

    def save_record(self, path: Path) -> None:
        """Upload the result record with the run, so `harness collect --wandb` can read it back."""
        if self.run is None:
            return
        try:
            self.run.save(str(path), base_path=str(path.parent), policy="now")
        except Exception as e:  # noqa: BLE001
            log.warning("wandb save of the record failed: %s", e)

    def table(self, key: str, rows: list[dict]) -> None:
        if self.run is None or not rows:
            return
        try:
            import wandb

            cols = list(rows[0])
            self.run.log({key: wandb.Table(columns=cols, data=[[r.get(c) for c in cols] for r in rows])})
        except Exception as e:  # noqa: BLE001
            log.warning("wandb table failed: %s", e)


def _init(wandb, logger_cfg: dict, mode: str, **kwargs):
    return wandb.init(project=logger_cfg.get("project", "harness"), entity=logger_cfg.get("entity"), mode=mode,
                      settings=wandb.Settings(silent=True, init_timeout=float(logger_cfg.get("init_timeout_s", 15))),
                      **kwargs)


@contextmanager
def tracking(logger_cfg: dict, config: dict, run_id: str, group: str, out_dir: Path):
    """A Tracker; online without a reachable server falls back to offline after init_timeout_s."""
    if logger_cfg.get("name", "none") == "none":
        yield Tracker()
        return
    run, status = None, "none"
    try:
        import wandb

        out_dir.mkdir(parents=True, exist_ok=True)
        kwargs = dict(group=group, job_type="prune_eval", name=run_id, id=run_id, resume="allow", dir=str(out_dir),
                      config=flatten(config))
        mode = resolve_mode(logger_cfg.get("mode", "auto"))
        try:
            run, status = _init(wandb, logger_cfg, mode, **kwargs), f"wandb {mode}"
        except Exception as e:  # noqa: BLE001 - no server: keep the run's data locally instead
            if mode != "online":
                raise
            log.warning("wandb online init failed (%s); logging offline under %s, `wandb sync` it later", e, out_dir)
            wandb.teardown()  # the failed online attempt still holds the run id
            run = _init(wandb, logger_cfg, "offline", **kwargs)
            status = f"wandb offline, not uploaded (online init failed: {str(e).splitlines()[0][:200]})"
        if mode == "offline" and status == "wandb offline":
            status = "wandb offline, not uploaded (`wandb sync` the run folder)"
    except Exception as e:  # noqa: BLE001 - tracking must never fail a run
        log.warning("wandb.init failed, continuing without tracking: %s", e)
        run, status = None, f"none (wandb init failed: {str(e).splitlines()[0][:200] if str(e) else type(e).__name__})"
    try:
        yield Tracker(run, status)
    finally:
        if run is not None:
            try:
                run.finish()
            except Exception as e:  # noqa: BLE001
                log.warning("wandb finish failed: %s", e)


def _sparsity_line(p: dict) -> str:
    if p.get("sparsity_type") == "depth":
        return (f"sparsity   depth: blocks {p['blocks_removed']} removed ({p['n_blocks_removed']}), achieved "
                f"{p['sparsity_achieved']:.3f} of the model  in {p['seconds']:.1f} s")
    if p.get("sparsity_type", "structured") != "structured":  # masked in place
        return (f"sparsity   {p['sparsity_type']} {p['pattern']}  achieved {p['sparsity_achieved']:.3f} of the pruned "
                f"linear layers ({p['sparsity_of_model']:.3f} of the model)  in {p['seconds']:.1f} s")
    return (f"sparsity   target {p['sparsity_target']:.3f} ({p['sparsity_mode']})  achieved {p['sparsity_achieved']:.3f}"
            f"  module ratio {p['module_ratio']}  in {p['seconds']:.1f} s")


def _interval(interval: dict | None, fmt: str) -> str:
    """`  [95% low, high]`, or nothing where the record has none."""
    if not interval or interval.get("low") is None or not math.isfinite(interval["low"]):
        return ""  # none kept, or too few windows for one (null in the JSON record)
    return f"  [{interval['level']:.0%} {interval['low']:{fmt}}, {interval['high']:{fmt}}]"


def _se(stderr: float | None) -> str:
    return "" if stderr is None else f" +- {stderr:.4f}"


def summary_text(record: dict) -> str:
    m, p, ev = record["model"], record["pruning"], record["eval"]
    cfg = record["config"]
    lines = [
        f"run {record['run_id']}  [{record['status']}]",
        f"model      {m['id']}  params {m['params_before']:,} -> {m['params_after']:,}",
        f"pruning    metric={p.get('method', cfg['metric']['name'])} remedy={cfg['remedy']['name']} allocation={cfg['allocation']['name']} "
        f"calibration={cfg['calibration']['dataset']}x{cfg['calibration']['n_samples']}",
        _sparsity_line(p),
    ]
    ft = record.get("finetune")
    if ft:
        lines.append(f"finetune   {ft['method']} rank {ft['rank']}, {ft['steps']} steps x {ft['batch_size']} on "
                     f"{ft['data']['dataset']} ({ft['tokens']:,} tokens, {ft['seconds']:.0f} s), "
                     f"loss {ft['loss_first']:.3f} -> {ft['loss_last']:.3f}, merged")
    for name, r in ev.get("ppl", {}).items():
        lines.append(f"ppl        {name:10s} {r['value']:10.3f}{_interval(r.get('interval'), '.2f')}  ({r['split']}, "
                     f"seqlen {r['seqlen']}, {r['tokens']:,} tokens)")
    for task, r in ev.get("zeroshot", {}).items():
        norm = "" if r.get("acc_norm") is None else f"  acc_norm {r['acc_norm']:.4f}{_se(r.get('acc_norm_stderr'))}"
        lines.append(f"zero-shot  {task:14s} acc {r['acc']:.4f}{_se(r.get('acc_stderr'))}{norm}  (n={r['n']})")
    if "zeroshot_avg" in ev:
        lines.append(f"zero-shot  {len(ev.get('zeroshot', {}))}-task average {ev['zeroshot_avg']:.4f}{_se(ev.get('zeroshot_avg_stderr'))}"
                     f"{_interval(ev.get('zeroshot_avg_interval'), '.4f')} (metric per task: see record)")
    eff = ev.get("efficiency")
    if eff:
        lines.append(f"efficiency {eff['macs_per_token']:,} MACs/token, {eff['tokens_per_s']:.0f} tokens/s (batch {eff['batch_size']} x {eff['seqlen']})")
    lines.append(f"record     {record['path']}")
    return "\n".join(lines)


