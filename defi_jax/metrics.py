"""Training metrics: ``metrics.jsonl``, TensorBoard events, a progress bar, throughput and MFU.

Only process 0 writes; the other processes get a writer that does nothing.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import sys
import tempfile
import time
import uuid
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

    On resume at step S (``resume_step``), what an interrupted run logged after S is dropped, as those steps
    are trained again: rows of metrics.jsonl, and events of the existing event files (rewritten without
    them); the new event file also starts with TensorBoard's purge marker (``purge_step=S + 1``), so a
    TensorBoard that already loaded the old events drops them too. Each step then appears once.

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
        purged = _purge_events(paths.join(workdir, "tensorboard"), resume_step) if resume_step is not None else 0
        try:
            from tensorboardX import SummaryWriter
            # A unique suffix: tensorboardX names files by the second and host, and a resume within the same
            # second would overwrite the earlier file (locally, or on upload).
            self._tb = SummaryWriter(os.path.join(self._local, "tensorboard"),
                                     filename_suffix=f".{uuid.uuid4().hex[:8]}",
                                     purge_step=resume_step + 1 if purged else None)
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


def _records(data: bytes):
    """The complete TFRecords of an event file as ``(raw record bytes, payload)``; a cut-off tail is dropped."""
    at = 0
    while at + 12 <= len(data):
        (n,) = struct.unpack("<Q", data[at:at + 8])
        end = at + 12 + n + 4          # length, its CRC, payload, payload CRC
        if end > len(data):
            return
        yield data[at:end], data[at + 12:at + 12 + n]
        at = end


def _purge_events(tb_dir: str, step: int) -> int:
    """Rewrites the event files in ``tb_dir`` (local or URI) without events after ``step``; returns the count
    of event files found (0: nothing was logged before, so no purge marker is needed)."""
    if not paths.isdir(tb_dir):
        return 0
    from tensorboardX.proto import event_pb2

    names = [n for n in paths.listdir(tb_dir) if ".tfevents." in n]
    for name in names:
        path = paths.join(tb_dir, name)
        data, keep = paths.read_bytes(path), []
        for raw, payload in _records(data):
            try:
                event = event_pb2.Event.FromString(payload)
            except Exception:   # protobuf's DecodeError: a record the killed run left garbled ends the file
                break
            if event.step <= step:
                keep.append(raw)
        kept = b"".join(keep)
        if kept != data:
            paths.write_bytes(path, kept)
    return len(names)


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


def progress_bar(total: int, initial: int, enabled: bool, *, stream=None):
    """Training progress on ``stream`` (default stderr), readable wherever it goes; None when not ``enabled``.

    * An interactive terminal with a width: a tqdm bar redrawn in place (carriage returns).
    * A pseudo-terminal of zero width (``script``, CI runners: they report 0 columns, where tqdm would draw
      nothing useful) or a non-terminal (a log file, a pipe): :class:`ProgressLines`, one plain line per
      :meth:`~ProgressLines.set_postfix` call, which the trainer makes every ``config.train.log_every`` steps.
    """
    if not enabled:
        return None
    stream = sys.stderr if stream is None else stream
    width = terminal_width(stream)
    if width:
        from tqdm import tqdm
        return tqdm(total=total, initial=initial, file=stream, dynamic_ncols=True, desc="train")
    return ProgressLines(total, initial, stream)


def terminal_width(stream) -> int:
    """Columns of the terminal ``stream`` writes to; 0 for a non-terminal or a zero-width pseudo-terminal.

    ``COLUMNS`` (when a positive number) stands in for a terminal that reports no size."""
    try:
        if not stream.isatty():
            return 0
        columns = os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return 0
    if columns <= 0:
        env = os.environ.get("COLUMNS", "")
        columns = int(env) if env.isdigit() else 0
    return columns


class ProgressLines:
    """Progress as whole lines (no carriage returns), for logs: ``train 40/100 (40%) 3.2 steps/s eta 0:00:19
    loss=0.1234``. The same calls as a tqdm bar (``update``, ``set_postfix``, ``close``)."""

    def __init__(self, total: int, initial: int, stream):
        self.total, self.n, self._stream = total, initial, stream
        self._t0 = self._n0 = None   # the rate is timed from the end of the first (compiling) step

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._t0 is None:
            self._t0, self._n0 = time.monotonic(), self.n

    def set_postfix(self, **values) -> None:
        self._stream.write(self.line(values) + "\n")
        self._stream.flush()

    def line(self, values: dict | None = None) -> str:
        elapsed = time.monotonic() - self._t0 if self._t0 is not None else 0.0
        rate = (self.n - self._n0) / elapsed if elapsed > 0 and self.n > self._n0 else None
        parts = [f"train {self.n}/{self.total} ({100 * self.n / max(self.total, 1):.0f}%)"]
        if rate:
            eta = int(round((self.total - self.n) / rate))
            parts.append(f"{rate:.3g} steps/s eta {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}")
        parts += [f"{k}={v}" for k, v in (values or {}).items()]
        return " ".join(parts)

    def close(self) -> None:
        pass
