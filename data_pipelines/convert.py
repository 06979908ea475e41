"""RLDS TFRecord -> ArrayRecord, once per dataset (``python -m launch.convert_rlds``)."""

from __future__ import annotations

import json
import logging
import os

import numpy as np

from data_pipelines import arrayrecord, oxe_table, rlds

# TFDS split names -> our two splits.
_SPLITS = {"train": "train", "val": "eval", "validation": "eval", "test": "eval"}


def convert(dataset: str, src: str, out: str | None = None, *, max_failure_fraction: float = 0.1,
            max_episodes: int | None = None) -> dict:
    """Convert the TFDS RLDS dataset at ``src`` into ``<out>/arrayrecord`` (``out`` defaults to ``src``).

    Unusable episodes (missing key, empty instruction, bad action, truncated record) are skipped and counted;
    above ``max_failure_fraction`` the conversion stops with an error naming them. Returns a summary dict.
    """
    name = oxe_table.resolve(dataset)
    if name not in oxe_table.ROBOT_DATASETS:
        raise ValueError(f"--dataset={dataset!r} is not an RLDS dataset of the table; known: "
                         f"{sorted(oxe_table.ROBOT_DATASETS)}")
    row = oxe_table.ROBOT_DATASETS[name]
    out = out or src
    summary = {"dataset": name, "splits": {}, "failures": []}
    have = rlds.splits(src)
    for tfds_split in have:
        split = _SPLITS.get(tfds_split)
        if split is None or (split == "eval" and any(_SPLITS.get(s) == "eval" for s in have[:have.index(tfds_split)])):
            continue
        writer = arrayrecord.SplitWriter(out, split, name, row.control_hz)
        seen = 0
        failures = []
        for ep_id, ep in rlds.read_rlds(src, name, tfds_split):
            if max_episodes is not None and seen >= max_episodes:
                break
            seen += 1
            if isinstance(ep, Exception):
                failures.append(f"{ep_id}: {type(ep).__name__}: {ep}")
                logging.warning("skipping %s: %s", ep_id, ep)
                continue
            try:
                writer.add(ep, source=ep_id)
            except ValueError as e:  # views of different lengths, wrong action shape: a truncated episode
                failures.append(f"{ep_id}: {e}")
                logging.warning("skipping %s: %s", ep_id, e)
        index = writer.close()
        if seen and len(failures) / seen > max_failure_fraction:
            raise RuntimeError(f"{name}/{tfds_split}: {len(failures)} of {seen} episodes unusable "
                               f"(> max_failure_fraction={max_failure_fraction}):\n" + "\n".join(failures[:50]))
        summary["splits"][split] = {"episodes": len(index["episodes"]), "steps": index["num_steps"],
                                    "skipped": len(failures)}
        summary["failures"] += failures
        if split == "train":
            acts = np.load(os.path.join(arrayrecord.layout_dir(out), "train_actions.npy"))
            stats = arrayrecord.action_stats(acts) if len(acts) else {}
            with open(os.path.join(arrayrecord.layout_dir(out), "action_stats.json"), "w") as f:
                json.dump(stats, f, indent=1)
    return summary
