"""The typed run schema: one dataclass per config group, registered in Hydra's ConfigStore.

The YAML files under conf/ only choose (a model, a metric, a sweep); every key, its type and
its default live here. A key that does not exist or a value of the wrong type fails at
composition, naming the key; a value out of range fails when the config becomes a `RunConfig`
(`typed`, the first step of `harness.run.run`), before anything loads. Each check is a
`check` method of the dataclass that holds the key; the pruning keys are checked by the
`PruneSettings` they become.

From Python, without Hydra's app:
    from harness.config import compose
    from harness.run import run
    record = run(compose("model=tiny-llama", "sparsity=0.3", "logger=none"))
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import II, MISSING, DictConfig, OmegaConf

from harness import depth, metrics, remedy, sparse
from harness.checks import ConfigError, integer, number, one_of
from harness.data import calibration, downstream
from harness.data.corpora import CORPORA, PROTOCOLS
from harness.data.tokens import BOS_PLACEMENTS
from harness.data.zeroshot_tasks import TASKS
from harness.finetune import METHODS
from harness.models.gguf_export import GGUF_DTYPES
from harness.models.loading import DTYPES, SOURCES
from harness.remedy import fits_on_data
from harness.settings import SPARSITY_TYPES, PruneSettings


def _config_dir() -> Path:
    """conf/ beside the package in a checkout; harness/conf in an installed wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "conf", here / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"no config tree (config.yaml) in {here.parent / 'conf'} or {here / 'conf'}")


CONFIG_DIR = _config_dir()
DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def writable_dir(key: str, path: str | Path) -> None:
    """The nearest existing folder of `path` must take a new folder (tried: a temporary one is
    made and removed, since permission bits say nothing for root or for /proc and read-only mounts)."""
    p = Path(path).expanduser().resolve()
    existing = next(q for q in (p, *p.parents) if q.exists())
    try:
        if not existing.is_dir():
            raise NotADirectoryError(existing)
        os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".harness-probe-"))
    except OSError as e:
        raise ConfigError(f"{key}={str(path)!r} is not writable ({existing}: {e.strerror or 'not a folder'}); "
                          "accepted: a folder this user can create files in") from None


@dataclass
class GGUFPart:
    package: str  # the pip package that ships this part
    path: str  # the part's path inside site-packages


@dataclass
class GGUFFile:
    file: str  # the joined file's name
    parts: list[GGUFPart] = field(default_factory=list)
    sha256: str | None = None  # of the joined file, checked when given


@dataclass
class ModelConfig:
    name: str = MISSING
    source: str = "hub"  # hub (hub_id or path), gguf (pip-packaged GGUF), zoo (harness/models/zoo.py)
    hub_id: str | None = None
    path: str | None = None  # a local checkpoint folder instead of the hub
    revision: str | None = None
    gguf: GGUFFile | None = None
    layers: list[int] | None = None  # [start, end) of prunable blocks; null = all
    seqlen: int = 128  # the protocol's context for calibration and perplexity
    bos: str = "stream"  # stream: BOS once at the stream start (the papers); window: BOS starts every sequence
    # models larger than memory: built on the meta device, one block at a time (models/lazy.py);
    # auto: so only when the weights would take over 80% of the memory available (loading.lazy_auto)
    lazy: Any = False  # true, false or auto

    def check(self) -> None:
        one_of("model.source", self.source, SOURCES)
        if not (isinstance(self.lazy, bool) or self.lazy == "auto"):
            raise ConfigError(f"model.lazy={self.lazy!r} is not accepted; accepted: true, false, auto")
        one_of("model.bos", self.bos, BOS_PLACEMENTS)
        if self.path and not Path(self.path).expanduser().exists():
            raise ConfigError(f"model.path={self.path!r} does not exist")
        if self.source == "gguf" and self.gguf is None:
            raise ConfigError(f"model.source=gguf for model {self.name!r} needs model.gguf (file and parts)")


@dataclass
class MetricConfig:
    name: str = "ours"
    params: dict[str, Any] = field(default_factory=dict)  # the metric's own keyword arguments

    def check(self, sparsity_type: str = "structured") -> None:
        registry = methods_of(sparsity_type)
        if self.name not in registry.names():
            raise ConfigError(f"metric={self.name!r} is not accepted with sparsity_type={sparsity_type}; "
                              f"accepted: {', '.join(registry.names())}")
        try:
            registry.build(self.name, self.params)
        except ConfigError:
            raise
        except ValueError as e:  # a metric's own check of a parameter's value
            raise ConfigError(f"metric: {e}") from e


@dataclass
class AllocationConfig:
    name: str = "uniform"  # prune/allocation.py POLICIES


@dataclass
class CalibrationConfig:
    dataset: str = "c4"  # a source, or a mixture: wikitext2+bookcorpus, wikitext2:8+bookcorpus:8 (data/calibration.py)
    n_samples: int = 128  # sequences (downstream: task examples)
    seqlen: int = II("model.seqlen")
    bos: str = II("model.bos")
    seed: int = II("seed")
    downstream_tasks: list[str] | None = None  # dataset=downstream: these tasks' examples; null = every one available
    downstream_split: str = "auto"  # auto: the hub's train splits, offline the shipped validation splits

    def check(self, key: str = "calibration") -> None:
        integer(f"{key}.n_samples", self.n_samples, 1)
        integer(f"{key}.seqlen", self.seqlen, 2)
        integer(f"{key}.seed", self.seed, 0)
        one_of(f"{key}.bos", self.bos, BOS_PLACEMENTS)
        try:
            parts = calibration.sources(self.dataset, self.n_samples, key)
            if any(source == "downstream" for source, _ in parts):
                downstream.plan(self.downstream_tasks, self.downstream_split, key=key)
        except ValueError as e:
            raise ConfigError(str(e)) from e

    def sampling(self) -> dict:
        """What decides the drawn sequences (two calibrations with equal sampling are one set)."""
        return {k: getattr(self, k) for k in ("dataset", "n_samples", "seqlen", "bos", "seed", "downstream_tasks",
                                              "downstream_split")}


@dataclass
class RecoveryCalibrationConfig(CalibrationConfig):
    """The data a remedy fits on (recovery's least squares); by default the scoring calibration."""

    dataset: str = II("calibration.dataset")
    n_samples: int = II("calibration.n_samples")
    seqlen: int = II("calibration.seqlen")
    bos: str = II("calibration.bos")
    seed: int = II("calibration.seed")
    downstream_tasks: list[str] | None = II("calibration.downstream_tasks")
    downstream_split: str = II("calibration.downstream_split")


@dataclass
class RemedyConfig:
    name: str = "none"  # harness.remedy.names()
    damp: float = 0.01  # recovery: lambda = damp * mean(diag(X^T X))
    toward: str = "zero"  # recovery's ridge prior: zero (METHOD.md) or weights
    # The data recovery fits on (default: the scoring calibration); a remedy that fits nothing ignores it.
    calibration: RecoveryCalibrationConfig = field(default_factory=RecoveryCalibrationConfig)


@dataclass
class FinetuneDataConfig(CalibrationConfig):
    """The sequences LoRA trains on (drawn like calibration data; LLM-Pruner's alpaca is not offline)."""

    n_samples: int = 256


@dataclass
class FinetuneConfig:
    """finetune=lora: LoRA adapters trained after pruning and merged before evaluation (harness/finetune.py)."""

    name: str = "none"  # none, lora
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: list[str] | None = None  # last name parts, e.g. [q_proj, v_proj]; null = every linear layer of the blocks
    steps: int = 64  # optimizer steps (batches)
    batch_size: int = 4
    lr: float = 1e-4  # AdamW, constant
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)

    def check(self) -> None:
        one_of("finetune", self.name, METHODS)
        integer("finetune.rank", self.rank, 1)
        integer("finetune.steps", self.steps, 1)
        integer("finetune.batch_size", self.batch_size, 1)
        number("finetune.alpha", self.alpha, 0, open_low=True)
        number("finetune.lr", self.lr, 0, open_low=True)
        number("finetune.dropout", self.dropout, 0)
        if self.dropout >= 1:
            raise ConfigError(f"finetune.dropout={self.dropout!r} is out of range; accepted: 0 <= dropout < 1")
        if self.targets is not None and not self.targets:
            raise ConfigError("finetune.targets=[] adapts nothing; accepted: null (every linear layer) or layer names")
        if self.name != "none":
            self.data.check("finetune.data")


@dataclass
class PerplexityConfig:
    datasets: list[str] = field(default_factory=lambda: ["wikitext2", "ptb"])
    protocol: str = "llmpruner"  # llmpruner (PTB validation, "\n\n"), gptq (PTB test, " ")
    seqlen: int = II("model.seqlen")
    batch_size: int = 8
    max_tokens: int | None = None  # cap on the evaluated tokens per dataset (the record says how many)
    bos: str = II("model.bos")

    def check(self) -> None:
        for dataset in self.datasets:
            one_of("eval.ppl.datasets item", dataset, CORPORA[:2])
        one_of("eval.ppl.protocol", self.protocol, tuple(PROTOCOLS))
        one_of("eval.ppl.bos", self.bos, BOS_PLACEMENTS)
        integer("eval.ppl.seqlen", self.seqlen, 2)
        integer("eval.ppl.batch_size", self.batch_size, 1)
        integer("eval.ppl.max_tokens", self.max_tokens, self.seqlen, none="the whole stream")


@dataclass
class ZeroShotConfig:
    tasks: list[str] = field(default_factory=lambda: ["boolq", "piqa", "hellaswag", "winogrande", "arc_easy",
                                                      "arc_challenge", "openbookqa"])
    limit: int | None = None  # examples per task; null = all
    batch_size: int | None = None  # null: the largest that fits the device's free memory (zeroshot.py)
    bos: str = II("model.bos")  # window: lm-eval adds BOS to every request (Gemma); stream: none
    source: str = "auto"  # auto: lm-eval's hub tasks when online, the offline copies otherwise
    average_metrics: dict[str, str] = field(default_factory=dict)  # per-task override of the averaged metric

    def check(self) -> None:
        for task in self.tasks:
            one_of("eval.zeroshot.tasks item", task, TASKS)
        one_of("eval.zeroshot.bos", self.bos, BOS_PLACEMENTS)
        integer("eval.zeroshot.limit", self.limit, 1, none="every example")
        integer("eval.zeroshot.batch_size", self.batch_size, 1, none="the largest that fits the device")


@dataclass
class EfficiencyConfig:
    batch_size: int = 1
    seqlen: int = II("model.seqlen")

    def check(self) -> None:
        integer("eval.efficiency.seqlen", self.seqlen, 1)
        integer("eval.efficiency.batch_size", self.batch_size, 1)


@dataclass
class EvalConfig:
    ppl: PerplexityConfig | None = field(default_factory=PerplexityConfig)
    zeroshot: ZeroShotConfig | None = None
    efficiency: EfficiencyConfig | None = field(default_factory=EfficiencyConfig)


@dataclass
class LoggerConfig:
    name: str = "wandb"  # wandb, none
    project: str = "harness"
    entity: str | None = None
    mode: str = "auto"  # auto (online with credentials, else offline), online, offline, disabled
    init_timeout_s: float = 15  # online without a reachable server: offline after this long

    def check(self) -> None:
        one_of("logger", self.name, ("wandb", "none"))
        one_of("logger.mode", self.mode, ("auto", "online", "offline", "disabled"))


@dataclass
class PruneConfig:
    modules: list[str] = field(default_factory=lambda: ["attention", "mlp"])  # [attention] = head-only (Table 2)
    attention_unit: str = "kv_group"  # GQA: kv_group (a KV head with its queries) or query_head
    chunk_size: int = 8  # calibration sequences per forward chunk
    flap_faithful: bool = False  # FLAP's per-sample reference statistics (metric=flap)
    blocks: int | None = None  # sparsity_type=depth: remove this many whole blocks (null: as many as `sparsity` asks)


@dataclass
class CollectConfig:
    after_sweep: bool = True  # a multirun ends by running the collector over out_dir
    out: str = "${out_dir}/.."  # tables/ and plots/ go here (results/ for the default out_dir)
    where: list[str] = field(default_factory=list)  # only records matching these (`harness collect --where`)


@dataclass
class RunConfig:
    model: ModelConfig = MISSING
    metric: MetricConfig = field(default_factory=MetricConfig)
    allocation: AllocationConfig = field(default_factory=AllocationConfig)
    remedy: RemedyConfig = field(default_factory=RemedyConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    collect: CollectConfig = field(default_factory=CollectConfig)
    sparsity: float = PruneSettings.sparsity  # fraction of parameters removed (see sparsity_mode)
    sparsity_mode: str = PruneSettings.sparsity_mode  # model: of the whole model; module: per-module ratio (LLM-Pruner)
    # structured: heads and channels removed; unstructured / nm: weights of the linear layers masked in place
    sparsity_type: str = PruneSettings.sparsity_type
    nm: str = PruneSettings.nm  # sparsity_type=nm: N of every M consecutive input weights zeroed (2:4, 4:8)
    seed: int = PruneSettings.seed
    force: bool = False  # redo a run whose complete record exists
    device: str = "auto"  # auto (cuda if available, else cpu), cpu, cuda, cuda:1, mps
    dtype: str = "auto"  # auto (float32 on CPU, bfloat16 on GPU), float32, float16, bfloat16
    out_dir: str = "results/runs"  # records go to <out_dir>/<config-hash>/result.json
    data_dir: str | None = "${oc.env:HARNESS_DATA_DIR,null}"  # offline copies of the datasets
    save_model: bool = False  # also save the pruned model next to the record
    save_gguf: str | None = None  # f32, f16 or bf16: also write <run>/model.gguf for llama.cpp (docs/deploy.md)
    resume: bool = True  # checkpoint the pruned model until the run completes; a re-run continues from it

    def check(self) -> None:
        settings = self.prune_settings()  # the pruning keys are checked where they are used (first: others interpolate seed)
        one_of("remedy", self.remedy.name, remedy.names())
        remedy.get(self.remedy.name).check(settings)
        self.metric.check(self.sparsity_type)
        for part in (self.model, self.calibration, self.logger, self.eval.ppl, self.eval.zeroshot,
                     self.eval.efficiency):
            if part is not None:
                part.check()
        self.remedy.calibration.check("remedy.calibration")
        self.finetune.check()
        if self.sparsity_type == "depth" and self.remedy.name == "replaceme" and depth.build(
                self.metric.name, self.metric.params).unit != "block":
            raise ConfigError(f"remedy=replaceme replaces a run of whole blocks; metric={self.metric.name} removes "
                              "sub-blocks; accepted with replaceme: metric=angular (or another whole-block method)")
        if self.finetune.name != "none" and self.sparsity_type in ("unstructured", "nm"):
            raise ConfigError(f"finetune={self.finetune.name} would make the masked weights dense again when its "
                              f"adapters merge; with sparsity_type={self.sparsity_type} accepted: finetune=none")
        if self.model.lazy is True:
            self.check_lazy()
        one_of("dtype", self.dtype, ("auto", *DTYPES))
        if not DEVICE.fullmatch(str(self.device)):
            raise ConfigError(f"device={self.device!r} is not accepted; accepted: auto, cpu, cuda, cuda:N, mps")
        if self.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise ConfigError(f"device={self.device!r} but no CUDA device is available; accepted here: auto, cpu")
            index = int(self.device.partition(":")[2] or 0)
            if index >= torch.cuda.device_count():
                raise ConfigError(f"device={self.device!r}: this machine has {torch.cuda.device_count()} CUDA "
                                  f"devices; accepted: cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
        if self.save_gguf is not None:
            one_of("save_gguf", self.save_gguf, GGUF_DTYPES)
            if self.model.source != "gguf" or self.model.path:
                raise ConfigError(f"save_gguf={self.save_gguf} copies the tokenizer from the GGUF the model is loaded "
                                  f"from; model.source={self.model.source}; accepted: a model with source gguf, or "
                                  "`harness export RUN --format gguf --vocab FILE.gguf` afterwards")
        writable_dir("out_dir", self.out_dir)

    def check_lazy(self, why: str = "model.lazy=true") -> None:
        """What a model that is never whole in memory cannot do, refused before anything loads
        (`why`: what made the run lazy, for the message)."""

        if self.sparsity_type == "depth":  # SLEB and ReplaceMe run the whole model on the calibration set
            raise ConfigError(f"sparsity_type=depth is not accepted with {why} (its searches run the whole model); "
                              "accepted: model.lazy=false, or sparsity_type=structured|unstructured|nm")
        refused = {"finetune": (self.finetune.name, "none"), "save_gguf": (self.save_gguf, None),
                   "eval.efficiency": (None if self.eval.efficiency is None else "on", None)}
        for key, cal in (("calibration", self.calibration), ("remedy.calibration", self.remedy.calibration)):
            if "selfgen" in (cal.dataset if isinstance(cal.dataset, str) else list(cal.dataset)):
                raise ConfigError(f"{key}.dataset={cal.dataset} samples text from the whole model, which "
                                  f"{why} never holds; accepted: a text dataset (c4, wikitext2, ...)")
        for key, (value, accepted) in refused.items():
            if value != accepted:
                raise ConfigError(f"{key}={value} is not accepted with {why} (the model is never whole in "
                                  f"memory); accepted: {key}={accepted if accepted is not None else 'null'}")
        if self.sparsity_type != "structured":
            return  # every masking method reads one layer's inputs only
        metric = metrics.build(self.metric.name, self.metric.params)
        if metric.needs_gradients(self.prune.modules):
            raise ConfigError(f"metric={self.metric.name} needs whole-model gradients, which {why} never "
                              "holds; accepted: a metric without gradients (not taylor, hywia)")

    def prune_settings(self) -> PruneSettings:
        """What the pruning pipeline reads, from the keys where a user sets it."""
        return PruneSettings(
            sparsity=self.sparsity, sparsity_mode=self.sparsity_mode, allocation=self.allocation.name,
            remedy=self.remedy.name, layers=tuple(self.model.layers) if self.model.layers else None,
            modules=tuple(self.prune.modules), damp=self.remedy.damp, ridge_toward=self.remedy.toward,
            chunk_size=self.prune.chunk_size, seed=self.seed, flap_faithful=self.prune.flap_faithful,
            attention_unit=self.prune.attention_unit, sparsity_type=self.sparsity_type, nm=self.nm,
            blocks=self.prune.blocks)


def register() -> None:
    """The schema under the name conf/config.yaml lists first in its defaults."""
    ConfigStore.instance().store(name="run_schema", node=RunConfig)


register()


def typed(cfg: RunConfig | DictConfig | dict) -> RunConfig:
    """A checked `RunConfig` from a composed config (a Hydra DictConfig, a plain dict or one
    already typed), with every value checked."""
    if isinstance(cfg, RunConfig):
        cfg = OmegaConf.structured(cfg)  # re-resolves interpolations and re-runs the checks
    if isinstance(cfg, dict):
        cfg = OmegaConf.create(cfg)
    cfg = _without_hydra(cfg.copy())
    if OmegaConf.get_type(cfg) is not RunConfig:  # a plain dict or config: give it the schema
        cfg = OmegaConf.merge(OmegaConf.structured(RunConfig), cfg)
    run_config = OmegaConf.to_object(cfg)
    run_config.check()

    if not fits_on_data(run_config.remedy.name):
        # Read by no stage of this run: recorded as the scoring calibration, so the run is the
        # same run (one record) whatever a sweep set it to.
        run_config.remedy.calibration = RecoveryCalibrationConfig(**run_config.calibration.sampling())
    return run_config


def _without_hydra(cfg: DictConfig) -> DictConfig:
    OmegaConf.set_struct(cfg, False)
    cfg.pop("hydra", None)
    return cfg


def as_dict(cfg: RunConfig) -> dict:
    """The resolved config as plain data: what the record stores and the run id hashes."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def compose(*overrides: str, return_hydra: bool = False) -> DictConfig:
    """The config `python -m harness OVERRIDES...` runs, composed without starting a Hydra app
    (`return_hydra`: with the `hydra` node, e.g. to read a sweep's parameters)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        return hydra_compose(config_name="config", overrides=list(overrides), return_hydra_config=return_hydra)


def methods_of(sparsity_type: str):
    """The method registry of a track (a module with `names` and `build`)."""
    return {"structured": metrics, "unstructured": sparse, "nm": sparse, "depth": depth}[sparsity_type]


def metric_choices(sparsity_type: str) -> list[str]:
    """The `metric=` choices (conf/metric files) a track accepts: those whose class is registered
    for it (wanda is both a structured metric and a masking method)."""
    registered = set(methods_of(sparsity_type).names())
    return sorted(p.stem for p in (CONFIG_DIR / "metric").glob("*.yaml") if OmegaConf.load(p).name in registered)


def check_choices(overrides: list[str]) -> None:
    """A `metric=NAME` override that names no conf/metric file: Hydra's own error lists the files
    of every track; this one names the choices of the run's track (sparsity_type=), before Hydra
    composes anything."""
    given = dict(o.split("=", 1) for o in overrides if "=" in o and o[0].isalpha())
    if "metric" not in given or any(c in given["metric"] for c in "$*[]()"):
        return
    types = given.get("sparsity_type", RunConfig.sparsity_type).split(",")
    for name in given["metric"].split(","):
        for kind in types:
            if kind in SPARSITY_TYPES and name not in metric_choices(kind):
                raise ConfigError(f"metric={name!r} is not accepted with sparsity_type={kind}; accepted: "
                                  f"{', '.join(metric_choices(kind))}")
