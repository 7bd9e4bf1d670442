"""The model card (README.md) of an exported folder, written from the run's record."""

from __future__ import annotations

from harness.data.zeroshot_tasks import PAPER_NAMES


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


def _finetune(entry: dict | None) -> list[str]:
    if not entry:
        return []
    data = entry.get("data", {})
    return [f"| fine-tune | {entry['method'].upper()} rank {entry['rank']}, alpha {entry['alpha']:g}, lr {entry['lr']:g}, "
            f"{entry['steps']} steps of {entry['batch_size']} sequences ({entry['tokens']:,} tokens) on "
            f"`{data.get('dataset', '-')}`, loss {entry['loss_first']:.3f} -> {entry['loss_last']:.3f}, merged into "
            "the weights |"]


def _params(config: dict) -> str:
    params = config["metric"].get("params")
    return f" {params}" if params else ""


def _what(record: dict) -> tuple[str, str, str]:
    """(title, the tags, the method row) for the run's track."""
    c, m, p = record["config"], record["model"], record["pruning"]
    if p.get("sparsity_type") == "depth" and "sub_blocks_removed" in p:  # attention / MLP sub-blocks removed
        title = (f"# {m['name']}, {p['n_sub_blocks_removed']} attention and MLP sub-blocks removed "
                 f"({p['sparsity_achieved']:.1%} of its parameters)")
        method = (f"| method | `{c['metric']['name']}`{_params(c)}, sub-blocks removed "
                  f"{[f'{k}.{part}' for k, part in p['sub_blocks_removed']]} (original block indices, in the order "
                  f"chosen); blocks that lost both deleted: {p['blocks_removed']} |")
        return title, "[pruned, depth-pruning, harness]", method
    if p.get("sparsity_type") == "depth":  # whole blocks deleted: a stock model with fewer layers
        title = f"# {m['name']}, {p['n_blocks_removed']} blocks removed ({p['sparsity_achieved']:.1%} of its parameters)"
        method = (f"| method | `{c['metric']['name']}`{_params(c)} (protects {p['protected']}), blocks removed "
                  f"{p['blocks_removed']} (original indices, in the order chosen) |")
        return title, "[pruned, depth-pruning, harness]", method
    if "pattern" in p:  # the masking track: shapes unchanged, weights zeroed in place
        kind = "unstructured" if p["sparsity_type"] == "unstructured" else "semi-structured"
        title = (f"# {m['name']}, {p['sparsity_achieved']:.1%} of its linear layers' weights zeroed "
                 f"({'N:M ' + p['pattern'] if p['sparsity_type'] == 'nm' else 'unstructured'})")
        method = (f"| method | `{c['metric']['name']}`{_params(c)}, pattern `{p['pattern']}`, "
                  f"modules {'+'.join(c['prune']['modules'])}; shapes unchanged, zeros stored densely |")
        return title, f"[pruned, {kind}-sparsity, harness]", method
    title = f"# {m['name']}, {p['sparsity_achieved']:.1%} of its parameters structurally removed"
    method = (f"| method | metric `{c['metric']['name']}`{_params(c)}, allocation "
              f"`{c['allocation']['name']}`, units `{p.get('attention_unit', 'kv_group')}`, modules "
              f"{'+'.join(c['prune']['modules'])} |")
    return title, "[pruned, structured-pruning, harness]", method


def _sparsity(p: dict) -> str:
    if p.get("sparsity_type") == "depth":
        return (f"| sparsity | target {p['sparsity_target']:g} of the parameters, achieved {p['sparsity_achieved']:.4f}; "
                f"blocks kept {p['blocks_kept']} |")
    if "pattern" in p:
        return (f"| sparsity | target {p['sparsity_target']:g} ({p['pattern']}), achieved {p['sparsity_achieved']:.4f} "
                f"of the pruned layers' weights, {p['sparsity_of_model']:.4f} of all parameters |")
    return f"| sparsity | target {p['sparsity_target']:g} ({p['sparsity_mode']}), achieved {p['sparsity_achieved']:.4f} |"


def model_card(record: dict, route: str) -> str:
    c, m, p, ev = record["config"], record["model"], record["pruning"], record.get("eval", {})
    load = {"stock": "AutoModelForCausalLM.from_pretrained(folder)",
            "gguf": "llama.cpp: llama-cli -m model.gguf (or llama_cpp.Llama(model_path=\"model.gguf\"))"}.get(
        route, "AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)")
    remedy = c["remedy"]["name"]
    title, tags, method = _what(record)
    how = ("Pruned, then fine-tuned with LoRA (merged; see the fine-tune row)," if record.get("finetune")
           else "Pruned without retraining")
    lines = [
        "---", f"library_name: {'gguf' if route == 'gguf' else 'transformers'}", f"base_model: {m['id']}", f"tags: {tags}", "---", "", title, "",
        f"{how} by [harness](https://arxiv.org/abs/2407.19126) (run `{record['run_id']}`).",
        f"Load with `{load}`"
        + ("" if route in ("stock", "gguf") else " (`modeling_pruned.py`, in this folder, builds the per-layer shapes)")
        + ".",
        "",
        "| | |", "| --- | --- |",
        f"| base model | `{m['id']}` (revision `{c['model'].get('revision') or 'main'}`, model_type `{m['model_type']}`) |",
        method,
        f"| remedy | `{remedy}`" + (f" (damp {c['remedy']['damp']}, toward {c['remedy']['toward']})" if remedy == "recovery" else "")
        + (f" (run {p['replaceme']['run']} replaced by a linear map, damp {c['remedy']['damp']})" if "replaceme" in p else "")
        + " |",
        f"| scoring calibration | {_calibration(p.get('calibration'))} |",
    ]
    if "remedy_calibration" in p:
        lines.append(f"| recovery calibration | {_calibration(p['remedy_calibration'])} |")
    lines += _finetune(record.get("finetune"))
    lines += [
        _sparsity(p),
        f"| parameters | {m['params_before']:,} -> {m['params_after']:,} |",
        *([f"| layers pruned | [{p['layers'][0]}, {p['layers'][1]}) |"] if "layers" in p else []),
    ]
    for name, v in ev.get("ppl", {}).items():
        interval = v.get("interval") or {}
        ci = f" [95% {interval['low']:.2f}, {interval['high']:.2f}]" if interval.get("low") is not None else ""
        lines.append(f"| perplexity {name} | {v['value']:.2f}{ci} ({v.get('split', '')}, seqlen {v.get('seqlen', '')}, "
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
