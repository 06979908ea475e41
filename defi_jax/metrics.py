"""Training metrics: ``metrics.jsonl``, TensorBoard events, a progress bar, throughput and MFU.

Only process 0 writes; the other processes get a writer that does nothing.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Any

import jax

from defi_jax import paths

# Peak dense bf16 FLOP/s per device (chip for TPU, GPU otherwise), from the vendors' spec sheets.
PEAK_FLOPS = (
    ("TPU v6", 918e12), ("TPU v5p", 459e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12),
    ("TPU v5", 459e12), ("TPU v4", 275e12), ("H200", 989e12), ("H100", 989e12), ("A100", 312e12),
)


def peak_flops(device: jax.Device | None = None) -> float | None:
    """Peak FLOP/s of ``device`` (default: the first device), None where unknown (CPU)."""
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return None
    kind = device.device_kind
    for name, flops in PEAK_FLOPS:
        if name.lower() in kind.lower():
            return flops
    return None


def compiled_flops(compiled) -> float | None:
    """FLOPs of one call of a compiled executable, per device, from XLA's cost analysis."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # some backends do not implement it
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops and flops > 0 and math.isfinite(flops) else None


def _scalar(v):
    v = v.item() if hasattr(v, "item") else v
    return float(v) if isinstance(v, float) or not isinstance(v, (int, bool)) else int(v)


class MetricWriter:
    """Writes scalars to ``workdir/metrics.jsonl`` and TensorBoard events under ``workdir/tensorboard``.

    A local workdir is written in place. A ``gs://`` workdir (any URI :mod:`defi_jax.paths` reads) gets
    both written to a local staging folder and uploaded as whole files at most every ``sync_every_s``
    seconds and on :meth:`close`: object stores cannot append, and tensorboardX writes local files only.
    """

    def __init__(self, workdir: str | None, *, enabled: bool = True, resume_step: int | None = None,
                 sync_every_s: float = 60.0):
        """``resume_step``: drop rows logged after it by an earlier, interrupted run (they are redone)."""
        self.enabled = enabled and workdir is not None
        self._jsonl = self._tb = None
        if not self.enabled:
            return
        self.workdir = workdir
        self._remote = paths.is_remote(workdir)
        self._local = tempfile.mkdtemp(prefix="defi_jax_metrics_") if self._remote else workdir
        self._sync_every_s, self._synced_at = sync_every_s, time.monotonic()
        os.makedirs(self._local, exist_ok=True)
        path, local_path = paths.join(workdir, "metrics.jsonl"), os.path.join(self._local, "metrics.jsonl")
        if paths.exists(path) and (resume_step is not None or self._remote):
            # Keep the rows up to the resumed step; a line cut short by a killed run is dropped too.
            paths.write_text(local_path, "".join(_rows_up_to(paths.read_text(path), resume_step)))
        self._jsonl = open(local_path, "a")
        try:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.path.join(self._local, "tensorboard"))
        except ImportError:  # tensorboardX is optional at runtime
            self._tb = None

    def write(self, step: int, scalars: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step)} | {k: _scalar(v) for k, v in scalars.items()}
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k != "step":
                    self._tb.add_scalar(k, v, int(step))
            self._tb.flush()
        if self._remote and time.monotonic() - self._synced_at >= self._sync_every_s:
            self._upload()

    def _upload(self) -> None:
        """Copies the staged metrics.jsonl and event files to the remote workdir."""
        for folder, _, files in os.walk(self._local):
            for name in files:
                rel = os.path.relpath(os.path.join(folder, name), self._local)
                paths.copy(os.path.join(folder, name), paths.join(self.workdir, *rel.split(os.sep)))
        self._synced_at = time.monotonic()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self.enabled and self._remote:
            self._upload()
            shutil.rmtree(self._local, ignore_errors=True)
        self._jsonl = self._tb = None


def _rows_up_to(text: str, step: int | None) -> list[str]:
    """The complete JSON lines of ``text`` (a metrics.jsonl) whose step is <= ``step`` (all for None)."""
    keep = []
    for line in text.splitlines(keepends=True):
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if line.endswith("\n") and (step is None or row["step"] <= step):
            keep.append(line)
    return keep


class Throughput:
    """steps/s, examples/s and MFU between two calls of :meth:`measure`."""

    def __init__(self, batch_size: int, flops_per_step_per_device: float | None):
        self.batch_size = batch_size
        self.flops = flops_per_step_per_device
        self.peak = peak_flops()
        self._t, self._step = None, None

    def start(self, step: int) -> None:
        self._t, self._step = time.perf_counter(), step

    def measure(self, step: int) -> dict[str, float]:
        now = time.perf_counter()
        out = {}
        if self._t is not None and step > self._step:
            sps = (step - self._step) / (now - self._t)
            out = {"steps_per_s": sps, "examples_per_s": sps * self.batch_size}
            if self.flops and self.peak:
                out["mfu"] = self.flops * sps / self.peak
        self._t, self._step = now, step
        return out


def progress_bar(total: int, initial: int, enabled: bool):
    """A tqdm bar on an interactive terminal, nothing otherwise (logs, CI)."""
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, dynamic_ncols=True, desc="train")
