"""Training progress is readable on a terminal (a tqdm bar), under a zero-width pseudo-terminal (``script``, CI
runners) and in a log file (one plain line per ``log_every`` steps, no carriage-return redraws)."""

import fcntl
import io
import os
import pty
import re
import select
import shutil
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from defi_jax import metrics

ROOT = Path(__file__).resolve().parents[1]
SUB_ENV = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", XLA_FLAGS=(
    "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
    "--xla_llvm_disable_expensive_passes=true"))
SUB_ENV.pop("COLUMNS", None)
LINE = re.compile(r"^train (\d+)/(\d+) \((\d+)%\)( [\d.e+]+ steps/s eta \d+:\d\d:\d\d)? loss=[\d.e+-]+$")


def _pty(columns):
    """A pseudo-terminal (master fd, slave file object) reporting ``columns`` columns."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    return master, os.fdopen(slave, "w")


def _read_all(master):
    """Everything written to the pty so far."""
    out = b""
    while select.select([master], [], [], 0.5)[0]:
        chunk = os.read(master, 65536)
        if not chunk:
            break
        out += chunk
    return out.decode()


def _drive(bar, total, log_every):
    for step in range(bar.n + 1, total + 1):
        bar.update(1)
        if step % log_every == 0 or step == total:
            bar.set_postfix(loss=f"{1 / step:.4g}")
    bar.close()


def test_log_file_gets_a_line_per_log_step(tmp_path):
    with open(tmp_path / "train.log", "w") as log:
        bar = metrics.progress_bar(10, 2, enabled=True, stream=log)   # resumed at step 2
        assert isinstance(bar, metrics.ProgressLines)
        _drive(bar, 10, log_every=4)
    text = (tmp_path / "train.log").read_text()
    assert "\r" not in text
    lines = text.splitlines()
    assert [LINE.match(line).group(1, 2, 3) for line in lines] == [("4", "10", "40"), ("8", "10", "80"),
                                                                     ("10", "10", "100")], lines
    assert lines[-1].endswith("loss=0.1") and "steps/s eta 0:00:00" in lines[-1]
    assert metrics.progress_bar(10, 0, enabled=False, stream=io.StringIO()) is None


def test_terminal_gets_a_bar_and_zero_width_terminal_gets_lines(monkeypatch):
    from tqdm import tqdm

    monkeypatch.delenv("COLUMNS", raising=False)
    master, term = _pty(100)
    with term:
        bar = metrics.progress_bar(6, 0, enabled=True, stream=term)
        assert isinstance(bar, tqdm) and metrics.terminal_width(term) == 100
        _drive(bar, 6, log_every=2)
        drawn = _read_all(master)
    os.close(master)
    assert "\r" in drawn and "train: 100%" in drawn and "6/6" in drawn and "loss=0.1667" in drawn, drawn

    master, term = _pty(0)
    with term:
        assert metrics.terminal_width(term) == 0
        bar = metrics.progress_bar(6, 0, enabled=True, stream=term)
        assert isinstance(bar, metrics.ProgressLines)
        _drive(bar, 6, log_every=3)
        drawn = _read_all(master).replace("\r\n", "\n")   # the pty turns \n into \r\n
        monkeypatch.setenv("COLUMNS", "80")   # a size given by the environment where the terminal has none
        assert metrics.terminal_width(term) == 80
    os.close(master)
    assert "\r" not in drawn and [LINE.match(line).group(1) for line in drawn.splitlines()] == ["3", "6"], drawn


def _train_cmd(workdir):
    return [sys.executable, "-m", "launch.train", "--config=configs/toy.py:tiny", f"--workdir={workdir}",
            "--config.train.num_steps=6", "--config.train.log_every=2"]


def _run_in_zero_width_pty(cmd):
    """stdout+stderr of ``cmd`` run on a pseudo-terminal of 0 columns: under ``script`` where the image has it
    (as CI runners do), else on a pty made here."""
    if shutil.which("script"):
        line = "stty cols 0 rows 0; exec " + " ".join(f"'{a}'" for a in cmd)
        proc = subprocess.run(["script", "-qec", line, "/dev/null"], cwd=ROOT, env=SUB_ENV, stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=300)
        return proc.returncode, proc.stdout.decode(errors="replace")
    master, term = _pty(0)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=SUB_ENV, stdin=subprocess.DEVNULL, stdout=term, stderr=term)
    term.close()
    out = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:   # EIO: the child closed the pty
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    return proc.wait(timeout=300), out.decode(errors="replace")


def _assert_readable(out):
    assert "\r" not in out, out[-2000:]
    lines = out.splitlines()
    assert lines[0].startswith("launch.train: configs/toy.py:tiny (stage toy, 6 steps) -> "), lines[0]
    steps = [LINE.match(line).group(1) for line in lines if LINE.match(line)]
    assert steps == ["2", "4", "6"], out[-2000:]
    assert lines[-1].startswith("launch.train: done at step 6") and "metrics " in lines[-1], lines[-1]


def test_launch_train_under_zero_width_pty(tmp_path):
    rc, out = _run_in_zero_width_pty(_train_cmd(tmp_path / "run"))
    assert rc == 0, out[-3000:]
    _assert_readable(out.replace("\r\n", "\n"))


def test_launch_train_into_a_log_file(tmp_path):
    with open(tmp_path / "train.log", "w") as log:
        proc = subprocess.run(_train_cmd(tmp_path / "run"), cwd=ROOT, env=SUB_ENV, stdin=subprocess.DEVNULL,
                              stdout=log, stderr=subprocess.STDOUT, timeout=300)
    out = (tmp_path / "train.log").read_text()
    assert proc.returncode == 0, out[-3000:]
    _assert_readable(out)


def test_launch_train_silences_the_resource_trackers_leak_notice():
    """grain's workers leave shared-memory blocks to the resource tracker; its exit notice is silenced by the
    entry point (and only by it: without the entry point's filter the same program prints it)."""
    leak = ("from multiprocessing import shared_memory\n"
            "m = shared_memory.SharedMemory(create=True, size=64)\n"
            "m.close()\n")   # never unlinked: the resource tracker frees it at exit
    env = dict(SUB_ENV, PYTHONWARNINGS="")
    plain = subprocess.run([sys.executable, "-c", leak], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=120)
    assert plain.returncode == 0 and "leaked shared_memory" in plain.stderr, plain.stderr
    quiet = subprocess.run([sys.executable, "-c", "import launch.train\n" + leak], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
    assert quiet.returncode == 0, quiet.stderr
    assert "leaked" not in quiet.stderr and "resource_tracker" not in quiet.stderr, quiet.stderr
