"""Failure attribution: did a failed episode fail in forward dynamics (the GFDM predicted a wrong future) or in
inverse dynamics (the prediction was fine, the actions taken from it were not)?

DeFI's paper inspected 200 failed CALVIN episodes by hand and found 62% forward-dynamics failures
(hallucinated futures in contact-rich or cluttered scenes) and 38% inverse-dynamics ones: the reference point for
the split this module measures in closed loop (``defi_jax/evaluation/metaworld.py``, ``attribution.csv``).

Score. At every replanning step r the policy's GFDM predicts T frames of the video view in one denoising step
(frame 0 its rendering of the observed frame, frame k the state ``k * stride`` env steps later; see
``DeFIPolicy.act_and_predict_batch``). The predicted frames k >= 1 whose env step the episode reached are
compared with the frames that really followed, rendered by the same camera and resized to the prediction's
resolution (the policy's): the step's score is the PSNR in dB (peak 255) of all those frames together (one mean
squared error over their pixels). An episode's score is the mean of its steps' scores; a step with no reached
future frame (the episode ended right after it) has none.

Rule. Per task, the threshold is the ``percentile``-th percentile (10 by default) of the scores of the task's
SUCCESSFUL episodes. A failed episode scoring below it predicted a future worse than 90% of the episodes that
worked: a forward-dynamics failure. Otherwise its predictions were as good as those of successes and the actions
failed: an inverse-dynamics failure. A task with fewer than ``min_successes`` (3) scored successes is calibrated
on all tasks' successes pooled; with fewer than that in the whole evaluation its failures stay unattributed
(counted, never guessed). Fractions are of the attributed failures.

Pure numpy and Python: the evaluation's worker processes score, the parent attributes.

    steps = step_scores(real_frames, [(t_r, predicted_THW3), ...], stride=1)    # per replanning step
    result = attribute([{"task": ..., "success": ..., "prediction_score": episode_score(steps)}, ...])
    print(format_table(result))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

PAPER_SPLIT = {"forward_dynamics": 0.62, "inverse_dynamics": 0.38}   # DeFI paper, 200 failed CALVIN episodes
FORWARD, INVERSE, UNATTRIBUTED = "forward_dynamics", "inverse_dynamics", "unattributed"
COLUMNS = ("task", "episodes", "failures", "scored_failures", "forward_dynamics", "forward_fraction",
           "inverse_dynamics", "inverse_fraction", "unattributed", "threshold_psnr", "calibration")


def psnr(pred: np.ndarray, target: np.ndarray) -> float:
    """PSNR in dB (peak 255) of uint8 images of one shape, all pixels together; 100 dB for identical ones."""
    pred, target = np.asarray(pred), np.asarray(target)
    if pred.shape != target.shape:
        raise ValueError(f"psnr: predicted {list(pred.shape)} vs real {list(target.shape)}")
    mse = float(np.mean((pred.astype(np.float64) - target.astype(np.float64)) ** 2))
    return 100.0 if mse == 0.0 else float(10.0 * np.log10(255.0 ** 2 / mse))


def step_scores(real_frames: Sequence[np.ndarray], predictions: Sequence[tuple[int, np.ndarray]],
                stride: int = 1) -> list[dict]:
    """One ``{"step", "frames", "psnr"}`` per replanning step with a reached future frame.

    ``real_frames[t]``: the frame after ``t`` env steps (uint8 [r, r, 3], the prediction's size); ``predictions``:
    ``(t_r, predicted [T, r, r, 3])``, frame k of which shows step ``t_r + k * stride``."""
    out = []
    for t_r, pred_THW3 in predictions:
        ks = [k for k in range(1, len(pred_THW3)) if t_r + k * stride < len(real_frames)]
        if ks:
            real = np.stack([real_frames[t_r + k * stride] for k in ks])
            out.append({"step": int(t_r), "frames": len(ks), "psnr": psnr(pred_THW3[ks], real)})
    return out


def episode_score(steps: Sequence[Mapping]) -> float | None:
    """The mean PSNR of an episode's scored replanning steps (None without any)."""
    return float(np.mean([s["psnr"] for s in steps])) if steps else None


def attribute(episodes: Sequence[Mapping], *, percentile: float = 10.0, min_successes: int = 3) -> dict:
    """``episodes``: ``{"task", "success", "prediction_score"}`` (score None: not scored). Returns ``labels``
    (one per episode: None for a success, else forward / inverse dynamics or unattributed), ``tasks`` (a row
    per task, in first-seen order) and ``all`` (the totals), with the rule's parameters."""
    if not 0.0 <= percentile <= 100.0:
        raise ValueError(f"percentile: must be in [0, 100], got {percentile}")
    tasks = list(dict.fromkeys(e["task"] for e in episodes))
    ok = {t: [e["prediction_score"] for e in episodes if e["task"] == t and e["success"]
              and e["prediction_score"] is not None] for t in tasks}
    pooled = [s for t in tasks for s in ok[t]]
    thresholds = {}
    for t in tasks:
        if len(ok[t]) >= min_successes:
            thresholds[t] = (float(np.percentile(ok[t], percentile)), f"task ({len(ok[t])} successes)")
        elif len(pooled) >= min_successes:
            thresholds[t] = (float(np.percentile(pooled, percentile)), f"pooled ({len(pooled)} successes)")
        else:
            thresholds[t] = (None, f"none ({len(pooled)} scored successes, fewer than {min_successes})")
    labels = []
    for e in episodes:
        threshold = thresholds[e["task"]][0]
        if e["success"]:
            labels.append(None)
        elif e["prediction_score"] is None or threshold is None:
            labels.append(UNATTRIBUTED)
        else:
            labels.append(FORWARD if e["prediction_score"] < threshold else INVERSE)

    def row(name, rows, threshold, calibration):
        fails = [lab for e, lab in rows if not e["success"]]
        fwd, inv = fails.count(FORWARD), fails.count(INVERSE)
        return {"task": name, "episodes": len(rows), "failures": len(fails),
                "scored_failures": sum(e["prediction_score"] is not None for e, _ in rows if not e["success"]),
                FORWARD: fwd, "forward_fraction": fwd / (fwd + inv) if fwd + inv else None,
                INVERSE: inv, "inverse_fraction": inv / (fwd + inv) if fwd + inv else None,
                UNATTRIBUTED: fails.count(UNATTRIBUTED), "threshold_psnr": threshold, "calibration": calibration}

    pairs = list(zip(episodes, labels))
    return {"score": "PSNR (dB) of the GFDM's predicted future frames vs the real ones, mean over replanning steps",
            "rule": f"failed episode below the {percentile:g}th percentile of its task's successful episodes' "
                    f"scores -> forward dynamics, else inverse dynamics (pooled over tasks below {min_successes} "
                    f"scored successes; unattributed below {min_successes} in all)",
            "percentile": percentile, "min_successes": min_successes, "paper_calvin": dict(PAPER_SPLIT),
            "labels": labels,
            "tasks": {t: row(t, [p for p in pairs if p[0]["task"] == t], *thresholds[t]) for t in tasks},
            "all": row("all", pairs, None, "per task")}


def table_rows(result: Mapping) -> list[dict]:
    """The per-task rows, then ``all``: :data:`COLUMNS` (for a CSV)."""
    return [dict(r) for r in (*result["tasks"].values(), result["all"])]


def format_table(result: Mapping) -> str:
    """A fixed-width text table of :func:`attribute`'s result, the paper's CALVIN split as the last line."""
    def fmt(v):
        return "-" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)

    head = ("task", "failed", "forward", "fraction", "inverse", "fraction", "unattributed", "threshold dB")
    lines = [head] + [(r["task"], fmt(r["failures"]), fmt(r[FORWARD]), fmt(r["forward_fraction"]), fmt(r[INVERSE]),
                       fmt(r["inverse_fraction"]), fmt(r[UNATTRIBUTED]), fmt(r["threshold_psnr"]))
                      for r in table_rows(result)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    text = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
            for line in lines]
    p = result["paper_calvin"]
    text.append(f"(DeFI paper, 200 CALVIN failures: forward {p[FORWARD]:.2f} / inverse {p[INVERSE]:.2f})")
    return "\n".join(text)
