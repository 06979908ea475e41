"""A run SIGKILLed in the middle of a checkpoint save resumes from the last good one, bitwise, and logs each step
once (metrics.jsonl and TensorBoard events).

The kill is deterministic: a hook inside the killed process blocks the save of step 8 at a known point and
says so through a marker file; only then is the process killed. (The earlier version wrote its marker on
entering the data item's save, before that item's files existed, and could be killed before the step's
temporary directory appeared.) Two points of the save are covered:

* ``item``: the data-iterator item of step 8 has been written into the step's temporary directory; the
  array items have not (the trainer is blocked inside ``ckpt.save(8)``, having logged steps 1-8).
* ``rename``: every item of step 8 is written and only the atomic rename ``8.orbax-checkpoint-tmp`` ->
  ``8`` is left; training went on in the meantime and logged steps 9-12 before blocking in the final save.
"""

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest

import defi_jax  # noqa: F401
from configs import toy
from defi_jax import sharding, trainer as trainer_lib
from defi_jax.checkpoint import Checkpointer

ROOT = Path(__file__).resolve().parents[1]
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
# Subprocesses get the same fast-compile options through XLA_FLAGS.
SUB_ENV = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", XLA_FLAGS=(
    "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
    "--xla_llvm_disable_expensive_passes=true"))
TRAIN = dict(num_steps=12, save_every=4, log_every=1, eval_every=6)
MESH = (2, 4, 1)


def _config():
    c = toy.get_config("tiny")
    c.train.compiler_options = FAST
    c.train.progress_bar = False
    for k, v in TRAIN.items():
        c.train[k] = v
    return c


def _assert_trees_equal(a, b):
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))


def _rows(workdir):
    return [json.loads(line) for line in open(Path(workdir) / "metrics.jsonl") if '"loss"' in line]


def _scalar_events(workdir, tag):
    """``[(step, value)]`` of scalar ``tag`` over every event file, in file order; parsed here from the TFRecord
    framing (u64 length, u32 CRC, payload, u32 CRC) independently of defi_jax.metrics."""
    from tensorboardX.proto import event_pb2

    out = []
    for path in sorted((Path(workdir) / "tensorboard").glob("events.out.tfevents.*")):
        data, at = path.read_bytes(), 0
        while at + 12 <= len(data):
            (n,) = struct.unpack("<Q", data[at:at + 8])
            assert at + 16 + n <= len(data), f"{path}: a cut-off record at byte {at}"
            event = event_pb2.Event.FromString(data[at + 12:at + 12 + n])
            out += [(event.step, v.simple_value) for v in event.summary.value if v.tag == tag]
            at += 16 + n
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One trainer (compiled once) and its uninterrupted 12-step run."""
    tr = trainer_lib.Trainer(_config(), mesh=sharding.make_mesh(
        ml_collections.ConfigDict(dict(shape=MESH)), devices=jax.devices()[:int(np.prod(MESH))]))
    workdir = tmp_path_factory.mktemp("reference")
    result = tr.fit(str(workdir))
    assert result.status == "done" and result.step == 12
    return tr, result, workdir


# Runs launch.train with the save of step 8 blocked at a point of the save (argv[2]); a marker file (argv[1])
# appears once the process is parked there.
_KILL_DURING_SAVE = """
import os, sys, time
from orbax.checkpoint._src.path import atomicity
from defi_jax import checkpoint, config_validation
MARKER, POINT = sys.argv[1], sys.argv[2]

def park(what):
    with open(MARKER + ".tmp", "w") as f:
        f.write(what)
    os.replace(MARKER + ".tmp", MARKER)
    time.sleep(600)

def is_step_8(path):
    return any(p.name.split(".")[0] == "8" and p.parent.name == "checkpoints" for p in [path, *path.parents])

orig_data_save = checkpoint.DataStateHandler.save
def data_save(self, directory, args):
    orig_data_save(self, directory, args)
    if POINT == "item" and is_step_8(directory):
        park(str(directory))          # step 8's data item is on disk; its arrays are not
checkpoint.DataStateHandler.save = data_save

orig_finalize = atomicity.AtomicRenameTemporaryPath.finalize
async def finalize(self, *args, **kwargs):
    final = self.get_final()
    if POINT == "rename" and final.name == "8" and final.parent.name == "checkpoints":
        park(str(final))              # all of step 8 is written; only its rename is left
    return await orig_finalize(self, *args, **kwargs)
atomicity.AtomicRenameTemporaryPath.finalize = finalize

from absl import app
from launch import train
sys.argv = ["train"] + sys.argv[3:]
app.run(train.main, flags_parser=config_validation.parse_flags)
"""


def _wait_for(predicate, proc, timeout=300):
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "timed out"
        time.sleep(0.2)


@pytest.mark.parametrize("point,logged_until", [("item", 8), ("rename", 12)])
def test_sigkill_during_save_resumes_from_last_good(tmp_path, reference, point, logged_until):
    tr, reference, ref_dir = reference
    workdir, marker = tmp_path / "run", tmp_path / "parked"
    args = ["--config=configs/toy.py:tiny", f"--workdir={workdir}", "--config.train.progress_bar=False",
            f"--config.mesh.shape={MESH}".replace(" ", ""), *(f"--config.train.{k}={v}" for k, v in TRAIN.items())]
    proc = subprocess.Popen([sys.executable, "-c", _KILL_DURING_SAVE, str(marker), point, *args], cwd=ROOT,
                            env=SUB_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Parked in the save of step 8, having logged every step it will log (deterministic, see the docstring).
        _wait_for(lambda: marker.exists() and workdir.joinpath("metrics.jsonl").exists() and
                  logged_until in [r["step"] for r in _rows(workdir)], proc)
    finally:
        proc.kill()
        proc.communicate()
    names = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    assert "4" in names and "8" not in names, names                 # step 8 was never finalized
    assert "8.orbax-checkpoint-tmp" in names, names                 # it was being written
    tmp = workdir / "checkpoints" / "8.orbax-checkpoint-tmp"
    if point == "item":
        assert list(tmp.glob("data*/process_0-of-1.json")), sorted(p.name for p in tmp.iterdir())
    assert Checkpointer(str(workdir), read_only=True).latest_step() == 4
    assert [r["step"] for r in _rows(workdir)] == list(range(1, logged_until + 1))
    assert [s for s, _ in _scalar_events(workdir, "loss")][-1] >= 5   # the killed run logged past step 4

    # Resume in-process (same compile options as the subprocess) and compare with an uninterrupted run.
    resumed = tr.fit(str(workdir))
    assert resumed.status == "done" and resumed.step == 12
    _assert_trees_equal(resumed.state, reference.state)
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["12", "4", "8"]
    # The steps the killed run logged after step 4 were redone; each step is logged once, with the losses of
    # the uninterrupted run, in metrics.jsonl and in the TensorBoard events.
    want = [(r["step"], r["loss"]) for r in _rows(ref_dir)]
    assert [(r["step"], r["loss"]) for r in _rows(workdir)] == want
    events = _scalar_events(workdir, "loss")
    assert [s for s, _ in events] == list(range(1, 13)), events
    np.testing.assert_array_equal([v for _, v in events], np.float32([loss for _, loss in want]))
