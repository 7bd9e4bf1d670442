"""The config tree and its typed schema: every option composes and chooses what it names,
every registry entry has its config and the reverse, bad values fail before any work."""

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from harness import depth, metrics, records, sparse
from harness import remedy as remedies
from harness.config import CONFIG_DIR, ConfigError, RunConfig, as_dict, compose, typed
from harness.prune import allocation
from harness.prune.observe import NEEDS

GROUPS = ["model", "metric", "allocation", "remedy", "finetune", "calibration", "eval", "logger", "launcher", "debug"]
# The key whose value says which option of a group was chosen.
CHOSEN_BY = {"model": "model.name", "metric": "metric.name", "allocation": "allocation.name",
             "remedy": "remedy.name", "finetune": "finetune.name", "calibration": "calibration.dataset", "logger": "logger.name"}


def _options(group):
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def _names(group):
    """The `name` each option of a group gives (a metric variant shares its rule's name)."""
    return {yaml.safe_load((CONFIG_DIR / group / f"{o}.yaml").read_text())["name"] for o in _options(group)}


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_group_option_composes_into_a_checked_run_config(group, option):
    overrides = [f"+{group}={option}"] if group == "debug" else [f"{group}={option}"]
    if group == "metric" and option in sparse.names() and option not in metrics.names():
        overrides.append("sparsity_type=unstructured")  # a method of the masking track only
    if group == "metric" and option in depth.names() and option not in metrics.names():
        overrides.append("sparsity_type=depth")  # a method of the depth track only
    if group == "remedy" and option == "replaceme":
        overrides += ["sparsity_type=depth", "metric=angular"]
    run_config = OmegaConf.structured(typed(compose(*overrides)))
    if group in CHOSEN_BY:
        key = CHOSEN_BY[group]
        chosen = yaml.safe_load((CONFIG_DIR / group / f"{option}.yaml").read_text())[key.split(".")[1]]
        assert OmegaConf.select(run_config, key) == chosen


def test_every_registered_method_has_its_config_and_every_config_a_method():
    assert _names("metric") == set(metrics.names()) | set(sparse.names()) | set(depth.names())
    assert _names("remedy") == set(remedies.names())
    assert _names("allocation") == set(allocation.POLICIES)


def test_declared_needs_are_statistics_the_pipeline_observes():
    for name in metrics.names():
        metric = metrics.build(name, (yaml.safe_load((CONFIG_DIR / "metric" / f"{name}.yaml").read_text())
                                      .get("params") or {}))
        for kind in ("attention", "mlp"):
            assert set(metric.needs(kind)) <= NEEDS, (name, kind)
    for name in remedies.names():
        assert remedies.get(name).needs <= NEEDS, name


def test_schema_defaults_are_the_composed_defaults():
    """No YAML repeats or contradicts a default of the schema: composing with no overrides gives
    the schema's value for every key the default options do not choose."""
    composed = OmegaConf.structured(typed(compose()))
    schema = OmegaConf.to_container(OmegaConf.structured(RunConfig), resolve=False)
    chosen = ("model", "metric.params", "logger.name")  # choices of the default options, not schema defaults
    checked = 0
    for key, value in _leaves(schema):
        if key.startswith(chosen) or (isinstance(value, str) and value.startswith("${")):
            continue  # a choice, or an interpolation (its target is checked)
        assert OmegaConf.select(composed, key) == value, key
        checked += 1
    assert checked > 30


def _leaves(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def test_a_wrong_type_or_unknown_key_fails_at_composition_naming_the_key():
    with pytest.raises(Exception, match="sparsity") as e:
        compose("sparsity=abc")
    assert "could not be converted to Float" in str(e.value.__cause__)
    with pytest.raises(Exception, match="prune.chunk_size"):
        compose("prune.chunk_size=2.5")
    with pytest.raises(Exception, match="nokey"):
        compose("nokey=1")


def test_run_takes_a_typed_config_from_python():
    from harness.config import ModelConfig

    cfg = RunConfig(model=ModelConfig(name="tiny-gpt2", source="zoo"), sparsity=0.3)
    run_config = typed(cfg)
    assert run_config.calibration.seqlen == 128 and run_config.prune_settings().sparsity == 0.3
    with pytest.raises(ConfigError, match=r"sparsity=1.5 is outside \[0, 1\)"):
        typed(RunConfig(model=ModelConfig(name="tiny-gpt2", source="zoo"), sparsity=1.5))


def test_contract_groups_exist():
    assert {"smollm2-135m", "tiny-llama", "tiny-gpt2", "gpt2", "llama-7b"} <= set(_options("model"))
    assert {"none", "recovery", "bias", "replaceme"} == set(_options("remedy"))
    assert {"wikitext2", "ptb", "c4", "selfgen", "bookcorpus", "downstream", "paper"} == set(_options("calibration"))
    assert {"ppl", "quick", "full"} <= set(_options("eval"))
    assert {"wandb", "none"} == set(_options("logger"))


def _harness(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "harness", *args], capture_output=True, text=True, timeout=timeout)


def test_unknown_group_value_fails_at_once_listing_choices():
    r = _harness("metric=nope")
    assert r.returncode != 0
    assert "nope" in r.stderr and "ours" in r.stderr and "flap" in r.stderr


def test_a_bad_value_fails_on_the_command_line_before_loading(tmp_path):
    """The command line shows the schema's message (every bad value is refused in-process in
    test_reliability's table, the same code path)."""
    r = _harness("+debug=fast", f"out_dir={tmp_path}", "sparsity=1.5")
    assert r.returncode != 0
    assert "sparsity=1.5 is outside [0, 1)" in r.stderr, r.stderr[-2000:]
    assert not list(tmp_path.glob("*/result.json"))


@pytest.mark.parametrize("experiment", _options("experiment"))
def test_every_experiment_composes_and_validates(experiment):
    """Each paper table/figure config composes; every point of its sweep passes the schema.
    A sweep axis that chooses a group option is composed; a plain key is set on the composed
    config, as Hydra's override would set it (composing every point costs 0.2 s each)."""
    base = compose(f"+experiment={experiment}", return_hydra=True)
    axes = {k: str(v).split(",") for k, v in (base.hydra.sweeper.params or {}).items()}
    groups = [k for k in axes if k.removeprefix("+") in [*GROUPS, "method"]]
    for choice in itertools.product(*(axes[k] for k in groups)):
        composed = compose(f"+experiment={experiment}", *(f"{k}={v}" for k, v in zip(groups, choice, strict=True)))
        keys = [k for k in axes if k not in groups]
        for point in itertools.product(*(axes[k] for k in keys)):
            cfg = composed.copy()
            for key, value in zip(keys, point, strict=True):
                OmegaConf.update(cfg, key, yaml.safe_load(value), merge=False)
            typed(cfg)
    assert experiment.startswith(("table", "fig", "compare", "architectures", "unstructured", "hywia", "seeds", "depth",
                                  "scale"))


@pytest.mark.parametrize("point", [("qwen2.5-0.5b", "ours"), ("qwen2.5-0.5b", "depth_sleb"),
                                   ("qwen2.5-0.5b", "depth_angular_replaceme"),
                                   ("gemma3-270m", "wanda", "prune.attention_unit=query_head"),
                                   ("gemma3-270m", "random", "sparsity=0")])
def test_scale_shares_depth_models_run_ids(point):
    """The scale experiment's protocol is depth_models': a point both sweep has one run id, so
    the depth_models record of it (copied into results/scale/runs) is that run, skipped there."""
    model, method, *extra = point
    ids = [records.config_hash(as_dict(typed(compose(f"+experiment={e}", f"model={model}", f"+method={method}",
                                                      *extra))))
           for e in ("scale", "depth_models")]
    assert ids[0] == ids[1]


@pytest.mark.parametrize("method", _options("method"))
def test_every_method_bundle_chooses_its_metric_and_remedy(method):
    """conf/method/<name>.yaml: `+method=<name>` is one metric with one remedy (a sweep axis that
    runs exactly these pairs); its comment names the pair it chooses."""
    config = as_dict(typed(compose(f"+method={method}")))
    text = (CONFIG_DIR / "method" / f"{method}.yaml").read_text()
    assert f"override /metric: {config['metric']['name']}" in text
    assert f"override /remedy: {config['remedy']['name']}" in text
    assert method.removeprefix("depth_").split("_")[0] == config["metric"]["name"]


def test_the_top_level_experiments_folder_is_the_experiment_group():
    assert (CONFIG_DIR.parent / "experiments").resolve() == (CONFIG_DIR / "experiment").resolve()
    assert Path(CONFIG_DIR).name == "conf" and (CONFIG_DIR.parent / "harness").is_dir()


def test_an_installed_wheel_finds_its_config_tree(tmp_path):
    """conf/ is the package harness.conf once installed: a wheel holds it, and a process that
    only sees the installed copy composes and checks an experiment from it."""
    root = CONFIG_DIR.parent
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(root),
                    "-w", str(tmp_path / "wheel")], check=True, capture_output=True, timeout=300, cwd=tmp_path)
    (wheel,) = (tmp_path / "wheel").glob("harness-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tmp_path / "site"),
                    str(wheel)], check=True, capture_output=True, timeout=300)
    probe = ("import harness.config as c; c.typed(c.compose('+experiment=table1_zoo')); "
             "print(c.CONFIG_DIR)")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == str(tmp_path / "site" / "harness" / "conf")
