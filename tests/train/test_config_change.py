"""Resuming a workdir with another config is refused (naming each changed field) unless
`allow_config_change`, which keeps the old config.json next to the new one."""
import json
import os

import pytest

from masa_jax import train
from masa_jax.config import resolve
from masa_jax.errors import UserError

pytestmark = pytest.mark.slow  # end to end: real training runs


def _stored(config) -> dict:
    return json.loads(json.dumps(resolve(config).to_dict(), default=str))


def test_a_changed_config_is_refused_before_anything_is_written(tiny_model_dir, small_config, tmp_path):
    config = small_config(tiny_model_dir, "grpo", total_steps=1)
    stored = _stored(config)
    stored["rl"]["lr"], stored["algorithm"] = 0.5, "masa"
    del stored["rl"]["kl_coef"]           # a field added to the code since, left at its default: no change
    stored["mesh"]["process_id"] = 1      # where a process runs is not what it trains
    (tmp_path / "config.json").write_text(json.dumps(stored))
    with pytest.raises(UserError, match=r"algorithm: 'masa' -> 'grpo', rl\.lr: 0\.5 -> 0\.001; pass "
                                        r"--allow_config_change") as e:
        train.train(config, str(tmp_path))
    assert "kl_coef" not in str(e.value) and "process_id" not in str(e.value)
    assert os.listdir(tmp_path) == ["config.json"] and json.loads((tmp_path / "config.json").read_text()) == stored


def test_allow_config_change_keeps_the_old_config_and_continues(tiny_model_dir, small_config, tmp_path):
    assert [h["step"] for h in train.train(small_config(tiny_model_dir, "grpo", total_steps=1), str(tmp_path))] == [1]
    longer = small_config(tiny_model_dir, "grpo", total_steps=2)
    with pytest.raises(UserError, match="total_steps: 1 -> 2"):
        train.train(longer, str(tmp_path))
    history = train.train(longer, str(tmp_path), allow_config_change=True)
    assert [h["step"] for h in history] == [1, 2]
    assert json.loads((tmp_path / "config.1.json").read_text())["total_steps"] == 1
    assert json.loads((tmp_path / "config.json").read_text())["total_steps"] == 2
