"""configs/ablation.py: the paper's Figure-6 component ablations and its Table-4 DAPO runs resolve, and each
override reaches the component config the trainer builds from the run config."""
import importlib.util
import os

import pytest

from masa_jax import components
from masa_jax import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    spec = importlib.util.spec_from_file_location("ablation_cfg", os.path.join(REPO, "configs", "ablation.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return config_lib.resolve(module.get_config(name))


def _qwen8b():
    spec = importlib.util.spec_from_file_location("qwen8b_cfg", os.path.join(REPO, "configs", "qwen8b.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return config_lib.resolve(module.get_config())


@pytest.mark.parametrize("name, weights", [("no_notion", (0.5, 0.5, 0.0)), ("no_difficulty", (0.5, 0.0, 0.5)),
                                           ("no_length", (0.0, 0.5, 0.5))])
def test_meta_component_ablations_reach_the_rollout_config(name, weights):
    c = _load(name)
    rc = components.rollout_config(c)
    assert rc.weights == weights and rc.use_meta  # (length, difficulty, notion) into meta.self_alignment
    assert c.algorithm == "masa_efficient" and not c.dapo.dynamic_sampling
    # Everything else is qwen8b's.
    base = _qwen8b().to_dict()
    diff = {k for k in base if base[k] != c.to_dict()[k]}
    assert diff == {"meta"} and {k for k, v in base["meta"].items() if c.meta[k] != v} == {"weights"}


def test_dapo_ablations():
    dapo, masa_dapo, base = _load("dapo"), _load("masa_dapo"), _qwen8b()
    assert dapo.algorithm == "dapo" and dapo.dapo.dynamic_sampling  # resolve() turns the filter on for dapo
    assert not config_lib.uses_meta(dapo) and not components.rollout_config(dapo).use_meta
    assert masa_dapo.algorithm == "masa" and masa_dapo.dapo.dynamic_sampling
    assert components.rollout_config(masa_dapo).use_meta
    lc = components.loss_config(dapo)
    assert (lc.clip_low, lc.clip_high, lc.loss_agg) == (0.2, 0.28, "token-mean")  # DAPO's clip-higher, token-mean
    assert not base.dapo.dynamic_sampling and base.algorithm == "masa_efficient"
    assert dapo.rl.lr == base.rl.lr and dapo.data.problems_per_step == base.data.problems_per_step == 128


def test_unknown_ablation_is_named():
    with pytest.raises(ValueError, match=r"configs/ablation.py:typo: name one of \['dapo', 'masa_dapo'"):
        _load("typo")


@pytest.mark.slow  # the CLI in a subprocess
def test_train_cli_without_an_ablation_name_says_so_in_one_line():
    # ml_collections wraps a config file's exception, traceback and all, into its flag error: one line is left.
    import subprocess
    import sys
    res = subprocess.run([sys.executable, "-m", "masa_jax.train", "--config=configs/ablation.py", "--dry_run"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr[-2000:]
    assert "Traceback" not in lines[0] and "configs/ablation.py:: name one of ['dapo'" in lines[0]
