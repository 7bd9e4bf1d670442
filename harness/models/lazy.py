"""Models larger than host memory: built on the meta device, one block's weights at a time.

`LazyCheckpoint(folder)` reads a transformers folder of safetensors (one file or an index of
shards). `skeleton()` builds the model with every parameter on the meta device (buffers,
such as rotary tables, are real and small). The pruning pipeline, given the checkpoint as
its block store, loads the embeddings for the calibration capture and then each block just
before it is pruned, and writes the pruned block to `out/blocks/<k>.safetensors` before
freeing it; nothing else of the model is ever in memory. Peak host memory is therefore
about the non-block weights during the capture, then two blocks (the block and its
serialised copy) plus the calibration activations (README, "Models larger than memory").
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from harness.models import adapter_for
from harness.models.export import export_config, finish


class LazyCheckpoint:
    def __init__(self, folder: str | Path, dtype: torch.dtype = torch.float32):
        self.folder, self.dtype = Path(folder), dtype
        index = self.folder / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: self.folder / file for name, file in weight_map.items()}
        elif (self.folder / "model.safetensors").exists():
            single = self.folder / "model.safetensors"
            with safe_open(str(single), "pt") as f:
                self.files = dict.fromkeys(f.keys(), single)
        else:
            raise FileNotFoundError(f"model.lazy needs safetensors weights; {self.folder} has neither "
                                    "model.safetensors nor model.safetensors.index.json")
        self.model: nn.Module | None = None
        self.prefix = ""  # the name of the blocks' ModuleList in the model, with a trailing dot

    def loaded_bytes(self) -> int:
        """The bytes of every tensor of the checkpoint once read in this dtype (from the
        safetensors headers: nothing is loaded), i.e. what holding the whole model takes."""
        by_file = defaultdict(list)
        for key, file in self.files.items():
            by_file[file].append(key)
        numel = 0
        for file, keys in by_file.items():
            with safe_open(str(file), "pt") as f:
                numel += sum(math.prod(f.get_slice(key).get_shape()) for key in keys)
        return numel * self.dtype.itemsize

    def skeleton(self) -> nn.Module:
        config = AutoConfig.from_pretrained(self.folder, trust_remote_code=True)  # an exported pruned folder too
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=self.dtype, trust_remote_code=True)
        model.tie_weights()  # from_pretrained would; from_config on the meta device does not
        blocks = adapter_for(model).layers(model)
        self.prefix = next(name for name, m in model.named_modules() if m is blocks) + "."
        self.model = model.eval()
        return self.model

    def _key(self, name: str) -> str:
        if name in self.files:
            return name
        base = getattr(self.model, "base_model_prefix", "")
        if base and name.startswith(base + ".") and name[len(base) + 1:] in self.files:
            return name[len(base) + 1:]  # hub GPT-2 checkpoints drop "transformer."
        raise KeyError(f"{name} is not in the checkpoint {self.folder}")

    def _tensors(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The checkpoint's tensors of these model names, in this checkpoint's dtype."""
        by_file = defaultdict(list)
        for name in names:
            by_file[self.files[self._key(name)]].append(name)
        out = {}
        for file, group in by_file.items():
            with safe_open(str(file), "pt") as f:
                out.update({name: f.get_tensor(self._key(name)).to(self.dtype) for name in group})
        return out

    def _load(self, module: nn.Module, prefix: str, device: torch.device) -> None:
        names = [name for name, _ in module.named_parameters()]
        for name, value in self._tensors([prefix + n for n in names]).items():
            set_module_tensor_to_device(module, name.removeprefix(prefix), device, value=value)

    # ---- what the pipeline and the block-wise evaluation use ----------------------------

    @contextmanager
    def outside_blocks(self, device: torch.device, head: bool = False) -> Iterator[None]:
        """The weights outside the blocks in memory for the duration: what the calibration
        capture runs (embeddings, norms), and with `head` the output head too (for logits)."""
        tied_head = self.model.get_output_embeddings() if self.tied else None  # before loading unties it
        try:
            for name, module in self._outside_blocks(head):
                if module is not tied_head:
                    self._load(module, name + ".", device)
            self.model.tie_weights()  # a loaded embedding is a new tensor: the tied head follows it
            yield
        finally:
            for _, module in self._outside_blocks(head=True):
                module.to("meta")
            self.model.tie_weights()

    @property
    def tied(self) -> bool:
        return self.model.get_output_embeddings().weight is self.model.get_input_embeddings().weight

    def _outside_blocks(self, head: bool) -> list[tuple[str, nn.Module]]:
        out_head = None if head else self.model.get_output_embeddings()
        return [(name, module) for name, module in self.model.named_modules()
                if not name.startswith(self.prefix) and module is not out_head and list(module.parameters(recurse=False))]

    @contextmanager
    def block(self, k: int, block: nn.Module, device: torch.device, out: Path | None = None) -> Iterator[nn.Module]:
        """Block k read onto `device` for the duration, then freed; with `out`, first written
        (pruned) to out/blocks/<k>.safetensors under the model's own parameter names (a shard
        of the exported checkpoint)."""
        try:
            self._load(block, f"{self.prefix}{k}.", device)
            yield block
            if out is not None:
                (out / "blocks").mkdir(parents=True, exist_ok=True)
                state = {f"{self.prefix}{k}.{n}": t.detach().contiguous().cpu() for n, t in block.state_dict().items()}
                save_file(state, str(out / "blocks" / f"{k}.safetensors"))
        finally:
            block.to("meta")

    def export(self, tokenizer, pruned: Path, path: Path, record: dict | None = None) -> Path:
        """The pruned model (this skeleton, blocks written under `pruned`/blocks) as a
        transformers folder at `path`, shard by shard: blocks never pruned (outside the layer
        range) and the weights outside the blocks come from the original checkpoint."""

        path.mkdir(parents=True, exist_ok=True)
        config, route, zeros = export_config(self.model, path)
        weight_map: dict[str, str] = {}
        seen, outside = set(), []
        for name, tensor in self.model.state_dict(keep_vars=True).items():
            if id(tensor) not in seen and not name.startswith(self.prefix):
                outside.append(name)  # tied weights once, under their first name
            seen.add(id(tensor))

        def shard(file: str, tensors: dict[str, torch.Tensor]) -> None:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / file))
            weight_map.update(dict.fromkeys(tensors, file))

        for k, block in enumerate(adapter_for(self.model).layers(self.model)):
            written = pruned / "blocks" / f"{k}.safetensors"
            if written.exists():
                written.replace(path / f"block-{k:05d}.safetensors")
                with safe_open(str(path / f"block-{k:05d}.safetensors"), "pt") as f:
                    weight_map.update(dict.fromkeys(f.keys(), f"block-{k:05d}.safetensors"))
            else:
                shard(f"block-{k:05d}.safetensors", self._tensors([f"{self.prefix}{k}.{n}" for n in block.state_dict()]))
        shard("outside.safetensors", self._tensors(outside))
        if zeros:
            shard("zeros.safetensors", {name: torch.zeros(shape, dtype=self.dtype) for name, shape in zeros.items()})
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
        finish(config, tokenizer, path, route, record)
        return path
