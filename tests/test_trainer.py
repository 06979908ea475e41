"""The one trainer: sharding equivalence, frozen sub-trees, NaN guard, grad accumulation, EMA, schedules."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import defi_jax  # noqa: F401
from configs import toy
from defi_jax import optim, trainer as trainer_lib
from defi_jax.toy import STAGE

# tiny_config (configs/toy.py:tiny, fast compiles: the tests compare runs compiled the same way) and make_mesh
# are tests/conftest.py fixtures.


def _on(tr, state):
    """A copy of ``state`` laid out for trainer ``tr`` (saves compiling the initializer again)."""
    return jax.device_put(jax.device_get(state), tr.state_shardings)


def _losses(config, mesh, steps, state0=None):
    tr = trainer_lib.Trainer(config, mesh=mesh)
    state = tr.init_state() if state0 is None else _on(tr, state0)
    data = STAGE.make_data(config, 0, 1, "train")
    losses = []
    for _ in range(steps):
        state, out = tr.step(state, tr.global_batch(next(data)))
        losses.append(float(out["loss"]))
    return np.array(losses), state


def test_same_losses_on_different_meshes(tiny_config, make_mesh):
    config = tiny_config(batch_size=16)
    state0 = trainer_lib.Trainer(config, mesh=make_mesh((1, 1, 1))).init_state()
    ref, _ = _losses(config, make_mesh((1, 1, 1)), 5, state0)
    assert ref[-1] < ref[0]  # it learns
    for shape in [(2, 2, 2), (1, 8, 1)]:
        losses, state = _losses(config, make_mesh(shape), 5, state0)
        np.testing.assert_allclose(losses, ref, rtol=1e-5, atol=1e-7, err_msg=str(shape))
    # (1, 8, 1) really shards: the MLP's [embed, mlp] kernel is split over fsdp.
    kernel = state.params["mlp"]["up"]["kernel"]
    assert kernel.sharding.spec[0] == "fsdp" and len(kernel.addressable_shards[0].data) == kernel.shape[0] // 8


def test_frozen_subtrees_get_no_optimizer_state_and_stay_fixed(tiny_config, make_mesh):
    config = tiny_config(frozen=("^encoder/",))
    tr = trainer_lib.Trainer(config, mesh=make_mesh((2, 2, 2)))
    state = tr.init_state()
    before = jax.device_get(state.frozen)
    before_mlp = jax.device_get(state.params["mlp"])
    assert set(state.params) == {"mlp", "decoder"} and set(state.frozen) == {"encoder"}
    opt_paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]]
    assert any("mlp" in p for p in opt_paths) and not any("encoder" in p for p in opt_paths)
    data = STAGE.make_data(config, 0, 1, "train")
    for _ in range(3):
        state, _ = tr.step(state, tr.global_batch(next(data)))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.frozen), before)
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), jax.device_get(state.params["mlp"]), before_mlp)
    assert all(jax.tree.leaves(changed))


def test_nonfinite_guard_skips_then_stops(tmp_path, tiny_config, make_mesh):
    config = tiny_config(max_nonfinite_steps=3, num_steps=20, log_every=1)
    tr = trainer_lib.Trainer(config, mesh=make_mesh((8, 1, 1)))
    state = tr.init_state()
    good = next(STAGE.make_data(config, 0, 1, "train"))
    bad = dict(good, frames=np.full_like(good["frames"], np.nan))
    params0 = jax.device_get(state.params)
    state, out = tr.step(state, tr.global_batch(bad))
    assert int(out["skipped_steps"]) == 1 and int(out["nonfinite_steps"]) == 1 and int(state.step) == 1
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), params0)
    state, out = tr.step(state, tr.global_batch(good))
    assert int(out["nonfinite_steps"]) == 0 and int(out["skipped_steps"]) == 1

    # fit() stops after max_nonfinite_steps bad steps in a row, with an error naming the knob.
    def nan_data(config, pi, pc, split):
        it = STAGE.make_data(config, pi, pc, split)

        class Nan:
            def __next__(self):
                b = next(it)
                return dict(b, frames=b["frames"] * np.nan)
            get_state, set_state = it.get_state, it.set_state
        return Nan()

    tr.stage = dataclasses.replace(STAGE, make_data=nan_data)
    with pytest.raises(trainer_lib.NonFiniteError, match="max_nonfinite_steps=3"):
        tr.fit(str(tmp_path))
    rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert rows[0]["skipped_steps"] == 1 and rows[-1]["skipped_steps"] >= 3


def test_grad_accumulation_equals_big_batch_step(tiny_config, make_mesh):
    mesh = make_mesh((2, 2, 1))
    config = tiny_config(batch_size=16)
    batch = next(STAGE.make_data(config, 0, 1, "train"))
    results, state0 = [], None
    for accum in (1, 4):
        config.train.grad_accum_steps = accum
        tr = trainer_lib.Trainer(config, mesh=mesh)
        state0 = tr.init_state() if state0 is None else state0
        state, out = tr.step(_on(tr, state0), tr.global_batch(batch))
        results.append((float(out["loss"]), float(out["grad_norm"]), jax.device_get(state.params)))
    (l1, g1, p1), (l4, g4, p4) = results
    np.testing.assert_allclose(l4, l1, rtol=1e-5)
    np.testing.assert_allclose(g4, g1, rtol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), p4, p1)


def test_ema_bf16_and_remat(tiny_config, make_mesh):
    mesh = make_mesh((2, 1, 1))
    batch = next(STAGE.make_data(tiny_config(), 0, 1, "train"))
    config = tiny_config(ema_decay=0.9, schedule="constant", warmup_steps=0)
    tr = trainer_lib.Trainer(config, mesh=mesh)
    state = state0 = tr.init_state()
    p0 = jax.device_get(state.params)
    state = _on(tr, state0)
    state, out = tr.step(state, tr.global_batch(batch))
    p1, ema = jax.device_get(state.params), jax.device_get(state.ema)
    jax.tree.map(lambda e, a, b: np.testing.assert_allclose(e, 0.9 * a + 0.1 * b, rtol=1e-6, atol=1e-7),
                 ema, p0, p1)
    assert not np.array_equal(ema["mlp"]["up"]["kernel"], p1["mlp"]["up"]["kernel"])
    ref_loss = float(out["loss"])

    # bf16 compute keeps fp32 master weights and a close loss; remat changes memory, not values.
    tr16 = trainer_lib.Trainer(tiny_config(compute_dtype="bfloat16", ema_decay=0.9), mesh=mesh)
    s16, out16 = tr16.step(_on(tr16, state0), tr16.global_batch(batch))
    assert s16.params["mlp"]["up"]["kernel"].dtype == jnp.float32
    np.testing.assert_allclose(float(out16["loss"]), ref_loss, rtol=5e-2)
    assert float(out16["loss"]) != ref_loss  # really computed in bf16
    trr = trainer_lib.Trainer(tiny_config(remat_policy="full", ema_decay=0.9), mesh=mesh)
    _, outr = trr.step(_on(trr, state0), trr.global_batch(batch))
    np.testing.assert_allclose(float(outr["loss"]), ref_loss, rtol=1e-6)


def test_schedules(tiny_config):
    t = tiny_config(lr=1.0, num_steps=1000, schedule="tri_stage").train
    f = optim.schedule(t)
    np.testing.assert_allclose([f(0), f(20), f(50), f(100), f(1000)], [0.01, 1.0, 1.0, 1.0, 0.01], rtol=1e-4)
    assert 0.01 < f(550) < 1.0
    t.schedule, t.warmup_steps = "warmup_cosine", 100
    f = optim.schedule(t)
    np.testing.assert_allclose([f(0), f(100), f(1000)], [0.0, 1.0, 0.0], atol=1e-6)
    t.schedule = "constant"
    np.testing.assert_allclose(optim.schedule(t)(500), 1.0)


def test_describe_helpers_and_aot_compile(tiny_config):
    config = tiny_config()
    config.mesh.shape = (2, 2, 2)
    counts = trainer_lib.param_counts(config)
    assert set(counts) == {"encoder", "mlp", "decoder", "total"}
    assert counts["total"] == sum(v for k, v in counts.items() if k != "total")
    mem = trainer_lib.state_bytes_per_device(config)
    # AdamW keeps two fp32 moments per param; the MLP is split over fsdp x tensor, so < 3x full size.
    assert mem["opt_state"] > mem["params"] > 0 and mem["params"] < 4 * counts["total"]
    compiled, stats = trainer_lib.compile_train_step(config)
    assert stats["argument"] > 0 and stats["peak_estimate"] > 0


def test_launch_describe_and_benchmark_table(tmp_path, subprocess_env):
    import subprocess
    import sys
    from pathlib import Path

    from launch import benchmark
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-m", "launch.describe", "--config=configs/toy.py:tiny", "--num_devices=8",
         "--config.mesh.shape=(2,2,2)", "--compile"], cwd=root, capture_output=True, text=True, timeout=300,
        env=subprocess_env(devices=0))
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(line.split(": ", 1) for line in out.stdout.splitlines())
    counts = trainer_lib.param_counts(toy.get_config("tiny"))
    assert {k: int(lines[k]) for k in counts} == counts
    assert lines["mesh"].startswith("data=2 fsdp=2 tensor=2")
    assert int(lines["state_bytes_per_device.params"].split()[0]) > 0
    assert int(lines["compiled_bytes_per_device.temp"].split()[0]) > 0

    assert "trainer" in benchmark.cases()
    text = benchmark.table([{"case": "x", "median_s": 0.5}, {"case": "y", "ratio": 2.0}])
    assert text.splitlines()[0].split() == ["case", "median_s", "ratio"] and "0.5" in text
