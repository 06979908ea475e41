"""RLDS TFRecord -> ArrayRecord, once per dataset (``python -m launch.convert_rlds``)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile

import numpy as np

from data_pipelines import arrayrecord, oxe_table, rlds
from data_pipelines.failures import FailureLog

# TFDS split names -> our two splits.
_SPLITS = {"train": "train", "val": "eval", "validation": "eval", "test": "eval"}


class TooManyFailures(RuntimeError):
    """More episodes of a split were unusable than ``max_failure_fraction`` allows; nothing was replaced."""


def convert(dataset: str, src: str, out: str | None = None, *, max_failure_fraction: float = 0.1,
            max_episodes: int | None = None) -> dict:
    """Convert the TFDS RLDS dataset at ``src`` into ``<out>/arrayrecord`` (``out`` defaults to ``src``).

    Unusable episodes (missing key, empty instruction, bad action, truncated record) are skipped and counted;
    above ``max_failure_fraction`` of a split the conversion stops with ``TooManyFailures`` naming them. Everything
    is written to a temporary folder beside ``<out>/arrayrecord`` and renamed into place only when every split and
    the action statistics are complete: a failed or interrupted conversion leaves a previous one untouched.
    Returns a summary dict ("failures": one line per cause, with counts and examples).
    """
    name = oxe_table.resolve(dataset)
    if name not in oxe_table.ROBOT_DATASETS:
        raise ValueError(f"--dataset={dataset!r} is not an RLDS dataset of the table; known: "
                         f"{sorted(oxe_table.ROBOT_DATASETS)}")
    row = oxe_table.ROBOT_DATASETS[name]
    out = out or src
    final = arrayrecord.layout_dir(out)
    os.makedirs(out, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{arrayrecord.SUBDIR}.partial-", dir=out)
    try:
        summary = _convert_into(tmp, name, row, src, max_failure_fraction, max_episodes)
        old = None
        if os.path.exists(final):
            old = tempfile.mkdtemp(prefix=f".{arrayrecord.SUBDIR}.old-", dir=out)
            os.rename(final, os.path.join(old, arrayrecord.SUBDIR))
        os.rename(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary


def _source_name(ep_id: str, src: str) -> str:
    """Episode ids name TFRecord files; keep them relative to ``src`` so that they stay true after ``src`` moves
    (the demo data is generated in a temporary folder and renamed)."""
    root = src.rstrip("/") + "/"
    return ep_id[len(root):] if ep_id.startswith(root) else ep_id


def _convert_into(folder: str, name: str, row, src: str, max_failure_fraction: float,
                  max_episodes: int | None) -> dict:
    summary = {"dataset": name, "splits": {}, "failures": []}
    have = rlds.splits(src)
    for tfds_split in have:
        split = _SPLITS.get(tfds_split)
        if split is None or (split == "eval" and any(_SPLITS.get(s) == "eval" for s in have[:have.index(tfds_split)])):
            continue
        writer = arrayrecord.SplitWriter(folder, split, name, row.control_hz)
        seen = 0
        failures = FailureLog()
        for ep_id, ep in rlds.read_rlds(src, name, tfds_split):
            if max_episodes is not None and seen >= max_episodes:
                break
            seen += 1
            ep_id = _source_name(ep_id, src)
            if not isinstance(ep, Exception):
                try:
                    writer.add(ep, source=ep_id)
                    continue
                except ValueError as e:  # views of different lengths, wrong action shape: a truncated episode
                    ep = e
            failures.add(ep_id, f"{type(ep).__name__}: {ep}")
            logging.warning("skipping %s: %s", ep_id, ep)
        if seen and len(failures) / seen > max_failure_fraction:
            raise TooManyFailures(
                f"{name}/{tfds_split}: {len(failures)} of {seen} episodes unusable (> --max_failure_fraction="
                f"{max_failure_fraction}); nothing was written to {arrayrecord.layout_dir(os.path.dirname(folder))}:\n"
                + str(failures))
        index = writer.close()
        summary["splits"][split] = {"episodes": len(index["episodes"]), "steps": index["num_steps"],
                                    "skipped": len(failures)}
        summary["failures"] += failures.lines()
    if "train" in summary["splits"] and summary["splits"]["train"]["steps"]:
        # Statistics from the actions just written, in the same folder: they always describe the data beside them.
        stats = arrayrecord.action_stats(np.load(os.path.join(folder, "train_actions.npy")))
        with open(os.path.join(folder, "action_stats.json"), "w") as f:
            json.dump(stats, f, indent=1)
    return summary

