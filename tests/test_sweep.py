"""launch.sweep: a two-value sweep of the toy stage writes its CSV and PNG, and a rerun resumes."""

import csv
import json
import math
import os
import subprocess
import sys

import pytest
from PIL import Image

from defi_jax import config_validation, sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETS = ["train.num_steps=2", "train.schedule=constant", "train.log_every=1", "train.save_every=1",
        "train.progress_bar=false"]


def test_split_values():
    assert sweep.split_values("0,0.25, 0.5") == ["0", "0.25", "0.5"]
    assert sweep.split_values("(1,8,1),(2,4,1)") == ["(1,8,1)", "(2,4,1)"]
    with pytest.raises(ValueError, match="empty value"):
        sweep.split_values("1,,2")


def test_plan_checks_every_config_before_training(tmp_path):
    sets = [tuple(s.split("=", 1)) for s in SETS]
    stage, runs = sweep.plan("configs/toy.py:tiny", "train.lr", ["1e-3", "3e-3"], [1, 2], sets, str(tmp_path))
    assert stage == "toy" and [(r.value, r.seed) for r in runs] == [("1e-3", 1), ("1e-3", 2), ("3e-3", 1),
                                                                    ("3e-3", 2)]
    assert runs[1].workdir == str(tmp_path / "train.lr=1e-3" / "seed=2") and runs[1].num_steps == 2
    assert runs[1].argv[1:3] == ["-m", "launch.train"] and "--config.seed=2" in runs[1].argv
    with pytest.raises(config_validation.ConfigError, match="did you mean config.train.lr"):
        sweep.plan("configs/toy.py:tiny", "train.lrr", ["1"], None, [], str(tmp_path))
    with pytest.raises(config_validation.ConfigError, match="config.train.lr='fast'"):
        sweep.plan("configs/toy.py:tiny", "train.lr", ["1e-3", "fast"], None, [], str(tmp_path))
    with pytest.raises(config_validation.ConfigError, match="set by the sweep"):
        sweep.plan("configs/toy.py:tiny", "train.lr", ["1e-3"], None, [("train.lr", "1")], str(tmp_path))


def test_default_metric_per_stage():
    gidm = [sweep.Run("0", 0, "", [], 1, metrics={"loss": 1.0, "eval_action_info_gap": 0.1})]
    assert sweep.choose_metric("gidm", gidm, None) == "eval_action_info_gap"
    gidm[0].metrics["probe_r2"] = 0.3
    assert sweep.choose_metric("gidm", gidm, None) == "probe_r2"
    assert sweep.choose_metric("gfdm", [sweep.Run("0", 0, "", [], 1, metrics={"eval_loss": 2.0})], None) == "eval_loss"
    assert sweep.choose_metric("toy", gidm, None) == "loss"
    assert sweep.choose_metric("toy", gidm, "eval_mse") == "eval_mse"


def test_two_value_sweep_writes_csv_and_png_and_resumes(tmp_path):
    workdir = tmp_path / "sweep"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device per run: fast
    proc = subprocess.run([sys.executable, "-m", "launch.sweep", "--config=configs/toy.py:tiny", "--param=train.lr",
                           "--values=1e-3,1e-2", f"--workdir={workdir}", "--metric=eval_mse", *(f"--set={s}" for s in SETS)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]

    with open(workdir / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["train.lr"], r["seed"], r["status"], r["step"]) for r in rows] == [
        ("1e-3", "0", "done", "2"), ("1e-2", "0", "done", "2")]
    mse = [float(r["eval_mse"]) for r in rows]
    assert all(math.isfinite(x) and x > 0 for x in mse) and mse[0] != mse[1]
    for r in rows:  # the CSV's number is the run's last logged eval_mse
        with open(os.path.join(r["workdir"], "metrics.jsonl")) as f:
            last = [row for row in map(json.loads, f) if "eval_mse" in row][-1]
        assert last["step"] == 2 and float(r["eval_mse"]) == pytest.approx(last["eval_mse"])

    with Image.open(workdir / "sweep.png") as img:
        img.load()
        assert img.format == "PNG" and img.width >= 400 and img.height >= 300
        assert len(img.convert("RGB").getcolors(1 << 16)) > 2  # something was drawn

    # Rerun: the finished run is skipped; the other, marked unfinished, is trained again in its own workdir
    # (where the trainer resumes from its checkpoints).
    os.remove(os.path.join(rows[1]["workdir"], sweep.RESULT))
    sets = [tuple(s.split("=", 1)) for s in SETS]
    _, runs = sweep.plan("configs/toy.py:tiny", "train.lr", ["1e-3", "1e-2"], None, sets, str(workdir))
    log = []
    sweep.execute(runs, dry_run=True, log=log.append)
    assert [r.status for r in runs] == ["skipped", "pending"]
    assert runs[0].metrics["eval_mse"] == pytest.approx(mse[0])
    assert "finished before, skipped" in log[0] and f"--workdir={rows[1]['workdir']}" in log[1]

    # The finished run recorded its command; planning the same workdir with other flags is refused, naming the
    # run and the flag, instead of tabulating the old result under the new command line.
    with open(os.path.join(rows[0]["workdir"], sweep.RESULT)) as f:
        recorded = json.load(f)["command"]
    assert recorded["config"] == "configs/toy.py:tiny" and "--config.train.lr=1e-3" in recorded["overrides"]
    other = [*sets[:-1], ("train.progress_bar", "true")]
    with pytest.raises(config_validation.ConfigError) as err:
        sweep.plan("configs/toy.py:tiny", "train.lr", ["1e-3", "1e-2"], None, other, str(workdir))
    assert rows[0]["workdir"] in str(err.value) and "train.progress_bar false -> true" in str(err.value)
    assert "another --workdir" in str(err.value)
