"""launch.ablate: every variant's config differs from defi exactly as intended and trains one step; the tables
(per-task success, episode counts, Wilson intervals, the paper column); finished runs and evaluations are skipped."""

import csv
import dataclasses
import io
import json
import math
import os
import re

import numpy as np
import pytest

from defi_jax import ablate, sweep
from defi_jax.evaluation import metaworld


def _flat(config, prefix: str = "") -> dict:
    """Dotted key -> leaf value."""
    out = {}
    for k, v in config.items():
        out |= _flat(v, f"{prefix}{k}.") if hasattr(v, "items") else {f"{prefix}{k}": v}
    return out


@pytest.fixture(scope="module")
def plan(tmp_path_factory, demo_data_dir):
    return ablate.plan(str(tmp_path_factory.mktemp("ablate")), list(ablate.VARIANTS), [0, 1],
                       data_dir=demo_data_dir, steps=3, pretrain_steps=2)


def test_variants_differ_from_defi_exactly_as_intended(plan):
    pre = {k: {s: r.workdir for s, r in stages.items()} for k, stages in plan.pretrain.items()}
    assert set(pre) == {"standard", "no_human_video"}   # each pretraining once, shared by variants and seeds
    base = _flat(plan.configs[plan.runs["defi", 0].workdir])
    assert base["init.sources.gidm.path"] == pre["standard"]["gidm"]
    assert base["init.sources.gfdm.path"] == pre["standard"]["gfdm"]
    assert base["policy.pretrain_missing"] is False and base["train.num_steps"] == 3
    expected = {
        "no_gidm_pretrain": {"policy.gidm_init": "random", "init.sources.gidm.path": ""},
        # The pretrained GFDM's frozen VAE / text tower with an initial UNet.
        "no_gfdm_pretrain": {"policy.gfdm_init": "initial", "init.sources.gfdm.path": "",
                             **{f"init.sources.{name}.{k}": v for name, prefix in (("svd_vae", "vae/"),
                                                                                   ("svd_clip", "text_encoder/"))
                                for k, v in (("kind", "workdir"), ("path", pre["standard"]["gfdm"]),
                                             ("prefix", prefix))}},
        "no_human_video": {"init.sources.gidm.path": pre["no_human_video"]["gidm"],
                           "init.sources.gfdm.path": pre["no_human_video"]["gfdm"]},
        "adapter_only": {"policy.finetune": "adapter_only"},
        "all_train": {"policy.finetune": "all"},
        "gfdm_5_steps": {"model.gfdm_steps": 5},
        "continuous_latent": {"model.latent_action": "continuous"},
    }
    stats = "init.sources.feature_stats.path"   # the demo recipe centres and scales: each variant its own GFDM's
    assert base["model.center_features"] and base[stats] == os.path.join(plan.workdir, "defi", "feature_stats")
    for name, want in expected.items():
        for seed in (0, 1):
            got = _flat(plan.configs[plan.runs[name, seed].workdir])
            diff = {k: got[k] for k in got if got[k] != base.get(k)}
            want = dict(want, **{stats: os.path.join(plan.workdir, name, "feature_stats")}, **({"seed": 1} if seed
                                                                                                 else {}))
            assert diff == want, name
    seed1 = _flat(plan.configs[plan.runs["defi", 1].workdir])
    assert {k for k in seed1 if seed1[k] != base[k]} == {"seed"}
    # The no-human-video pretraining differs from the standard one only in the mixture's human share.
    for stage in ("gidm", "gfdm"):
        std = _flat(plan.configs[pre["standard"][stage]])
        nohv = _flat(plan.configs[pre["no_human_video"][stage]])
        assert {k: nohv[k] for k in nohv if nohv[k] != std[k]} == {"data.human_video_fraction": 0.0}
        assert std["train.num_steps"] == 2
    argv = plan.runs["no_gidm_pretrain", 1].argv
    assert argv[1:3] == ["-m", "launch.train"] and "--config.policy.gidm_init=random" in argv
    with pytest.raises(ValueError, match="unknown"):
        ablate.parse_variants("defi,no_such")
    assert ablate.parse_variants("adapter_only,defi") == ("defi", "adapter_only")


def test_dry_run_one_step_of_every_variant(plan):
    """Every variant's train step (and both pretraining stages') traced and lowered on a batch of its own data; a
    compiled and executed step of each is the command's --dry_run, minutes on a CPU (7 distinct programs)."""
    logs = []
    steps = ablate.dry_run(plan, run_steps=False, log=logs.append)
    assert set(steps) == {*ablate.VARIANTS, "pretrain/standard/gidm", "pretrain/standard/gfdm",
                          "pretrain/no_human_video/gidm", "pretrain/no_human_video/gfdm"}
    assert all(m["loss"].shape == () and m["loss"].dtype == np.float32 for m in steps.values())
    # Variants that differ only in where their initial weights (or data) come from share one program.
    shared = {line.split(":")[0] for line in logs if "same program" in line}
    assert shared == {"no_gidm_pretrain", "no_gfdm_pretrain", "no_human_video", "pretrain/no_human_video/gidm",
                      "pretrain/no_human_video/gfdm"}


def _summary(tasks: dict) -> dict:
    return {"tasks": {t: {"successes": k, "episodes": n} for t, (k, n) in tasks.items()}}


def test_tables_from_synthetic_results():
    tasks = ["reach-v3", "push-v3"]
    results = {("defi", 0): _summary({"reach-v3": (8, 10), "push-v3": (6, 10)}),
               ("defi", 1): _summary({"reach-v3": (10, 10), "push-v3": (4, 10)}),
               ("no_gidm_pretrain", 0): _summary({"reach-v3": (2, 10), "push-v3": (0, 10)}),
               ("gfdm_5_steps", 0): _summary({"reach-v3": (9, 10), "push-v3": (7, 10)})}
    md, table_csv = ablate.render(results, tasks, protocol={"tasks": tasks, "episodes_per_task": 10})
    lo, hi = metaworld.wilson_interval(18, 20)
    assert f"0.90 (18/20) [{lo:.2f}, {hi:.2f}]" in md          # defi reach, pooled over its two seeds
    assert "0.70 ± 0.00 (0: 0.70, 1: 0.70)" in md               # mean over seeds, each seed listed
    assert "| w/o GFDM pretraining (`no_gfdm_pretrain`) | none | n/a | n/a | n/a | n/a | n/a |" in md
    assert "w/o GIDM pretraining" in md and "| 4.16 |" in md and "| 3.92 |" in md
    agree = md.split("## Agreement with the paper")[1]
    assert "table4, w/o GIDM pretraining: agrees: paper lower" in agree
    assert "miniature lower (0.10 vs 0.70)" in agree and "within noise" not in agree.split("\n")[2]
    assert "table8, 5 denoising steps: disagrees: paper lower" in agree and "within noise" in agree
    assert "w/o human video (GIDM + GFDM): not evaluated" in agree
    rows = list(csv.DictReader(io.StringIO(table_csv)))
    row = next(r for r in rows if r["table"] == "table4" and r["variant"] == "defi" and r["task"] == "push-v3")
    assert (row["successes"], row["episodes"], row["seeds"], row["paper"]) == ("10", "20", "0 1", "4.51")
    assert float(row["ci95_low"]) == pytest.approx(metaworld.wilson_interval(10, 20)[0], abs=1e-4)
    mean = next(r for r in rows if r["table"] == "table9" and r["variant"] == "defi" and r["task"] == "mean")
    assert float(mean["mean_over_seeds"]) == pytest.approx(0.7) and mean["per_seed"] == "0:0.7000 1:0.7000"
    assert len([r for r in rows if r["table"] == "table8" and r["variant"] == "defi"]) == 6   # in both groups


def test_paired_episodes_and_mcnemar():
    """Episodes played alike by two variants are compared pair by pair: the discordant ones carry the test."""
    tasks = ["reach-v3", "push-v3"]

    def summary(wins: dict) -> dict:
        eps = [{"task": t, "episode": e, "success": e in wins[t]} for t in tasks for e in range(10)]
        return {"tasks": {t: {"successes": len(wins[t]), "episodes": 10} for t in tasks}, "episodes": eps}

    ref = summary({"reach-v3": set(range(9)), "push-v3": set(range(8))})            # 17/20
    other = summary({"reach-v3": {0, 1, 9}, "push-v3": {0, 1, 2}})                   # 6/20: 12 lost, 1 won
    md, _ = ablate.render({("defi", 0): ref, ("no_gfdm_pretrain", 0): other}, tasks)
    p = metaworld.mcnemar_exact(12, 1)
    assert p == pytest.approx(2 * (1 + 13) / 2 ** 13)                               # binomial(13, 1/2) tail
    agree = md.split("## Agreement with the paper")[1]
    assert (f"w/o GFDM pretraining: no paper number; miniature 0.30 vs 0.85; paired over 20 episodes: only Full "
            f"DeFI succeeded in 12, only w/o GFDM pretraining in 1 (exact McNemar p = {p:.3g})") in agree
    assert metaworld.mcnemar_exact(0, 0) == 1.0 and metaworld.mcnemar_exact(3, 3) == 1.0
    assert metaworld.mcnemar_exact(5, 0) == pytest.approx(2 / 32)
    md, _ = ablate.render({("defi", 0): ref, ("no_gfdm_pretrain", 0): {"tasks": other["tasks"]}}, tasks)
    assert "paired over" not in md                                                  # summaries without episodes


def test_resume_skips_finished_training_and_evaluation(plan, tmp_path):
    p = ablate.plan(str(tmp_path), ["defi", "adapter_only"], [0], data_dir=str(tmp_path / "data"), steps=3)
    done, todo = p.runs["defi", 0], p.runs["adapter_only", 0]
    os.makedirs(done.workdir)
    with open(os.path.join(done.workdir, sweep.RESULT), "w") as f:
        json.dump({"step": 3, "metrics": {"loss": 0.5}}, f)
    logs = []
    sweep.execute(list(p.runs.values()), dry_run=True, log=logs.append)
    assert (done.status, done.step, todo.status) == ("skipped", 3, "pending")

    protocol = metaworld.Protocol(tasks=("reach-v3",), episodes=2, horizon=5, workers=1)
    saved = {"protocol": ablate.protocol_fields(protocol), "policy": {"step": 3},
             "tasks": {"reach-v3": {"successes": 1, "episodes": 2}}}
    out = os.path.join(done.workdir, ablate.EVAL_DIR)
    os.makedirs(out)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(saved, f)

    def no_policy(workdir, seed):
        raise AssertionError(f"evaluated again: {workdir}")

    results = ablate.evaluate(p, protocol, log=logs.append, policy_factory=no_policy)
    assert list(results) == [("defi", 0)] and results["defi", 0]["tasks"] == saved["tasks"]
    assert "evaluated before (step 3), skipped" in logs[-1]
    # Another protocol, or a checkpoint trained further, is evaluated again.
    for protocol_json, step in ((dict(saved["protocol"], episodes_per_task=5), 3), (saved["protocol"], 4)):
        assert ablate._finished_eval(out, protocol_json, step) is None
    assert ablate._finished_eval(out, saved["protocol"], 3) == saved
    with open(os.path.join(out, "summary.json"), "w") as f:
        f.write('{"protocol": ')          # cut by a kill
    assert ablate._finished_eval(out, saved["protocol"], 3) is None
    assert np.isnan(ablate.Cell(0, 0).rate) and str(ablate.Cell(0, 0)) == "n/a"


def test_rerun_with_other_flags_is_refused(tmp_path):
    """A finished fine-tuning records its command; the same workdir planned with another --data_fraction is
    refused (it would otherwise be tabulated under the new command line), the same flags are not."""
    kw = dict(data_dir=str(tmp_path / "data"), steps=3)
    done = ablate.plan(str(tmp_path), ["defi"], [0], **kw).runs["defi", 0]
    os.makedirs(done.workdir)
    with open(os.path.join(done.workdir, sweep.RESULT), "w") as f:
        json.dump({"step": 3, "metrics": {}, "command": sweep._command(done.argv)}, f)
    ablate.plan(str(tmp_path), ["defi"], [0], **kw)          # same command: reused
    changed = r"seed=0: finished with another command \(data\.data_fraction \(unset\) -> 0\.25\)"
    with pytest.raises(ValueError, match=changed):
        ablate.plan(str(tmp_path), ["defi"], [0], data_fraction=0.25, **kw)


def test_init_switches_empty_the_pretrained_source(demo_data_dir):
    """policy.gidm_init=random / gfdm_init=initial on a config that names pretrained workdirs (tiny names the
    demo's) leave those workdirs unread: resolving the config empties their paths (defi_jax.policy.stage.resolve_init;
    the GFDM workdir then gives only its frozen VAE / text tower), validation only reads (an unresolved config is
    refused, naming the key)."""
    from defi_jax import config_validation

    for key, value, emptied, kept in (("gidm_init", "random", "gidm", "gfdm"), ("gfdm_init", "initial", "gfdm", "gidm")):
        config = config_validation.load_config(ablate.POLICY_CONFIG)
        config.data.data_dir = demo_data_dir
        assert config.init.sources[emptied].path and config.init.sources[kept].path
        config.policy[key] = value
        with pytest.raises(config_validation.ConfigError, match=f"config.init.sources.{emptied}.path"):
            config_validation.validate(config, num_devices=1)
        assert config.init.sources[emptied].path, key              # validation wrote nothing
        pretrained = config.init.sources[emptied].path
        config_validation.resolve(config)
        config_validation.validate(config, num_devices=1)
        assert config.init.sources[emptied].path == "" and config.init.sources[kept].path, key
        towers = {n: (s.kind, s.path, s.prefix) for n, s in config.init.sources.items() if n.startswith("svd_")}
        if emptied == "gfdm":   # the un-pretrained GFDM keeps the workdir's frozen VAE / text tower, not its UNet
            assert towers == {"svd_unet": ("diffusers_unet", "", ""), "svd_vae": ("workdir", pretrained, "vae/"),
                              "svd_clip": ("workdir", pretrained, "text_encoder/")}
        else:
            assert not any(path for _, path, _ in towers.values())


def _finished_workdir(path, scale=None) -> str:
    os.makedirs(path)
    with open(os.path.join(path, "finished.json"), "w") as f:
        json.dump({"step": 7, "metrics": {}}, f)
    if scale is not None:
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump({"model": {"vae": {"scaling_factor": scale}}}, f)
    return str(path)


def test_pretrained_folder_replaces_the_standard_pretraining(tmp_path, demo_data_dir):
    gidm = _finished_workdir(tmp_path / "demo" / "gidm")
    gfdm = _finished_workdir(tmp_path / "demo" / "gfdm", scale=0.4)
    p = ablate.plan(str(tmp_path / "ablate"), ["defi", "no_gidm_pretrain", "no_human_video"], [0],
                    data_dir=demo_data_dir, steps=3, pretrained=str(tmp_path / "demo"))
    assert {s: r.status for s, r in p.pretrain["standard"].items()} == {"gidm": ablate.REUSED, "gfdm": ablate.REUSED}
    assert p.pretrain["no_human_video"]["gidm"].status == "pending"      # other pretrainings are still trained
    defi, no_gidm = (_flat(p.configs[p.runs[v, 0].workdir]) for v in ("defi", "no_gidm_pretrain"))
    assert (defi["init.sources.gidm.path"], defi["init.sources.gfdm.path"]) == (gidm, gfdm)
    assert defi["model.gfdm.vae.scaling_factor"] == no_gidm["model.gfdm.vae.scaling_factor"] == 0.4
    assert (no_gidm["init.sources.gidm.path"], no_gidm["init.sources.gfdm.path"]) == ("", gfdm)
    assert _flat(p.configs[p.runs["no_human_video", 0].workdir])["model.gfdm.vae.scaling_factor"] != 0.4
    logs = []
    p.pretrain.pop("no_human_video")
    ablate.train(dataclasses.replace(p, runs={}), log=logs.append)      # the reused runs are not trained again
    assert logs[0].startswith("== pretraining: 0 run(s)")
    os.remove(os.path.join(gidm, "finished.json"))
    with pytest.raises(ValueError, match="gidm holds no finished GIDM run"):
        ablate.plan(str(tmp_path / "ablate"), ["defi"], [0], data_dir=demo_data_dir, pretrained=str(tmp_path / "demo"))


def test_data_fraction_thins_only_the_fine_tuning(tmp_path, demo_data_dir):
    p = ablate.plan(str(tmp_path), ["defi", "no_gidm_pretrain"], [0], data_dir=demo_data_dir, steps=3,
                    data_fraction=0.25)
    for run in p.runs.values():
        assert _flat(p.configs[run.workdir])["data.data_fraction"] == 0.25
        assert "--config.data.data_fraction=0.25" in run.argv
    for run in p.pretrain["standard"].values():                      # the action-free pretraining keeps all
        assert _flat(p.configs[run.workdir])["data.data_fraction"] == 1.0
    with pytest.raises(ValueError, match=r"--data_fraction=1\.5 must be in \(0, 1\]"):
        ablate.plan(str(tmp_path), ["defi"], [0], data_dir=demo_data_dir, data_fraction=1.5)


def test_set_overrides_reach_every_fine_tuning_not_the_pretraining(tmp_path, demo_data_dir):
    """--set=KEY=VALUE: in every fine-tuning's config and command, after --steps (it wins), never in a pretraining."""
    sets = ablate.parse_overrides(["model.head.cross_attention=full", "train.num_steps=4"])
    assert sets == (("model.head.cross_attention", "full"), ("train.num_steps", "4"))
    p = ablate.plan(str(tmp_path), list(ablate.VARIANTS), [0], data_dir=demo_data_dir, steps=3, pretrain_steps=2,
                    overrides=sets)
    assert set(p.runs) == {(v, 0) for v in ablate.VARIANTS}
    for run in p.runs.values():
        got = _flat(p.configs[run.workdir])
        assert (got["model.head.cross_attention"], got["train.num_steps"], run.num_steps) == ("full", 4, 4)
        assert run.argv[-2:] == ["--config.model.head.cross_attention=full", "--config.train.num_steps=4"]
    assert _flat(p.configs[p.runs["adapter_only", 0].workdir])["policy.finetune"] == "adapter_only"   # kept
    for stages in p.pretrain.values():
        for run in stages.values():
            assert not any("cross_attention" in a or a == "--config.train.num_steps=4" for a in run.argv)
            assert _flat(p.configs[run.workdir])["train.num_steps"] == 2


def test_set_refuses_a_variants_own_key_a_malformed_item_and_an_unknown_key(tmp_path):
    from defi_jax import config_validation

    kw = dict(data_dir=str(tmp_path / "data"), steps=3)
    with pytest.raises(ValueError, match=r"config\.policy\.gidm_init is set by variant no_gidm_pretrain itself"):
        ablate.plan(str(tmp_path), ["defi", "no_gidm_pretrain"], [0], overrides=[("policy.gidm_init", "pretrained")],
                    **kw)
    with pytest.raises(ValueError, match=r"config\.policy\.finetune is set by variant adapter_only itself"):
        ablate.plan(str(tmp_path), list(ablate.VARIANTS), [0], overrides=[("policy.finetune", "all")], **kw)
    for bad in ("model.head.cross_attention", "=full", " =full", ""):
        with pytest.raises(ValueError, match=f"--set={bad!r}: expected KEY=VALUE"):
            ablate.parse_overrides(["train.num_steps=4", bad])
    assert ablate.parse_overrides(["data.data_dir=", "a=b=c"]) == (("data.data_dir", ""), ("a", "b=c"))
    with pytest.raises(ValueError, match=r"config\.train\.num_steps given more than once"):
        ablate.plan(str(tmp_path), ["defi"], [0], overrides=[("train.num_steps", "4"), ("train.num_steps", "5")], **kw)
    for planned in ("seed", "init.sources.gfdm.path"):   # the plan sets these per run: seeds would collapse
        with pytest.raises(ValueError, match=rf"config\.{re.escape(planned)} is set by the ablation plan"):
            ablate.plan(str(tmp_path), ["defi"], [0, 1], overrides=[(planned, "0")], **kw)
    # An unknown key or a bad value fails while planning (the dry run's and the training's config check), named.
    with pytest.raises(config_validation.ConfigError, match=r"--set: config\.model\.head\.no_such_key"):
        ablate.plan(str(tmp_path), ["defi"], [0], overrides=[("model.head.no_such_key", "1")], **kw)
    with pytest.raises(config_validation.ConfigError, match=r"--set: config\.train\.num_steps='many'"):
        ablate.plan(str(tmp_path), ["defi"], [0], overrides=[("train.num_steps", "many")], **kw)
    assert not os.listdir(tmp_path)                                   # nothing written


def test_rerun_with_other_set_overrides_is_refused(tmp_path):
    """--set overrides are part of a run's recorded command: a finished run rerun with other ones is refused."""
    kw = dict(data_dir=str(tmp_path / "data"), steps=3)
    sets = [("model.head.cross_attention", "full")]
    done = ablate.plan(str(tmp_path), ["defi"], [0], overrides=sets, **kw).runs["defi", 0]
    os.makedirs(done.workdir)
    with open(os.path.join(done.workdir, sweep.RESULT), "w") as f:
        json.dump({"step": 3, "metrics": {}, "command": sweep._command(done.argv)}, f)
    ablate.plan(str(tmp_path), ["defi"], [0], overrides=sets, **kw)       # same --set: reused
    for other, changed in (((), "full -> (unset)"), ([("model.head.cross_attention", "causal")], "full -> causal")):
        with pytest.raises(ValueError, match=rf"seed=0: finished with another command \(model\.head\.cross_attention "
                                             rf"{re.escape(changed)}\)"):
            ablate.plan(str(tmp_path), ["defi"], [0], overrides=other, **kw)


def test_features_plan_one_store_per_variant_its_fine_tunings_train_on(tmp_path, demo_data_dir):
    """--features=N: each variant's GFDM features are computed once (launch.precompute_features with its own keys:
    its GFDM), every seed of it trains on that store, centred; the train step on features lowers; all_train (the
    GFDM trained) is refused."""
    p = ablate.plan(str(tmp_path), ["defi", "no_gfdm_pretrain"], [0, 1], data_dir=demo_data_dir, steps=3,
                    pretrain_steps=2, features=16, feature_eval_windows=8)
    assert set(p.features) == {"defi", "no_gfdm_pretrain"}
    for name, store in p.features.items():
        assert store.workdir == str(tmp_path / name / "features") and store.num_steps == 0
        assert store.argv[1:3] == ["-m", "launch.precompute_features"]
        assert {f"--out={store.workdir}", "--train_windows=16", "--eval_windows=8"} <= set(store.argv)
        assert ("--config.policy.gfdm_init=initial" in store.argv) == (name == "no_gfdm_pretrain")
        for seed in (0, 1):
            got = _flat(p.configs[p.runs[name, seed].workdir])
            assert (got["data.source"], got["data.features_dir"], got["model.center_features"]) == (
                "features", store.workdir, True)
            assert got["init.sources.feature_stats.path"] == store.workdir   # centred with the store's own mean
    logs = []
    steps = ablate.dry_run(dataclasses.replace(p, runs={k: v for k, v in p.runs.items() if k[0] == "defi"},
                                               pretrain={}), run_steps=False, log=logs.append)
    assert steps["defi"]["loss"].shape == () and logs == ["defi: train step traced and lowered"]
    with pytest.raises(ValueError, match="finetune='all'"):
        ablate.plan(str(tmp_path / "all"), ["all_train"], [0], data_dir=demo_data_dir, steps=3, features=16)
