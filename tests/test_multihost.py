"""Two processes (jax.distributed on 127.0.0.1, 4 fake CPU devices each) train and checkpoint together."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

import defi_jax  # noqa: F401
from configs import toy
from defi_jax import trainer as trainer_lib
from defi_jax.checkpoint import Checkpointer

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_processes(workdir, num_steps):
    port = _free_port()
    procs = []
    for pid in range(2):
        env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
                   JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid),
                   XLA_FLAGS="--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0 "
                             "--xla_llvm_disable_expensive_passes=true")
        cmd = [sys.executable, "-m", "launch.train", "--config=configs/toy.py:tiny", f"--workdir={workdir}",
               f"--config.train.num_steps={num_steps}", "--config.train.save_every=3",
               "--config.train.log_every=1", "--config.mesh.shape=(2,-1,1)"]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    errs = []
    for p in procs:
        _, err = p.communicate(timeout=300)
        errs.append(err)
    for p, err in zip(procs, errs):
        assert p.returncode == 0, err[-4000:]
    return errs


def test_two_processes_train_checkpoint_and_resume(tmp_path):
    workdir = tmp_path / "run"
    errs = _run_two_processes(workdir, 4)
    assert all("process %d of 2, 4 local / 8 global devices" % i in err for i, err in enumerate(errs))
    ckpt_dir = workdir / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["3", "4"]
    # Each process saved its own data-iterator position in the same step.
    data = sorted(p.name for p in (ckpt_dir / "4" / "data").glob("process_*.json"))
    assert data == ["process_0-of-2.json", "process_1-of-2.json"]
    positions = [json.loads((ckpt_dir / "4" / "data" / n).read_text())["json"] for n in data]
    assert positions[0] == positions[1]  # same number of batches consumed, from disjoint slices
    # Only process 0 wrote metrics: one row per step.
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl") if '"loss"' in line]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]

    # Both processes resume together from step 4.
    errs = _run_two_processes(workdir, 6)
    assert all("at step 4" in err and "resumed from" in err for err in errs)
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl") if '"loss"' in line]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]

    # The 2-process checkpoint restores in one process on 8 devices (model state only: the data
    # positions belong to the 2-process layout).
    config = toy.get_config("tiny")
    tr = trainer_lib.Trainer(config)
    state = tr.restore_or_init(Checkpointer(str(workdir)))
    assert int(state.step) == 6
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state.params)))
