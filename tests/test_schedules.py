"""Known answers for the learning-rate schedules and the TrainConfig derived values."""

import math

import pytest

from saekit.errors import ConfigError
from saekit.train.config import TrainConfig, default_lr
from saekit.train.schedules import decay_factor, decay_start, lr_at, warmup_factor


def test_warmup_known_answers():
    assert [warmup_factor(s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_factor(0, 0) == 1.0


def test_linear_decay_known_answers():
    # 10 steps, last 40% decay: steps 6..9 decay from 1 by 1/4 per step, reaching 0 at step 10
    assert decay_start(10, 0.4) == 6
    assert [decay_factor(s, 10, "linear", 0.4) for s in range(11)] == [1, 1, 1, 1, 1, 1, 1.0, 0.75, 0.5, 0.25, 0.0]


def test_cosine_decay_known_answers():
    got = [decay_factor(s, 10, "cosine", 0.4) for s in (5, 6, 8, 10)]
    assert got[0] == 1.0 and got[1] == 1.0
    assert got[2] == pytest.approx(0.5)
    assert got[3] == pytest.approx(0.0, abs=1e-12)
    assert decay_factor(7, 10, "cosine", 0.4) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_no_decay_and_zero_fraction():
    assert all(decay_factor(s, 10, "none", 0.5) == 1.0 for s in range(10))
    assert all(decay_factor(s, 10, "linear", 0.0) == 1.0 for s in range(10))


def test_lr_at_combines_warmup_and_decay():
    lrs = [lr_at(s, 1.0, total_steps=10, warmup_steps=2, decay="linear", decay_fraction=0.2) for s in range(10)]
    assert lrs == [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5]


def test_default_lr_is_width_scaled():
    assert default_lr(16384) == pytest.approx(2e-4)
    assert default_lr(4 * 16384) == pytest.approx(1e-4)


def test_trainconfig_resolves_steps_and_lr():
    cfg = TrainConfig(total_tokens=1000, batch_size=64).resolved(d_sae=65536)
    assert cfg.total_steps == 16 and cfg.total_tokens is None
    assert cfg.lr == pytest.approx(1e-4)
    assert TrainConfig(total_steps=5, lr=1e-3).resolved(64).lr == 1e-3


def test_trainconfig_is_strict():
    with pytest.raises(ConfigError, match="exactly one"):
        TrainConfig.from_dict({"batch_size": 8})
    with pytest.raises(ConfigError, match="total_steps"):
        TrainConfig.from_dict({"total_steps": 5, "total_tokens": 10})
    with pytest.raises(ConfigError, match="did you mean 'warmup_steps'"):
        TrainConfig.from_dict({"total_steps": 5, "warmup_step": 3})
    with pytest.raises(ConfigError, match="nonfinite"):
        TrainConfig.from_dict({"total_steps": 5, "nonfinite": "ignore"})
    assert TrainConfig.describe()["lr"].startswith("Adam learning rate")
