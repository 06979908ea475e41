"""defi_jax.evaluation.attribution on synthetic frames and scores: PSNR, the per-step scoring window, the
percentile rule with its per-task / pooled / missing calibration, and the table."""

import numpy as np
import pytest

from defi_jax.evaluation import attribution as at


def test_psnr_matches_its_definition():
    rs = np.random.default_rng(0)
    a = rs.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rs.choice([-4, 4], a.shape), 0, 255).astype(np.uint8)
    mse = np.mean((a.astype(float) - b) ** 2)
    assert at.psnr(a, b) == pytest.approx(10 * np.log10(255**2 / mse))
    assert at.psnr(a, a) == 100.0
    assert at.psnr(np.zeros((4, 4, 3), np.uint8), np.full((4, 4, 3), 255, np.uint8)) == pytest.approx(0.0)
    with pytest.raises(ValueError, match=r"predicted \[2, 8, 8, 3\] vs real \[3, 8, 8, 3\]"):
        at.psnr(a[:2], a)


def test_step_scores_compare_frame_k_with_the_state_k_strides_later():
    rs = np.random.default_rng(1)
    real = [rs.integers(0, 256, (4, 4, 3), dtype=np.uint8) for _ in range(9)]   # states after 0..8 steps
    # replanning at step 2: a perfect prediction with stride 2 (frames 2, 4, 6, 8); frame 0 is never scored
    perfect = np.stack([np.zeros((4, 4, 3), np.uint8), real[4], real[6], real[8]])
    # replanning at step 6: frame 1 (step 8) is real[8] plus 10 gray levels, frames 2, 3 (steps 10, 12) unreached
    late = np.stack([real[6], np.clip(real[8].astype(int) + 10, 0, 255).astype(np.uint8), real[0], real[0]])
    # replanning at step 8: nothing reached
    steps = at.step_scores(real, [(2, perfect), (6, late), (8, late)], stride=2)
    assert [(s["step"], s["frames"]) for s in steps] == [(2, 3), (6, 1)]
    assert steps[0]["psnr"] == 100.0
    assert steps[1]["psnr"] == pytest.approx(at.psnr(late[1], real[8]))
    assert at.episode_score(steps) == pytest.approx((100.0 + steps[1]["psnr"]) / 2)
    assert at.episode_score([]) is None
    # stride 1 with the same prediction: frames 1..3 are steps 3..5, which it does not match
    assert at.step_scores(real, [(2, perfect)], stride=1)[0]["psnr"] < 20


def _episodes(task, successes, failures):
    return ([{"task": task, "success": True, "prediction_score": s} for s in successes]
            + [{"task": task, "success": False, "prediction_score": s} for s in failures])


def test_percentile_rule_per_task_pooled_and_unattributed():
    ok = list(np.linspace(20.0, 29.0, 10))          # 10th percentile: 20.9
    eps = (_episodes("a", ok, [10.0, 20.5, 21.0, 35.0, None])
           + _episodes("b", [15.0], [14.0, 25.0])   # one success: the pooled threshold (11 successes)
           + _episodes("c", [None], [30.0]))         # no scored success of its own: pooled too
    result = at.attribute(eps, percentile=10, min_successes=3)
    pooled = np.percentile(ok + [15.0], 10)
    a, b, c = (result["tasks"][t] for t in "abc")
    assert a["threshold_psnr"] == pytest.approx(20.9) and a["calibration"] == "task (10 successes)"
    assert (a["failures"], a["scored_failures"], a["forward_dynamics"], a["inverse_dynamics"], a["unattributed"]) == (
        5, 4, 2, 2, 1)
    assert a["forward_fraction"] == a["inverse_fraction"] == 0.5
    assert b["threshold_psnr"] == pytest.approx(pooled) and b["calibration"] == "pooled (11 successes)"
    assert pooled == pytest.approx(20.0) and (b["forward_dynamics"], b["inverse_dynamics"]) == (1, 1)
    assert c["calibration"].startswith("pooled") and c["inverse_dynamics"] == 1
    assert result["labels"][:len(ok)] == [None] * len(ok)
    assert result["labels"][len(ok):len(ok) + 5] == ["forward_dynamics", "forward_dynamics", "inverse_dynamics",
                                                     "inverse_dynamics", "unattributed"]
    total = result["all"]
    assert (total["episodes"], total["failures"], total["forward_dynamics"], total["inverse_dynamics"]) == (
        len(eps), 8, 3, 4)
    assert total["forward_fraction"] == pytest.approx(3 / 7) and total["unattributed"] == 1
    # a higher percentile moves failures from inverse to forward dynamics
    assert at.attribute(eps, percentile=50)["tasks"]["a"]["forward_dynamics"] == 3

    none = at.attribute(_episodes("d", [], [12.0, 13.0]) + _episodes("e", [20.0, 21.0], [10.0]))
    for t, n in (("d", 2), ("e", 1)):     # 2 scored successes in all: too few to calibrate on
        assert none["tasks"][t]["unattributed"] == n and none["tasks"][t]["forward_fraction"] is None
        assert none["tasks"][t]["calibration"] == "none (2 scored successes, fewer than 3)"
    with pytest.raises(ValueError, match="percentile"):
        at.attribute(eps, percentile=110)


def test_table_rows_and_text():
    result = at.attribute(_episodes("reach-v3", [30.0, 31.0, 32.0], [10.0, 40.0]))
    rows = at.table_rows(result)
    assert [r["task"] for r in rows] == ["reach-v3", "all"] and set(rows[0]) == set(at.COLUMNS)
    text = at.format_table(result)
    assert text.splitlines()[1].split()[:7] == ["reach-v3", "2", "1", "0.50", "1", "0.50", "0"]
    assert "forward 0.62 / inverse 0.38" in text.splitlines()[-1]
