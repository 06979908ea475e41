"""Checkpoints: restore onto another mesh / device count, bitwise resume after SIGTERM, SIGKILL mid-save."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import defi_jax  # noqa: F401
from defi_jax import sharding, trainer as trainer_lib
from defi_jax.checkpoint import Checkpointer

ROOT = Path(__file__).resolve().parents[1]
# Configs come from the tiny_config fixture (configs/toy.py:tiny, fast compiles); subprocesses get the same
# compile options through subprocess_env's XLA_FLAGS (tests/conftest.py).


def _assert_trees_equal(a, b):
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))


def _rows(workdir):
    return [json.loads(line) for line in open(Path(workdir) / "metrics.jsonl") if '"loss"' in line]


def test_restore_onto_other_mesh_and_device_count(tmp_path, tiny_config, make_mesh):
    config = tiny_config(num_steps=3, ema_decay=0.5)
    saved = trainer_lib.Trainer(config, mesh=make_mesh((2, 2, 2))).fit(str(tmp_path)).state
    ckpt = Checkpointer(str(tmp_path))
    assert ckpt.latest_step() == 3
    for shape in [(8, 1, 1), (4, 1, 1)]:
        tr = trainer_lib.Trainer(config, mesh=make_mesh(shape))
        restored = tr.restore_or_init(ckpt)
        _assert_trees_equal(restored, saved)
        kernel = restored.params["mlp"]["up"]["kernel"]
        assert kernel.sharding.mesh.shape == dict(zip(sharding.MESH_AXES, shape))
        assert len(kernel.sharding.device_set) == int(np.prod(shape))
    ckpt.close()
    # Library users (e.g. the policy loading a pretrained stage) get the model back, EMA or not.
    assert trainer_lib.checkpoint_config(str(tmp_path)).model.width == config.model.width
    model = trainer_lib.restore_model(config, str(tmp_path), ema=True, mesh=make_mesh((2, 1, 1)))
    np.testing.assert_array_equal(np.asarray(model.mlp.up.kernel[...]),
                                  np.asarray(jax.device_get(saved.ema["mlp"]["up"]["kernel"])))


def test_params_only_restore_reads_no_optimizer_state(tmp_path, tiny_config, make_mesh, monkeypatch):
    """Parameters (or their EMA) come back without the optimizer moments: with those bytes deleted from the
    checkpoint, a full restore fails and the params-only restore still equals the trained model."""
    import shutil

    from defi_jax.checkpoint import restore_params

    config = tiny_config(num_steps=3, ema_decay=0.5, frozen=("^decoder/",))
    saved = trainer_lib.Trainer(config, mesh=make_mesh((2, 2, 2))).fit(str(tmp_path)).state
    step_dir = tmp_path / "checkpoints" / "3"
    assert {"params", "frozen", "opt_state", "ema", "counters"} <= {p.name for p in step_dir.iterdir()}
    shutil.rmtree(step_dir / "opt_state")
    tr = trainer_lib.Trainer(config, mesh=make_mesh((4, 1, 1)))
    with pytest.raises(RuntimeError, match="does not fit"):
        tr.restore_or_init(Checkpointer(str(tmp_path)))

    flat = restore_params(str(tmp_path))   # host numpy, no config needed
    monkeypatch.chdir(tmp_path.parent)     # a relative workdir, as a user types it
    relative = restore_params(tmp_path.name)
    assert relative.keys() == flat.keys()
    want = {"/".join(str(k.key) for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_flatten_with_path(jax.device_get(saved.params | saved.frozen))[0]}
    assert flat.keys() == want.keys() and any(k.startswith("decoder/") for k in flat)
    for k in want:
        np.testing.assert_array_equal(flat[k], want[k], err_msg=k)
    for ema in (False, True):
        model = trainer_lib.restore_model(config, tmp_path.name, ema=ema, mesh=make_mesh((2, 1, 1)))
        trained = saved.ema if ema else saved.params
        np.testing.assert_array_equal(np.asarray(model.mlp.up.kernel[...]),
                                      np.asarray(jax.device_get(trained["mlp"]["up"]["kernel"])))
        np.testing.assert_array_equal(np.asarray(model.decoder.conv_out.kernel[...]),
                                      np.asarray(jax.device_get(saved.frozen["decoder"]["conv_out"]["kernel"])))
        assert model.mlp.up.kernel[...].sharding.mesh.shape["data"] == 2
    shutil.rmtree(step_dir / "ema")
    with pytest.raises(ValueError, match="no EMA saved"):
        restore_params(str(tmp_path), ema=True)


def test_imported_params_only_workdir_trains_on(tmp_path, tiny_config, make_mesh):
    """An import writes the weights once (a params-only step 0: no optimizer moments, no EMA, no counters); the
    trainer resumes from it as from a fresh init with those weights (fresh AdamW state, EMA = params, step 0, the
    seed's rng), so training on from it equals training from scratch; the params stand in for the EMA."""
    from defi_jax.checkpoint import restore_params
    from defi_jax.interop import import_stages

    config = tiny_config(num_steps=2, ema_decay=0.5, frozen=("^decoder/",))
    workdir = tmp_path / "imported"
    import_stages.write_workdir(config, str(workdir))
    items = {p.name for p in (workdir / "checkpoints" / "0").iterdir()}
    assert {"params", "frozen", "config"} <= items and not items & {"opt_state", "ema", "counters"}
    assert Checkpointer(str(workdir), read_only=True).params_only(0)

    tr = trainer_lib.Trainer(config, mesh=make_mesh((2, 2, 2)))
    fresh = tr.init_state()
    ckpt = Checkpointer(str(workdir))
    resumed = tr.restore_or_init(ckpt)
    ckpt.close()
    _assert_trees_equal(resumed, fresh)
    _assert_trees_equal(resumed.ema, resumed.params)
    assert jax.tree.leaves(resumed.opt_state) and int(resumed.step) == 0
    assert resumed.params["mlp"]["up"]["kernel"].sharding.mesh.shape == dict(zip(sharding.MESH_AXES, (2, 2, 2)))
    want = {"/".join(str(k.key) for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_flatten_with_path(jax.device_get(fresh.params | fresh.frozen))[0]}
    for ema in (False, True):
        got = restore_params(str(workdir), ema=ema)
        assert got.keys() == want.keys()
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)

    result = tr.fit(str(workdir))                 # what launch.train runs
    scratch = tr.fit(str(tmp_path / "scratch"))
    assert result.status == "done" and result.step == 2 and np.isfinite(result.metrics["loss"])
    _assert_trees_equal(result.state, scratch.state)
    assert {"opt_state", "ema", "counters"} <= {p.name for p in (workdir / "checkpoints" / "2").iterdir()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_config, make_mesh):
    """One trainer (compiled once) and its uninterrupted 12-step run, shared by the resume tests."""
    config = tiny_config(num_steps=12, save_every=4, log_every=1, eval_every=6)
    tr = trainer_lib.Trainer(config, mesh=make_mesh((2, 4, 1)))
    workdir = tmp_path_factory.mktemp("reference")
    result = tr.fit(str(workdir))
    assert result.status == "done" and result.step == 12
    return tr, result, workdir


def test_metrics_files(reference):
    _, result, workdir = reference
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 13))
    for key in ("loss", "mse", "grad_norm", "lr", "skipped_steps", "steps_per_s", "examples_per_s"):
        assert all(np.isfinite(r[key]) for r in train_rows[1:]), key
    assert "mfu" not in train_rows[-1]  # no known peak FLOP/s on CPU
    assert [r["step"] for r in rows if "eval_mse" in r] == [6, 12]
    assert result.metrics["eval_mse"] > 0 and result.metrics["step"] == 12
    events = list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 100
    assert json.loads((workdir / "config.json").read_text())["train"]["num_steps"] == 12


def test_sigterm_then_resume_is_bitwise_equal(tmp_path, reference):
    tr, reference, ref_dir = reference

    orig_step = tr.step

    def step_then_preempt(state, batch):  # a real SIGTERM, delivered after step 4 ran
        state, out = orig_step(state, batch)
        if int(state.step) == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return state, out

    tr.step = step_then_preempt
    first = tr.fit(str(tmp_path / "run"))
    del tr.step
    assert first.status == "preempted" and first.step == 4
    assert Checkpointer(str(tmp_path / "run")).all_steps() == [4]
    resumed = tr.fit(str(tmp_path / "run"))
    assert resumed.status == "done" and resumed.step == 12
    _assert_trees_equal(resumed.state, reference.state)
    # Same data order: the logged losses of every step agree exactly.
    assert [(r["step"], r["loss"]) for r in _rows(tmp_path / "run")] == \
        [(r["step"], r["loss"]) for r in _rows(ref_dir)]


def _train_cmd(workdir, *overrides):
    return [sys.executable, "-m", "launch.train", "--config=configs/toy.py:tiny", f"--workdir={workdir}",
            "--config.train.progress_bar=False", *overrides]


def _wait_for(predicate, proc, timeout=120):
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "timed out"
        time.sleep(0.2)


def test_launch_train_sigterm_exits_zero_and_resumes(tmp_path, tiny_config, subprocess_env):
    workdir = tmp_path / "run"
    proc = subprocess.Popen(_train_cmd(workdir, "--config.train.num_steps=100000", "--config.train.log_every=1"),
                            cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = workdir / "metrics.jsonl"
    _wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "preempted: checkpoint saved at step" in err
    ckpt = Checkpointer(str(workdir))
    stopped = ckpt.latest_step()
    assert stopped is not None and stopped >= 2 and f"at step {stopped} in" in err
    restored = trainer_lib.Trainer(tiny_config()).restore_or_init(ckpt)  # (resuming is tested above)
    assert int(restored.step) == stopped


