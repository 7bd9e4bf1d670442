"""Load exported folders as a user without harness would (run as a script, in its own process).

For each folder with an `expected.pt` (token ids and the in-memory pruned model's logits):
`AutoModelForCausalLM.from_pretrained`, with `trust_remote_code` only where the folder ships
modeling code, compare the logits, and `generate`; then `AutoModel.from_pretrained` (the
decoder alone, as vLLM's Transformers backend builds it), whose last hidden state must equal the
causal LM's, and whose ignore patterns, searched anywhere in a name as vLLM's Transformers backend
does, match none of its weights. Prints one JSON line per folder; exits 1 if harness was imported."""

import json
import pathlib
import re
import sys

import torch
from transformers import AutoModel, AutoModelForCausalLM

for folder in sorted(pathlib.Path(sys.argv[1]).iterdir()):
    if not (folder / "expected.pt").exists():
        continue
    expected = torch.load(folder / "expected.pt")
    remote = (folder / "modeling_pruned.py").exists()
    result = {"folder": folder.name, "remote": remote}
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=remote, dtype=torch.float32).eval()
        model.set_attn_implementation("eager")
        with torch.no_grad():
            got = model(input_ids=expected["ids"], use_cache=False).logits
        out = model.generate(expected["ids"][:1, :8], max_new_tokens=4, do_sample=False, pad_token_id=0)
        result.update(error=(got - expected["logits"]).abs().max().item(), generated=out.shape[1] - 8,
                      params=sum(p.numel() for p in model.parameters()))
        decoder = AutoModel.from_pretrained(folder, trust_remote_code=remote, dtype=torch.float32).eval()
        decoder.set_attn_implementation("eager")
        with torch.no_grad():
            hidden = decoder(input_ids=expected["ids"], use_cache=False).last_hidden_state
            inner = model.get_submodule(model.base_model_prefix)(input_ids=expected["ids"], use_cache=False)
        result["decoder_error"] = (hidden - inner.last_hidden_state).abs().max().item()
        ignored = type(decoder)._keys_to_ignore_on_load_unexpected or []
        result["dropped_by_vllm"] = [k for k in decoder.state_dict() if any(re.search(p, k) for p in ignored)]
    except Exception as e:  # noqa: BLE001 - reported to the test, which fails on it
        result["failure"] = f"{type(e).__name__}: {e}"
    print(json.dumps(result), flush=True)
sys.exit(1 if any(name == "harness" or name.startswith("harness.") for name in sys.modules) else 0)
