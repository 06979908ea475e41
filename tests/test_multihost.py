"""Two processes (jax.distributed on 127.0.0.1, 4 fake CPU devices each) train, get preempted, checkpoint
and resume together."""

import json
import signal
import socket
import subprocess
import sys
import time
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


def _start_two_processes(subprocess_env, workdir, *overrides):
    port = _free_port()
    procs = []
    for pid in range(2):
        env = subprocess_env(devices=4, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                             JAX_PROCESS_ID=str(pid))
        cmd = [sys.executable, "-m", "launch.train", "--config=configs/toy.py:tiny", f"--workdir={workdir}",
               "--config.train.log_every=1", "--config.mesh.shape=(2,-1,1)", "--config.train.progress_bar=False",
               *overrides]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    return procs


def _finish(procs):
    errs = [p.communicate(timeout=300)[1] for p in procs]
    for p, err in zip(procs, errs):
        assert p.returncode == 0, err[-4000:]
    return errs


def _logged_steps(workdir):
    return [json.loads(line)["step"] for line in open(workdir / "metrics.jsonl") if '"loss"' in line]


def test_two_processes_train_preempt_checkpoint_and_resume(tmp_path, subprocess_env):
    workdir = tmp_path / "run"
    procs = _start_two_processes(subprocess_env, workdir, "--config.train.num_steps=100000", "--config.train.save_every=2")
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert all(p.poll() is None for p in procs), [p.communicate()[1][-3000:] for p in procs]
        assert time.time() < deadline, "timed out"
        time.sleep(0.2)
    for p in procs:  # a pod preemption: every host gets SIGTERM
        p.send_signal(signal.SIGTERM)
    errs = _finish(procs)
    assert all(f"process {i} of 2, 4 local / 8 global devices" in err for i, err in enumerate(errs))
    # JAX's preemption sync point makes both processes stop and save at the same step.
    stopped = Checkpointer(str(workdir)).latest_step()
    assert all(f"preempted: checkpoint saved at step {stopped} " in err for err in errs)
    # Each process saved its own data-iterator position in the same step.
    data_dir = workdir / "checkpoints" / str(stopped) / "data"
    names = sorted(p.name for p in data_dir.glob("process_*.json"))
    assert names == ["process_0-of-2.json", "process_1-of-2.json"]
    positions = [json.loads((data_dir / n).read_text())["json"] for n in names]
    assert positions[0] == positions[1]  # same number of batches consumed, from disjoint slices
    # Only process 0 wrote metrics: one row per step.
    assert _logged_steps(workdir) == list(range(1, stopped + 1))

    # Both processes resume together.
    errs = _finish(_start_two_processes(subprocess_env, workdir, f"--config.train.num_steps={stopped + 2}"))
    assert all(f"at step {stopped}" in err and "resumed from" in err for err in errs)
    assert _logged_steps(workdir) == list(range(1, stopped + 3))

    # The 2-process checkpoint restores in one process on 8 devices (model state only: the data
    # positions belong to the 2-process layout).
    config = toy.get_config("tiny")
    state = trainer_lib.Trainer(config).restore_or_init(Checkpointer(str(workdir)))
    assert int(state.step) == stopped + 2
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state.params)))
