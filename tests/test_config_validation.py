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


def test_mesh_shape_must_be_integers():
    c = _config()
    c.mesh.shape = ("abc",)
    with pytest.raises(ConfigError, match=r"config\.mesh\.shape=\('abc',\): needs 3 integers"):
        validate(c, num_devices=8)


# --------------------------------------------------------------------------- command-line overrides
from defi_jax.config_validation import apply_overrides, load_config  # noqa: E402


def test_overrides_are_parsed_to_the_declared_types():
    c = toy.get_config("tiny")
    apply_overrides(c, [("train.num_steps", "7"), ("train.lr", "1e-3"), ("train.progress_bar", "false"),
                        ("mesh.shape", "(2,-1,1)"), ("train.frozen", "('encoder/.*',)"), ("stage", "toy"),
                        ("train.tri_stage", "(0, 0.5, 0.5)"), ("train.ema_decay", "0")])
    assert (c.train.num_steps, c.train.lr, c.train.progress_bar, c.train.ema_decay) == (7, 1e-3, False, 0.0)
    assert c.mesh.shape == (2, -1, 1) and c.train.frozen == ("encoder/.*",) and c.train.tri_stage == (0, 0.5, 0.5)
    apply_overrides(c, [("train.progress_bar", None)])          # the bare boolean form
    assert c.train.progress_bar is True


@pytest.mark.parametrize("key,text,message", [
    ("train.bogus", "1", r"^config\.train\.bogus: unknown key; config\.train has: .*b1, b2, batch_size, .*num_steps"),
    ("train.num_step", "5", r"^config\.train\.num_step: unknown key; did you mean config\.train\.num_steps\b"),
    ("num_steps", "5", r"^config\.num_steps: unknown key; did you mean config\.train\.num_steps\?"),
    ("data.nope.x", "1", r"^config\.data\.nope\.x: unknown key; config\.data has: .*num_examples"),
    ("mesh.shape", "abc", r"^config\.mesh\.shape='abc': expected a tuple of int like \(1, -1, 1\)"),
    ("mesh.shape", "(2,4.0,1)", r"^config\.mesh\.shape='\(2,4\.0,1\)': expected a tuple of int"),
    ("train.num_steps", "ten", r"^config\.train\.num_steps='ten': expected an integer; the config has 20"),
    ("train.num_steps", "1.5", r"^config\.train\.num_steps='1\.5': expected an integer"),
    ("train.lr", "fast", r"^config\.train\.lr='fast': expected a number"),
    ("train.progress_bar", "maybe", r"^config\.train\.progress_bar='maybe': expected a bool \(true \| false\)"),
    ("train.lr", None, r"^config\.train\.lr: needs a value, e\.g\. --config\.train\.lr=0\.003"),
])
def test_override_errors_name_the_key(key, text, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(toy.get_config("tiny"), [(key, text)])


def test_load_config_errors_name_the_file_and_variants():
    assert load_config("configs/toy.py:tiny").train.num_steps == 20
    assert load_config("configs/toy.py").model.width == 32              # get_config() default: small
    with pytest.raises(ConfigError, match=r"--config=configs/toy\.py:huge: .*unknown variant 'huge' "
                                          r"\(tiny \| small \| wide\)"):
        load_config("configs/toy.py:huge")
    with pytest.raises(ConfigError, match=r"--config=configs/tyo\.py:tiny: no such file 'configs/tyo\.py'; "
                                          r"configs: .*configs/toy\.py:tiny\|small\|wide"):
        load_config("configs/tyo.py:tiny")
