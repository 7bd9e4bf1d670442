"""Every config group option composes; bad values fail before any work."""

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

CONF = Path(__file__).resolve().parent.parent / "harness" / "conf"
GROUPS = ["model", "metric", "allocation", "remedy", "calibration", "eval", "logger", "launcher"]


def _options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_group_option_composes(group, option):
    with initialize_config_module(version_base="1.3", config_module="harness.conf"):
        cfg = compose(config_name="config", overrides=[f"{group}={option}"])
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["sparsity"] == 0.2
    if group == "metric":
        from harness import metrics

        metrics.build(resolved["metric"]["name"], resolved["metric"]["params"])


def test_contract_groups_exist():
    assert {"smollm2-135m", "tiny-llama", "tiny-gpt2", "gpt2", "llama-7b"} <= set(_options("model"))
    assert {"none", "recovery", "bias"} == set(_options("remedy"))
    assert {"wikitext2", "ptb", "c4", "selfgen"} == set(_options("calibration"))
    assert {"ppl", "quick", "full"} <= set(_options("eval"))
    assert {"wandb", "none"} == set(_options("logger"))


def _harness(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "harness", *args], capture_output=True, text=True, timeout=timeout)


def test_unknown_group_value_fails_at_once_listing_choices():
    r = _harness("metric=nope")
    assert r.returncode != 0
    assert "nope" in r.stderr and "ours" in r.stderr and "flap" in r.stderr


@pytest.mark.parametrize("override,message", [
    ("sparsity=1.5", "sparsity=1.5 is outside [0, 1)"),
    ("calibration.n_samples=0", "calibration.n_samples=0"),
    ("model.path=/does/not/exist", "model.path='/does/not/exist' does not exist"),
    ("eval.ppl.protocol=nope", "eval.ppl.protocol='nope' is not accepted; accepted: llmpruner, gptq"),
    ("dtype=float8", "dtype='float8' is not accepted"),
])
def test_bad_values_fail_before_loading(override, message, tmp_path):
    r = _harness("model=tiny-gpt2", "logger=none", f"out_dir={tmp_path}", override)
    assert r.returncode != 0
    assert message in r.stderr, r.stderr[-2000:]
    assert not list(tmp_path.glob("*/result.json"))


@pytest.mark.parametrize("experiment", _options("experiment"))
def test_every_experiment_composes_and_validates(experiment):
    """Each paper table/figure config composes; every point of its sweep passes validation."""
    import itertools

    from harness.validation import validate_config

    with initialize_config_module(version_base="1.3", config_module="harness.conf"):
        base = compose(config_name="config", overrides=[f"+experiment={experiment}"], return_hydra_config=True)
        axes = {k: str(v).split(",") for k, v in (base.hydra.sweeper.params or {}).items()}
        for point in itertools.product(*axes.values()):
            overrides = [f"+experiment={experiment}", *(f"{k}={v}" for k, v in zip(axes, point, strict=True))]
            cfg = OmegaConf.to_container(compose(config_name="config", overrides=overrides), resolve=True)
            validate_config(cfg)
    assert experiment.startswith(("table", "fig", "compare", "architectures"))


def test_experiments_folder_lists_the_experiment_group():
    assert sorted(p.name for p in (CONF.parent.parent / "experiments").glob("*.yaml")) == \
        sorted(f"{o}.yaml" for o in _options("experiment"))
