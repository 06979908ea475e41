"""Every config error is caught before compiling, with a message that names the key."""

import re
import sys

import pytest

import defi_jax  # noqa: F401
from configs import toy
from defi_jax import trainer as trainer_lib
from defi_jax.config_validation import ConfigError, validate


def _config():
    c = toy.get_config("tiny")
    c.mesh.shape = (2, 2, 2)
    c.train.batch_size = 16
    return c


CASES = [
    # (key named in the error, mutation)
    ("train.batch_size", lambda c: setattr(c.train, "batch_size", 10)),        # not divisible by dp = 4
    ("train.grad_accum_steps", lambda c: setattr(c.train, "grad_accum_steps", 3)),
    ("train.grad_accum_steps", lambda c: setattr(c.train, "grad_accum_steps", 8)),  # microbatch 2 < dp 4
    ("mesh.shape", lambda c: setattr(c.mesh, "shape", (2, 2, 1))),           # product 4 != 8 devices
    ("mesh.shape", lambda c: setattr(c.mesh, "shape", (3, -1, 1))),          # 8 not divisible by 3
    ("mesh.dcn_shape", lambda c: setattr(c.mesh, "dcn_shape", (3, 1, 1))),
    ("train.lr", lambda c: setattr(c.train, "lr", 0.0)),
    ("train.lr", lambda c: setattr(c.train, "lr", -1e-4)),
    ("train.num_steps", lambda c: setattr(c.train, "num_steps", 0)),
    ("stage", lambda c: setattr(c, "stage", "nope")),
    ("train.schedule", lambda c: setattr(c.train, "schedule", "linear_warmup_cosine")),
    ("train.tri_stage", lambda c: (setattr(c.train, "schedule", "tri_stage"),
                                   setattr(c.train, "tri_stage", (0.1, 0.1, 0.1)))),
    ("train.compute_dtype", lambda c: setattr(c.train, "compute_dtype", "bf16")),
    ("train.param_dtype", lambda c: setattr(c.train, "param_dtype", "float64")),
    ("train.remat_policy", lambda c: setattr(c.train, "remat_policy", "sometimes")),
    ("train.ema_decay", lambda c: setattr(c.train, "ema_decay", 1.0)),
    ("train.frozen", lambda c: setattr(c.train, "frozen", ("encoder/(",))),
    ("sharding.logical_axis_rules", lambda c: setattr(c.sharding, "logical_axis_rules", (("embed", "model"),))),
    ("model.frame_size", lambda c: setattr(c.model, "frame_size", 7)),         # the stage's own hook
    ("data.num_examples", lambda c: setattr(c.data, "num_examples", 4)),
]


@pytest.mark.parametrize("key,mutate", CASES, ids=[f"{i}-{k}" for i, (k, _) in enumerate(CASES)])
def test_error_names_the_key(key, mutate):
    c = _config()
    validate(c, num_devices=8)  # the unmodified config is fine
    mutate(c)
    with pytest.raises(ConfigError, match=rf"config\.{re.escape(key)}\b"):
        validate(c, num_devices=8)


def test_multislice_and_process_count():
    c = _config()
    c.mesh.shape, c.mesh.dcn_shape = (1, 2, 1), (4, 1, 1)   # dp = 4 slices x 2 = 8
    validate(c, num_devices=8)
    c.train.batch_size = 12
    with pytest.raises(ConfigError, match=r"config\.train\.batch_size=12.*data-parallel size 8"):
        validate(c, num_devices=8)
    c = _config()
    with pytest.raises(ConfigError, match=r"config\.train\.batch_size=16.*process count 3"):
        validate(c, num_devices=8, process_count=3)


def test_unknown_dataset_and_mixture(monkeypatch):
    import data_pipelines
    c = _config()
    c.data.update(data_pipelines.default_data_config())
    c.data.mixture = {"fractal": 0.7, "ssv2": 0.3}
    validate(c, num_devices=8)
    c.data.mixture = {"fractal": 0.7, "ego5d": 0.3}
    with pytest.raises(ConfigError, match=r"config\.data\.mixture.*'ego5d'"):
        validate(c, num_devices=8)
    c.data.mixture = "gfdm_paperz"
    with pytest.raises(ConfigError, match=r"config\.data\.mixture='gfdm_paperz'"):
        validate(c, num_devices=8)
    c.data.mixture = {"fractal": -1.0}
    with pytest.raises(ConfigError, match=r"config\.data\.mixture\['fractal'\]"):
        validate(c, num_devices=8)
    c.data.mixture = "demo"
    c.data.dataset = "bridgee"
    with pytest.raises(ConfigError, match=r"config\.data\.dataset='bridgee'"):
        validate(c, num_devices=8)
    # Without the data package only the weights are checked, and nothing crashes.
    monkeypatch.setitem(sys.modules, "data_pipelines", None)  # import now raises ImportError
    c.data.dataset = "anything"
    c.data.mixture = {"anything": 1.0}
    validate(c, num_devices=8)
    c.data.mixture = {"anything": -1.0}
    with pytest.raises(ConfigError, match=r"config\.data\.mixture\.anything"):
        validate(c, num_devices=8)


def test_trainer_validates_before_building():
    c = _config()
    c.train.lr = 0.0
    with pytest.raises(ConfigError, match=r"config\.train\.lr"):
        trainer_lib.Trainer(c)
    c = _config()
    c.train.frozen = (".*",)
    with pytest.raises(ConfigError, match=r"config\.train\.frozen"):
        trainer_lib.Trainer(c)
