"""The DeFI policy stage: starts from GFDM / GIDM workdirs, fine-tuning modes, ablation variants, inference and export.

One short fine-tune on the demo data (module fixture) backs most tests: its GFDM and GIDM come from workdirs the
fixture writes (tiny stages with random weights, saved as params-only checkpoints).
"""

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import save_random_workdir
from flax import nnx

from defi_jax import checkpoint, config_validation, sharding, trainer, weights
from defi_jax.policy import stage as policy_stage

REPO = Path(__file__).resolve().parents[1]


def _policy_config(tiny_config, demo_data_dir, tmp, **policy):
    c = tiny_config("policy", batch_size=4)
    c.init.sources.gfdm.path = str(tmp / "gfdm")
    c.init.sources.gidm.path = str(tmp / "gidm")
    c.data.data_dir = demo_data_dir
    for k, v in policy.items():
        c.policy[k] = v
    return c


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, demo_data_dir, tiny_config, one_device_mesh):
    tmp = tmp_path_factory.mktemp("policy")
    for seed, stage in enumerate(("gfdm", "gidm")):   # random stand-ins for the pretrained stages
        save_random_workdir(stage, tiny_config(stage), str(tmp / stage), seed=seed)
    gfdm_params, gidm_params = (checkpoint.restore_params(str(tmp / s)) for s in ("gfdm", "gidm"))
    c = _policy_config(tiny_config, demo_data_dir, tmp)
    c.train.num_steps = 30
    c.train.log_every = 10
    c.train.save_every = 30
    c.eval.batches = 1
    workdir = str(tmp / "run")
    tr = trainer.Trainer(c, mesh=one_device_mesh)   # kept: its compiled init rebuilds the initial state
    result = tr.fit(workdir)
    return dict(tmp=tmp, config=c, workdir=workdir, result=result, gfdm=gfdm_params, gidm=gidm_params, trainer=tr)


def test_policy_starts_from_the_stage_workdirs_and_keeps_the_gfdm_frozen(finetuned):
    final = checkpoint.restore_params(finetuned["workdir"])
    gfdm = {k[len("gfdm/"):]: v for k, v in final.items() if k.startswith("gfdm/")}
    assert gfdm.keys() == finetuned["gfdm"].keys()
    for k, v in finetuned["gfdm"].items():   # frozen in gidm_adapter: bitwise the GFDM workdir's weights
        np.testing.assert_array_equal(np.asarray(gfdm[k]), np.asarray(v), err_msg=k)
    # The GIDM encoder was loaded from its workdir and then trained.
    lam = {k[len("latent_actions/lam/"):]: v for k, v in final.items() if k.startswith("latent_actions/lam/")}
    shared = [k for k in lam if k in finetuned["gidm"]]
    assert "encoder/transformer_blocks/0/spatial_attn/to_q/kernel" in shared and "text_encoder/embed/embedding" in shared
    assert any(not np.array_equal(np.asarray(lam[k]), np.asarray(finetuned["gidm"][k])) for k in shared)


def test_short_finetune_lowers_the_action_loss(finetuned, one_device_mesh):
    """The action loss on one training batch at 4 fixed (sigma, noise) draws, before and after the fine-tune,
    through the stage's own evaluation (compiled by the fine-tune: another eval.batches only traces it again).
    After / before is ~0.69-0.71 whether 2, 4 or 8 draws are averaged (twenty-second session)."""
    c = finetuned["config"].copy_and_resolve_references()
    c.eval.batches = 4
    initial = finetuned["trainer"]      # the fine-tune's own trainer: its initial state, already compiled
    batch = initial.global_batch(next(policy_stage.make_data(c, 0, 1, "train")))   # laid out as in its evaluation
    models = (initial.model(initial.init_state()), trainer.restore_model(c, finetuned["workdir"], mesh=one_device_mesh))
    with sharding.use_rules(initial.mesh, initial.rules):   # as the trainer evaluates: the same program
        before, after = (policy_stage.evaluate(m, c, None, 0, itertools.repeat(batch))["eval_action_loss"]
                         for m in models)
    assert after < 0.85 * before, (before, after)
    assert "eval_action_mse" in finetuned["result"].metrics
    stats = json.load(open(os.path.join(finetuned["workdir"], "assets", "action_stats.json")))
    assert stats["normalized"] and len(stats["stats"]["q01"]) == 7


def test_evaluation_compiles_once_per_run(finetuned, one_device_mesh, count_compiles):
    """Evaluating again with the run's config and model structure compiles nothing (the fixture's fine-tune
    evaluated with them already); a rebuilt or mis-keyed cache would compile at every call."""
    c = finetuned["config"]
    model = trainer.restore_model(c, finetuned["workdir"], mesh=one_device_mesh)
    tr = finetuned["trainer"]
    batch = tr.global_batch(next(policy_stage.make_data(c, 0, 1, "eval")))
    runs = []
    for _ in range(2):
        with count_compiles() as n, sharding.use_rules(tr.mesh, tr.rules):   # as the trainer evaluates
            metrics = policy_stage.evaluate(model, c, None, 30, iter([batch]))
        runs.append((metrics, n[0]))
    (first, _), (again, recompiles) = runs
    assert recompiles == 0
    np.testing.assert_equal(again, first)   # the same fixed draws (NaN equal to NaN)
    assert np.isfinite(first["eval_action_mse"])


def test_same_instruction_partner():
    ids = jnp.asarray([[1, 2], [3, 4], [1, 2], [5, 6], [1, 2], [3, 4]])
    assert policy_stage.same_instruction_partner(ids).tolist() == [2, 5, 4, 3, 0, 1]   # row 3: alone, itself
    assert policy_stage.same_instruction_partner(ids[:1]).tolist() == [0]
    assert policy_stage.other_instruction_partner(ids).tolist() == [1, 2, 3, 4, 5, 0]
    assert policy_stage.other_instruction_partner(ids[jnp.asarray([0, 2, 4, 1])]).tolist() == [3, 3, 3, 0]
    assert policy_stage.other_instruction_partner(ids[jnp.asarray([0, 2])]).tolist() == [0, 1]   # one instruction


def test_observation_and_latent_swaps_measure_what_the_images_and_the_gidm_tokens_add(finetuned, one_device_mesh):
    """eval_obs_info_gap swaps images only, between samples of one instruction: with every frame of the batch
    equal it is exactly 0 (instructions, noise draws and actions stay with their sample), with distinct frames
    it is not; with no two samples of one instruction nothing is swapped and it is NaN.
    eval_latent_swap_change gives each sample the latent-action tokens of a sample of another instruction:
    the sampled chunk moves; with the head's token embedding zeroed (tokens unread) it moves exactly 0; with
    one instruction in the batch nothing is swapped and it is NaN."""
    c = finetuned["config"]
    model = trainer.restore_model(c, finetuned["workdir"], mesh=one_device_mesh)
    tr = finetuned["trainer"]
    local = next(policy_stage.make_data(c, 0, 1, "eval"))
    same = dict(local, frames=np.broadcast_to(local["frames"][:1], local["frames"].shape).copy())
    unique = dict(local, goal_ids=local["goal_ids"].copy())
    unique["goal_ids"][:, -1] = 3 + np.arange(len(unique["goal_ids"]))   # a different last (padding) token per row
    one_task = dict(local, goal_ids=np.broadcast_to(local["goal_ids"][:1], local["goal_ids"].shape).copy())
    with sharding.use_rules(tr.mesh, tr.rules):
        distinct, equal, alone = (policy_stage.evaluate(model, c, None, 0, iter([tr.global_batch(b)]))
                                  for b in (local, same, unique))
    assert distinct["eval_obs_swap_rows"] >= 2 and equal["eval_obs_swap_rows"] == distinct["eval_obs_swap_rows"]
    assert equal["eval_obs_info_gap"] == 0.0
    assert distinct["eval_obs_info_gap"] != 0.0
    assert alone["eval_obs_swap_rows"] == 0 and np.isnan(alone["eval_obs_info_gap"])
    # config.eval.obs_info_gap=False: the same held-out metrics under the same draws, without the swap's
    off = c.copy_and_resolve_references()
    off.eval.obs_info_gap = False
    with sharding.use_rules(tr.mesh, tr.rules):
        lean = policy_stage.evaluate(model, off, None, 0, iter([tr.global_batch(local)]))
    assert "eval_obs_info_gap" not in lean and "eval_obs_swap_rows" not in lean
    np.testing.assert_equal(lean, {k: v for k, v in distinct.items()          # NaN equal to NaN
                                   if k not in ("eval_obs_info_gap", "eval_obs_swap_rows")})

    with sharding.use_rules(tr.mesh, tr.rules):
        # The short fine-tune's VQ sends every sample to one code (equal tokens: nothing to swap). Each (sample,
        # query) gets its own code: the codebook's first rows become the encoder outputs under the evaluation's
        # draws (policy_stage.evaluate: key(seed + 23), batch 0).
        k_ctx = jax.random.split(jax.random.fold_in(jax.random.key(c.seed + 23), 0), 3)[0]
        graphdef = nnx.graphdef(model)

        @jax.jit
        def encoder_outputs(state, batch):
            m = nnx.merge(graphdef, state)
            text, feats, k_vq, _ = policy_stage._encoded(m, batch, k_ctx)
            return m.context(feats, text, rng=k_vq)[1]["z_e"]

        z_e = np.asarray(encoder_outputs(nnx.state(model), tr.global_batch(unique)), np.float32)
        z_e = z_e.reshape(-1, z_e.shape[-1])
        vq = model.latent_actions.lam.vq
        codebook = vq.effective_codebook().at[:len(z_e)].set(z_e)
        vq.codebook[...], vq.codebook_shift[...] = codebook.astype(vq.codebook.dtype), jnp.zeros_like(codebook)
        read, alone = (policy_stage.evaluate(model, c, None, 0, iter([tr.global_batch(b)])) for b in (unique, one_task))
        embed = model.head.inner_model.tok_emb_token
        embed.kernel[...] = jnp.zeros_like(embed.kernel[...])
        unread = policy_stage.evaluate(model, c, None, 0, iter([tr.global_batch(unique)]))
    assert read["eval_latent_swap_rows"] == len(unique["goal_ids"]) == unread["eval_latent_swap_rows"]
    assert np.isfinite(read["eval_latent_swap_change"]) and read["eval_latent_swap_change"] > 0.0
    assert unread["eval_latent_swap_change"] == 0.0
    assert alone["eval_latent_swap_rows"] == 0 and np.isnan(alone["eval_latent_swap_change"])


@pytest.mark.parametrize("mode", ["gidm_adapter", "adapter_only", "all"])
def test_finetune_modes_train_exactly_their_parameters(finetuned, demo_data_dir, tiny_config, one_device_mesh, mode):
    c = _policy_config(tiny_config, demo_data_dir, finetuned["tmp"], finetune=mode)
    layout = trainer.Trainer(c, mesh=one_device_mesh).layout
    abstract = layout.abstract_state()
    trained = set(trainer._flat(abstract.params))
    frozen = set(trainer._flat(abstract.frozen))
    assert any(k.startswith("gfdm/unet/") for k in (trained if mode == "all" else frozen))
    assert all(k.startswith(("gfdm/vae/", "gfdm/text_encoder/")) or k in frozen
               for k in frozen if k.startswith("gfdm/"))
    lam_trained = any(k.startswith("latent_actions/lam/") for k in trained)
    assert lam_trained == (mode != "adapter_only")
    assert all(k.startswith(("video_former/", "head/", "latent_actions/")) or k.startswith("gfdm/unet/")
               for k in trained)
    # The optimizer state holds moments for exactly the trainable parameters.
    mu = abstract.opt_state
    moment_paths = {"/".join(str(getattr(p, "key", p)) for p in path)
                    for path, _ in jax.tree_util.tree_flatten_with_path(mu)[0]}
    for k in frozen:
        assert not any(m.endswith(k) for m in moment_paths), k
    assert any(m.endswith("head/inner_model/action_pred/kernel") for m in moment_paths)


def test_all_mode_lets_the_gradient_reach_the_unet(finetuned, demo_data_dir, tiny_config, one_device_mesh,
                                                  fast_compile):
    """``finetune=all`` backpropagates through the GFDM features into the UNet; the other modes stop the gradient
    there. (The gradient is what is checked: AdamW's weight decay alone would move a UNet that gets none.)"""
    batch = next(policy_stage.make_data(finetuned["config"], 0, 1, "train"))
    for mode, reaches in (("all", True), ("gidm_adapter", False)):
        c = _policy_config(tiny_config, demo_data_dir, finetuned["tmp"], finetune=mode)
        model = trainer.restore_model(c, finetuned["workdir"], mesh=one_device_mesh)
        text = policy_stage.encode_instruction(model, batch)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def energy(params):
            m = nnx.merge(graphdef, params, rest)
            return jax.numpy.sum(m.features(batch["frames"], text["gfdm"], jax.random.key(0)) ** 2)

        grads = jax.jit(jax.grad(energy), compiler_options=fast_compile)(params)
        unet = [np.abs(np.asarray(g)).max() for k, g in trainer._flat(nnx.to_pure_dict(grads)).items()
                if k.startswith("gfdm/unet/")]
        assert unet and (max(unet) > 0) == reaches, (mode, max(unet))


# The ablate dry run (tests/test_ablate.py) lowers the train steps of the continuous-latent and multi-step variants.
ABLATION_VARIANTS = (dict(latent_action="binning"), dict(latent_action="gmm"), dict(head=dict(cross_attention="full")))


def test_an_initial_gfdm_loads_only_the_gfdm_workdirs_frozen_towers(finetuned, demo_data_dir, tiny_config):
    """policy.gfdm_init=initial (the no-GFDM-pretraining ablation): the GFDM workdir's VAE and text tower, which its
    pretraining froze, load bitwise; its pretrained UNet does not (the random initial one stays)."""
    c = _policy_config(tiny_config, demo_data_dir, finetuned["tmp"], gfdm_init="initial")
    config_validation.resolve(c)
    loaded = weights.load_init_params(c, finetuned["trainer"].layout.abstract_params())
    gfdm = {k[len("gfdm/"):]: v for k, v in loaded.items() if k.startswith("gfdm/")}
    towers = {k for k in finetuned["gfdm"] if k.startswith(("vae/", "text_encoder/"))}
    assert towers and gfdm.keys() == towers
    for k in towers:
        np.testing.assert_array_equal(np.asarray(gfdm[k]), np.asarray(finetuned["gfdm"][k]), err_msg=k)
    assert any(k.startswith("latent_actions/") for k in loaded)   # the GIDM still from its workdir


def test_ablation_variants_build_and_trace_their_loss(finetuned, demo_data_dir, tiny_config):
    """The other variants' models build and their training loss traces to a float32 scalar on a batch of their data
    (no compile here: the bottlenecks run below)."""
    c = _policy_config(tiny_config, demo_data_dir, finetuned["tmp"], gidm_init="random")
    batch = {k: jax.numpy.asarray(v) for k, v in next(policy_stage.make_data(c, 0, 1, "train")).items()}
    for variant in ABLATION_VARIANTS:
        c = _policy_config(tiny_config, demo_data_dir, finetuned["tmp"], gidm_init="random")
        for k, v in variant.items():
            c.model[k] = dict(c.model[k], **v) if isinstance(v, dict) else v
        graphdef, state = nnx.split(nnx.eval_shape(lambda: policy_stage.build_model(c, nnx.Rngs(0))))
        loss, metrics = jax.eval_shape(
            lambda s, b: policy_stage.loss_fn(nnx.merge(graphdef, s), b, jax.random.key(0), c), state, batch)
        assert (loss.shape, loss.dtype) == ((), np.float32) and metrics["action_loss"].shape == (), variant


def test_latent_action_bottlenecks_and_multi_step_features_run_finite(finetuned, one_device_mesh, fast_compile):
    """The fine-tuned model's adapter through each latent-action bottleneck, and its GFDM features after two
    denoising steps: finite, shaped as the VQ path's, binning on its grid, two steps unlike one."""
    c = finetuned["config"]
    model = trainer.restore_model(c, finetuned["workdir"], mesh=one_device_mesh)
    batch = {k: jax.numpy.asarray(v) for k, v in next(policy_stage.make_data(c, 0, 1, "train")).items()}
    text = policy_stage.encode_instruction(model, batch)

    def run(fn):   # fn(model) compiled for the model's static attributes now (fast CPU compiles)
        graphdef, state = nnx.split(model)
        return jax.jit(lambda state: fn(nnx.merge(graphdef, state)), compiler_options=fast_compile)(state)

    one = run(lambda m: m.features(batch["frames"], text["gfdm"], jax.random.key(1)))
    model.gfdm_steps = 2                  # a static attribute: another program
    two = run(lambda m: m.features(batch["frames"], text["gfdm"], jax.random.key(1)))
    assert one.shape == two.shape and np.isfinite(np.asarray(two)).all()
    assert not np.allclose(np.asarray(one), np.asarray(two))

    def bottleneck(kind):
        model.latent_action = kind
        return run(lambda m: m._latent_tokens(one[:, 0], text["gidm"], text["gidm_mask"], train=False, rng=None))

    vq = bottleneck("vq")
    for kind in ("continuous", "binning", "gmm"):
        out = bottleneck(kind)
        assert out["tokens"].shape == vq["tokens"].shape and np.isfinite(np.asarray(out["tokens"])).all(), kind
    z = np.asarray(bottleneck("binning")["z_q"])
    levels = (model.latent_bins - 1) / 2.0
    np.testing.assert_allclose(z, np.round((z + 1.0) * levels) / levels - 1.0, atol=1e-5)


def test_validation_names_missing_pretrained_stages(demo_data_dir, tiny_config, tmp_path):
    c = _policy_config(tiny_config, demo_data_dir, tmp_path)
    c.init.sources.gidm.path = ""
    c.init.allow_random = False
    with pytest.raises((ValueError, config_validation.ConfigError), match="config.init.sources.goal_text.path"):
        config_validation.validate(c, num_devices=1)     # the frozen CLIP goal tower needs weights
    c.init.sources.goal_text.path = "/ckpt/clip"         # (validation reads no file)
    with pytest.raises((ValueError, config_validation.ConfigError), match="config.init.sources.gidm.path"):
        config_validation.validate(c, num_devices=1)
    c.policy.gidm_init = "random"                        # the no-GIDM-pretraining ablation: valid
    config_validation.validate(c, num_devices=1)
    c.policy.finetune = "bogus"
    with pytest.raises((ValueError, config_validation.ConfigError), match="config.policy.finetune"):
        config_validation.validate(c, num_devices=1)


def test_act_then_export_to_gs_and_act_alike_in_a_fresh_process(finetuned, gcs, tmp_path, fast_compile,
                                                                  subprocess_env):
    """The restored policy acts; a pod run exports next to its checkpoints: ``DeFIPolicy.export("gs://...")`` stages
    locally, uploads the folder (manifest last), ``load_exported`` reads it back from the bucket, and a fresh
    process with jax and numpy only, given the uploaded bytes, draws the same actions for the seed. (One export
    and one act compile per process: 42 s in an idle ``make test``, the two tests it replaced 45 + 26 CPU-s.)"""
    from defi_jax import paths
    from defi_jax.inference import DeFIPolicy, load_exported

    rs = np.random.default_rng(0)
    obs = {"primary": rs.integers(0, 256, (48, 48, 3), dtype=np.uint8),
           "wrist": rs.integers(0, 256, (32, 32, 3), dtype=np.uint8)}
    policy = DeFIPolicy.from_checkpoint(finetuned["workdir"], seed=3, compiler_options=fast_compile)
    a = policy.act(obs, "push the puck to the goal")
    assert a.shape == (10, 7) and a.dtype == np.float32 and np.isfinite(a).all()
    batch = policy.act_batch([obs, obs], ["push the puck to the goal", "press the button"])
    assert batch.shape == (2, 10, 7)
    with pytest.raises(KeyError, match="wrist"):
        policy.act({"primary": obs["primary"]}, "x")

    policy.export("gs://bucket/runs/policy/exported", platforms=["cpu"])
    assert paths.listdir("gs://bucket/runs/policy/exported")[:2] == ["act.jax", "encode.jax"]
    served = load_exported("gs://bucket/runs/policy/exported")   # reads the computations and weights back
    assert served.views == ("primary", "wrist") and served.manifest["horizon"] == 10
    with pytest.raises(FileNotFoundError, match="gs://bucket/nothing/manifest.json: not a defi-jax exported"):
        load_exported("gs://bucket/nothing")

    uploaded = os.path.join(gcs.root, "bucket/runs/policy/exported")   # its bytes, for a process without the fake
    np.save(tmp_path / "obs_primary.npy", obs["primary"])
    np.save(tmp_path / "obs_wrist.npy", obs["wrist"])
    code = r"""
import sys, numpy as np
from defi_jax.inference import load_exported
p = load_exported(sys.argv[1])
obs = {"primary": np.load(sys.argv[2] + "/obs_primary.npy"), "wrist": np.load(sys.argv[2] + "/obs_wrist.npy")}
np.save(sys.argv[2] + "/exported_act.npy", p.act_batch([obs], ["push the puck to the goal"], seed=3)[0])
bad = sorted(m for m in sys.modules if m.startswith(("defi_jax.policy", "defi_jax.models", "defi_jax.gfdm",
             "defi_jax.gidm", "defi_jax.trainer", "data_pipelines")))
assert not bad, bad
"""
    out = subprocess.run([sys.executable, "-c", code, uploaded, str(tmp_path)], cwd=REPO,
                         env=subprocess_env(devices=0), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    # Deterministic for a seed: a fresh process, from the exported artifact, draws the same actions for seed 3.
    np.testing.assert_allclose(np.load(tmp_path / "exported_act.npy"), a, rtol=1e-5, atol=1e-5)

    (tmp_path / "broken").mkdir()
    manifest = json.load(open(os.path.join(uploaded, "manifest.json")))
    (tmp_path / "broken" / "manifest.json").write_text(json.dumps(dict(manifest, format=99)))
    with pytest.raises(ValueError, match="format"):
        load_exported(str(tmp_path / "broken"))


def test_from_checkpoint_applies_the_sampler_overrides(finetuned):
    """``DeFIPolicy.from_checkpoint(gfdm_steps=, sample_steps=, sample_sigma_min=)`` (``launch.evaluate`` / ``serve``
    flags) reach the restored policy's sampler and model; without them the checkpoint's own values act; a bad value
    is refused naming its key. (Nothing is compiled here.)"""
    from defi_jax.inference import DeFIPolicy

    m = finetuned["config"].model
    plain = DeFIPolicy.from_checkpoint(finetuned["workdir"])
    assert (plain.num_steps, plain.sigma_min) == (m.sample_steps, m.sample_sigma_min)
    assert nnx.merge(plain._graphdef, plain._state).gfdm_steps == m.gfdm_steps
    policy = DeFIPolicy.from_checkpoint(finetuned["workdir"], gfdm_steps=m.gfdm_steps + 1,
                                        sample_steps=m.sample_steps + 2, sample_sigma_min=0.5 * m.sample_sigma_min)
    assert (policy.num_steps, policy.sigma_min) == (m.sample_steps + 2, 0.5 * m.sample_sigma_min)
    assert nnx.merge(policy._graphdef, policy._state).gfdm_steps == m.gfdm_steps + 1
    assert policy.config.model.sample_steps == m.sample_steps + 2 and m.sample_steps == plain.num_steps  # a copy
    with pytest.raises(ValueError, match=r"config.model.sample_steps=0 must be >= 1"):
        DeFIPolicy.from_checkpoint(finetuned["workdir"], sample_steps=0)


def test_tiny_policy_trains_its_missing_stage_workdirs_first(tmp_path, monkeypatch, finetuned, tiny_config):
    c = tiny_config("policy")
    c.init.sources.gfdm.path = str(tmp_path / "gfdm")            # missing: trained first
    c.init.sources.gidm.path = str(finetuned["tmp"] / "gidm")    # has a checkpoint: left alone
    calls = []
    monkeypatch.setattr(trainer, "train", lambda config, workdir: calls.append((config.stage, workdir)))
    policy_stage.prepare(c)
    assert calls == [("gfdm", str(tmp_path / "gfdm"))]
    calls.clear()
    c.policy.gfdm_init = "initial"   # resolved: the missing workdir is still the one its frozen VAE / text come from
    config_validation.resolve(c)
    policy_stage.prepare(c)
    assert c.init.sources.gfdm.path == "" and calls == [("gfdm", str(tmp_path / "gfdm"))]
    calls.clear()
    for name in ("svd_vae", "svd_clip"):   # a user's own towers (a VAE-stage workdir, say): never trained over
        c.init.sources[name] = weights.source("^", "workdir", str(tmp_path / "own_vae"))
    policy_stage.prepare(c)
    assert calls == []
    c.policy.pretrain_missing = False                            # the defi variant's default
    calls.clear()
    policy_stage.prepare(c)
    assert calls == []


def test_a_random_gfdm_is_one_draw_for_every_seed(tiny_config):
    """Without published weights (policy.gfdm_init=initial) the frozen GFDM's random weights are the same for every
    config.seed (one features store / statistics file serves all seeds); every other network is drawn from the
    seed as if the GFDM had drawn from it first (so seed 0 builds what it built before the GFDM had its own key)."""
    from defi_jax.gfdm.model import GFDM, GFDMOptions
    from defi_jax.models.clip_text import CLIPTextConfig, CLIPTextEncoder

    c = tiny_config("policy")
    model = policy_stage.build_model(c, nnx.Rngs(1))   # eager: a jitted init rounds differently
    options, goal_config = GFDMOptions.from_config(c.model.gfdm), CLIPTextConfig(**dict(c.model.goal_text))
    want_gfdm = GFDM(options, rngs=nnx.Rngs(0))
    rngs = nnx.Rngs(1)   # the draws before the GFDM had its own key: GFDM first, then the goal tower
    seed1_gfdm = GFDM(options, rngs=rngs)
    want_goal = CLIPTextEncoder(goal_config, rngs=rngs, with_projection=True)
    for want, got in ((want_gfdm, model.gfdm), (want_goal, model.goal_text)):
        jax.tree.map(np.testing.assert_array_equal, nnx.state(want, nnx.Param), nnx.state(got, nnx.Param))
    differ = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b), nnx.state(seed1_gfdm, nnx.Param),
                                          nnx.state(model.gfdm, nnx.Param)))
    assert any(differ)   # seed 1 would have drawn another GFDM
