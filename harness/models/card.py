"""The model card (README.md) of an exported folder, written from the run's record."""

from __future__ import annotations

from harness.evaluate.tasks import PAPER_NAMES


def _calibration(entry: dict | None) -> str:
    if not entry:
        return "-"
    if "same_as" in entry:
        return f"the same set as `{entry['same_as']}`"
    parts = ", ".join(f"{p['source']} x {p['count']}" + (f" ({p['split']})" if "split" in p else "")
                      for p in entry.get("sources", []))
    return (f"`{entry['dataset']}`: {parts or entry['n_samples']}; {entry.get('sequences', entry['n_samples'])} "
            f"sequences of {entry['seqlen']} tokens, seed {entry.get('seed', '-')}, token sha256 "
            f"`{entry.get('sha256', '-')}`")


def model_card(record: dict, route: str) -> str:
    c, m, p, ev = record["config"], record["model"], record["pruning"], record.get("eval", {})
    load = ("AutoModelForCausalLM.from_pretrained(folder)" if route == "stock"
            else "AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)")
    remedy = c["remedy"]["name"]
    lines = [
        "---", "library_name: transformers", f"base_model: {m['id']}", "tags: [pruned, structured-pruning, harness]",
        "---", "",
        f"# {m['name']}, {p['sparsity_achieved']:.1%} of its parameters structurally removed",
        "",
        f"Pruned without retraining by [harness](https://arxiv.org/abs/2407.19126) (run `{record['run_id']}`).",
        f"Load with `{load}`"
        + ("" if route == "stock" else " (`modeling_pruned.py`, in this folder, builds the per-layer shapes)") + ".",
        "",
        "| | |", "| --- | --- |",
        f"| base model | `{m['id']}` (revision `{c['model'].get('revision') or 'main'}`, model_type `{m['model_type']}`) |",
        f"| method | metric `{c['metric']['name']}` {c['metric'].get('params') or ''}, allocation "
        f"`{c['allocation']['name']}`, units `{p.get('attention_unit', 'kv_group')}`, modules {'+'.join(c['prune']['modules'])} |",
        f"| remedy | `{remedy}`" + (f" (damp {c['remedy']['damp']}, toward {c['remedy']['toward']})" if remedy == "recovery" else "")
        + " |",
        f"| scoring calibration | {_calibration(p.get('calibration'))} |",
    ]
    if "remedy_calibration" in p:
        lines.append(f"| recovery calibration | {_calibration(p['remedy_calibration'])} |")
    lines += [
        f"| sparsity | target {p['sparsity_target']:g} ({p['sparsity_mode']}), achieved {p['sparsity_achieved']:.4f} |",
        f"| parameters | {m['params_before']:,} -> {m['params_after']:,} |",
        f"| layers pruned | [{p['layers'][0]}, {p['layers'][1]}) |",
    ]
    for name, v in ev.get("ppl", {}).items():
        lines.append(f"| perplexity {name} | {v['value']:.2f} ({v.get('split', '')}, seqlen {v.get('seqlen', '')}, "
                     f"{v['tokens']:,} tokens, protocol `{c['eval']['ppl']['protocol']}`) |")
    for task, v in ev.get("zeroshot", {}).items():
        lines.append(f"| {PAPER_NAMES.get(task, task)} | acc {v['acc']:.4f}"
                     + (f", acc_norm {v['acc_norm']:.4f}" if v.get("acc_norm") is not None else "") + f" (n={v['n']}) |")
    if "zeroshot_avg" in ev:
        lines.append(f"| zero-shot average | {ev['zeroshot_avg']:.4f} ({ev.get('zeroshot_protocol', {}).get('source', '')}, 0-shot) |")
    env = record.get("env", {})
    versions = ", ".join(f"{k} {v}" for k, v in (env.get("versions") or {}).items())
    lines += [f"| versions | {versions or '-'} |", "",
              "The full run record is `record.json`; per-layer shapes are in `config.json` under `harness_pruning`.", ""]
    return "\n".join(lines)
