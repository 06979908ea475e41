"""Sweeps of one config key: one training run per (value, seed), then a CSV and a plot of a final metric.

Each run is ``python -m launch.train`` in a fresh process (a crash loses only that run), in
``<workdir>/<param>=<value>/seed=<seed>``, one after another. A run that finished leaves
``sweep_result.json`` (its step, metrics and command) and is skipped when the sweep is rerun with the same
command (a different one is refused); a run that stopped part-way resumes from its own checkpoints (the trainer
does that by itself). Entry point: ``python -m launch.sweep``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Sequence

from defi_jax import config_validation, paths

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT = "sweep_result.json"
# The metric a stage's sweep reads by default, first one present wins; "loss" (the last training loss) last.
DEFAULT_METRICS = {"gidm": ("probe_r2", "eval_action_info_gap"), "gfdm": ("eval_loss",)}


@dataclasses.dataclass
class Run:
    value: str                # as given on the command line
    seed: int
    workdir: str
    argv: list[str]           # the training command
    num_steps: int
    status: str = "pending"   # pending | done | skipped (done earlier) | failed (rc=N) | incomplete | stopped
    step: int | None = None
    metrics: dict = dataclasses.field(default_factory=dict)


def split_values(text: str) -> list[str]:
    """``0,0.25,0.5`` -> three values; commas inside brackets stay: ``(1,8,1),(2,4,1)`` -> two."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    out.append(cur.strip())
    if any(not v for v in out):
        raise ValueError(f"--values={text!r}: empty value")
    return out


def _safe(value: str) -> str:
    return "".join(c if c.isalnum() or c in "._-+()," else "_" for c in value)


def final_metrics(workdir: str) -> tuple[int | None, dict]:
    """(last logged step, the last value of every metric) from ``workdir/metrics.jsonl``."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return None, {}
    step, last = None, {}
    with open(path) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                step = max(step or 0, int(row["step"]))
                last |= {k: v for k, v in row.items() if k != "step"}
    return step, last


def choose_metric(stage: str, runs: Sequence[Run], metric: str | None) -> str:
    if metric:
        return metric
    seen = set().union(*(r.metrics for r in runs)) if runs else set()
    for name in DEFAULT_METRICS.get(stage, ()):
        if name in seen:
            return name
    return "loss"


def plan(config_spec: str, param: str, values: Sequence[str], seeds: Sequence[int] | None,
         overrides: Sequence[tuple[str, str]], workdir: str) -> tuple[str, list[Run]]:
    """(stage, runs). Every (value, seed) config is built and checked here, before anything trains, and so is
    every run finished before in ``workdir`` (:func:`check_finished`)."""
    path, colon, arg = config_spec.partition(":")
    spec = os.path.abspath(path) + colon + arg
    taken = {k for k, _ in overrides}
    if param in taken or (seeds and "seed" in taken):
        raise config_validation.ConfigError(f"config.{param if param in taken else 'seed'}: set by the sweep; "
                                            f"drop it from --set")
    base = config_validation.load_config(spec)
    config_validation.apply_overrides(base, list(overrides))
    seeds = list(seeds) if seeds else [int(base.seed)]
    runs = []
    for value in values:
        for seed in seeds:
            config = config_validation.load_config(spec)
            config_validation.apply_overrides(config, [*overrides, (param, value), ("seed", str(seed))])
            run_dir = os.path.join(workdir, f"{param}={_safe(value)}", f"seed={seed}")
            argv = [sys.executable, "-m", "launch.train", f"--config={spec}", f"--workdir={run_dir}",
                    *(f"--config.{k}={v}" for k, v in overrides), f"--config.{param}={value}",
                    f"--config.seed={seed}"]
            runs.append(Run(value, seed, run_dir, argv, int(config.train.num_steps)))
    check_finished(runs)
    return str(base.stage), runs


class _Stop:
    """SIGTERM / SIGINT to the sweep: passed on to the running training (it saves), then the sweep stops."""

    def __init__(self):
        self.child, self.requested = None, False

    def __call__(self, signum, frame):
        self.requested = True
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)


def _command(argv: Sequence[str]) -> dict:
    """What makes two trainings the same: the config file (relative to the repository, so that a clone elsewhere
    matches) and every ``--config.*`` override. The interpreter and the workdir are left out."""
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "")
    path, colon, arg = spec.partition(":")
    if os.path.isabs(path):
        path = os.path.relpath(path, ROOT)
    return {"config": path + colon + arg, "overrides": sorted(a for a in argv if a.startswith("--config."))}


def check_finished(runs: Sequence[Run]) -> None:
    """Refuses to reuse a finished run whose recorded command differs from the one planned for its workdir (a
    rerun with other flags would otherwise tabulate the old results under the new command line)."""
    bad: dict[str, list[str]] = {}   # what changed -> the run folders
    for run in runs:
        result = os.path.join(run.workdir, RESULT)
        if not run.argv or not os.path.exists(result):
            continue
        with open(result) as f:
            saved = json.load(f).get("command")
        want = _command(run.argv)
        if saved is None or saved == want:   # None: written before commands were recorded, cannot tell
            continue
        old, new = (dict(a.removeprefix("--config.").split("=", 1) for a in c["overrides"]) for c in (saved, want))
        changed = [f"{k} {old.get(k, '(unset)')} -> {new.get(k, '(unset)')}" for k in sorted(old.keys() | new.keys())
                   if old.get(k) != new.get(k)]
        if saved["config"] != want["config"]:
            changed.insert(0, f"config {saved['config']} -> {want['config']}")
        bad.setdefault(", ".join(changed), []).append(run.workdir)
    if bad:
        raise config_validation.ConfigError("; ".join(
            f"{', '.join(folders)}: finished with another command ({changed})" for changed, folders in bad.items())
            + ". Use another --workdir, or remove these run folders to train them again")


def execute(runs: Sequence[Run], *, dry_run: bool = False, log=print, doing: str = "training") -> None:
    """Trains every run not finished before, one at a time, each in a fresh process. A run finished before is
    skipped; one finished with a different command is refused before anything trains (:func:`check_finished`).
    ``doing`` names the work in the progress lines (another command than a training: ``launch.ablate``'s features)."""
    check_finished(runs)
    stop = _Stop()
    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)} if not dry_run else {}
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    try:
        for i, run in enumerate(runs):
            result = os.path.join(run.workdir, RESULT)
            if os.path.exists(result):
                with open(result) as f:
                    saved = json.load(f)
                run.status, run.step, run.metrics = "skipped", saved["step"], saved["metrics"]
                log(f"[{i + 1}/{len(runs)}] {run.workdir}: finished before, skipped")
                continue
            if dry_run:
                log(f"[{i + 1}/{len(runs)}] {shlex.join(run.argv)}")
                continue
            if stop.requested:
                run.status = "stopped"
                continue
            log(f"[{i + 1}/{len(runs)}] {doing} {run.workdir}")
            os.makedirs(run.workdir, exist_ok=True)
            with open(os.path.join(run.workdir, "train.log"), "a") as out:
                stop.child = subprocess.Popen(run.argv, stdout=out, stderr=subprocess.STDOUT, env=env)
                rc = stop.child.wait()
                stop.child = None
            run.step, run.metrics = final_metrics(run.workdir)
            if rc != 0:
                run.status = f"failed (rc={rc})"
                log(f"    failed with exit code {rc}; its log: {os.path.join(run.workdir, 'train.log')}")
            elif (run.step or 0) < run.num_steps:
                run.status = "stopped" if stop.requested else "incomplete"
                log(f"    stopped at step {run.step} of {run.num_steps}; rerun the sweep to resume it")
            else:
                run.status = "done"
                paths.write_text(result, json.dumps({"step": run.step, "metrics": run.metrics,
                                                     "command": _command(run.argv)}, indent=1))
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def write_csv(runs: Sequence[Run], path: str, param: str, metric: str) -> None:
    f = io.StringIO(newline="")
    w = csv.writer(f)
    w.writerow([param, "seed", "status", "step", metric, "workdir"])
    for r in runs:
        w.writerow([r.value, r.seed, r.status, "" if r.step is None else r.step, r.metrics.get(metric, ""),
                    r.workdir])
    paths.write_text(path, f.getvalue())


def _points(runs: Sequence[Run], metric: str) -> tuple[list[str], dict[str, list[float]], bool]:
    """(values in order, value -> finite metric of each finished seed, whether the values are numbers)."""
    values = list(dict.fromkeys(r.value for r in runs))
    ys = {v: [] for v in values}
    for r in runs:
        y = r.metrics.get(metric)
        if r.status in ("done", "skipped") and isinstance(y, (int, float)) and math.isfinite(y):
            ys[r.value].append(float(y))
    try:
        [float(v) for v in values]
        numeric = True
    except ValueError:
        numeric = False
    return values, ys, numeric


def plot(runs: Sequence[Run], path: str, param: str, metric: str) -> None:
    """``metric`` vs ``param``: each seed as a dot, the mean as a line, min..max as a bar."""
    values, ys, numeric = _points(runs, metric)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return _plot_pil(values, ys, numeric, path, param, metric)
    xs = [float(v) if numeric else i for i, v in enumerate(values)]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    have = [(x, ys[v]) for x, v in zip(xs, values) if ys[v]]
    for x, pts in have:
        ax.scatter([x] * len(pts), pts, s=14, color="tab:blue", alpha=0.6)
        ax.vlines(x, min(pts), max(pts), color="tab:blue", alpha=0.6)
    if have:
        ax.plot([x for x, _ in have], [sum(p) / len(p) for _, p in have], "o-", color="tab:red", label="mean")
        ax.legend()
    if not numeric:
        ax.set_xticks(xs, values)
    ax.set_xlabel(param)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs {param}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_pil(values, ys, numeric, path, param, metric) -> None:
    from PIL import Image, ImageDraw, ImageFont
    w, h, left, right, top, bottom = 640, 420, 80, 20, 40, 60
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    xv = [float(v) for v in values] if numeric else list(range(len(values)))
    all_y = [y for pts in ys.values() for y in pts]
    x0, x1 = min(xv), max(xv)
    y0, y1 = (min(all_y), max(all_y)) if all_y else (0.0, 1.0)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        y0, y1 = y0 - (abs(y0) or 1) * 0.1, y1 + (abs(y1) or 1) * 0.1
    pad_x, pad_y = 0.05 * (x1 - x0), 0.08 * (y1 - y0)
    x0, x1, y0, y1 = x0 - pad_x, x1 + pad_x, y0 - pad_y, y1 + pad_y

    def px(x, y):
        return (left + (x - x0) / (x1 - x0) * (w - left - right), top + (y1 - y) / (y1 - y0) * (h - top - bottom))

    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for i in range(5):  # y ticks
        y = y0 + (y1 - y0) * i / 4
        _, py = px(x0, y)
        d.line([left - 4, py, left, py], fill="black")
        d.text((4, py - 6), f"{y:.4g}", fill="black", font=font)
    for x, v in zip(xv, values):  # x ticks at the swept values
        qx, _ = px(x, y0)
        d.line([qx, h - bottom, qx, h - bottom + 4], fill="black")
        d.text((qx - 3 * len(v), h - bottom + 8), v, fill="black", font=font)
    means = []
    for x, v in zip(xv, values):
        if not ys[v]:
            continue
        lo, hi = px(x, min(ys[v])), px(x, max(ys[v]))
        d.line([lo, hi], fill=(70, 110, 200), width=2)
        for y in ys[v]:
            cx, cy = px(x, y)
            d.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], outline=(70, 110, 200))
        means.append(px(x, sum(ys[v]) / len(ys[v])))
    if len(means) > 1:
        d.line(means, fill=(200, 50, 50), width=2)
    for cx, cy in means:
        d.ellipse([cx - 4, cy - 4, cx + 4, cy + 4], fill=(200, 50, 50))
    d.text((left, 12), f"{metric} vs {param} (dots: seeds, red: mean, bar: min..max)", fill="black", font=font)
    d.text(((w - 6 * len(param)) // 2, h - 24), param, fill="black", font=font)
    img.save(path, format="PNG")
