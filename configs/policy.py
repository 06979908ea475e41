"""DeFI policy fine-tuning (stage 3): frozen GFDM + GIDM adapter + EDM diffusion-transformer action head.

    python -m launch.train --config=configs/policy.py:tiny --workdir=/tmp/policy    # after make demo's GFDM / GIDM
    python -m launch.train --config=configs/policy.py:defi --workdir=gs://bucket/policy \\
        --config.init.sources.gfdm.path=gs://bucket/gfdm --config.init.sources.gidm.path=gs://bucket/gidm \\
        --config.init.sources.goal_text.path=/ckpt/clip-vit-base-patch32 \\
        --config.data.mixture=calvin_abc_d --config.data.paths.calvin_abc_d=/data/calvin/task_ABC_D

Variants:
  defi  the reference's stage 3: the full GFDM (SVD UNet at 256 px, 16 frames, 2560-wide one-step features), the
        full GIDM encoder (768 wide, 12 blocks, VQ 16 x 128), Video Former 384 wide x depth 6 (16 frames x 14
        queries), head 384 wide, 4 + 4 layers, 8 heads, 10 x 7 actions; AdamW (0.9, 0.9), wd 0.05, constant lr
        1e-4, no clipping, batch 32; static + wrist views.
  tiny  minutes on a CPU: the demo's tiny GFDM and GIDM (``configs/gfdm.py:tiny``, ``configs/gidm.py:tiny``)
        loaded from ``workdirs/demo/{gfdm,gidm}`` (trained there first when missing: ``policy.pretrain_missing``),
        a small adapter and head, the embedded Meta-World demo data.
  demo  ``make demo``'s policy: tiny's model and data, trained long enough to act in Meta-World closed loop, its
        GFDM features standardized with the statistics in ``workdirs/demo/feature_stats`` (computed on its first
        run); tiny stays minute-scale: the tests build it.

Keys beyond the stage configs':
  policy.finetune        gidm_adapter (default) | adapter_only | all      (what is trained: paper Table 9)
  policy.gfdm_init       pretrained (init.sources.gfdm: a GFDM workdir) | initial (the un-fine-tuned weights:
                         init.sources.svd_unet / svd_vae / svd_clip; an empty svd_vae / svd_clip reads the frozen
                         VAE / text tower of init.sources.gfdm's workdir, which its pretraining never changed; a
                         missing UNet is random in tiny: one draw, from a fixed key, for every config.seed)
  policy.gidm_init       pretrained (init.sources.gidm: a GIDM workdir) | random
  model.latent_action    vq (default) | continuous | binning | gmm        (the latent-action ablation)
  model.gfdm_steps       GFDM denoising steps before the features (1 = the paper's default; 5 = its ablation)
  model.cross_attention  inside model.head: causal (the reference's quirk) | full
  model.head.train_sigma_loc / train_sigma_scale   the training sigmas' log-logistic (ln 0.5 and 0.5, the
                         reference's: ~1% above sigma 5, where the sampler starts); a wider scale trains the head
                         more where only the observation says what the chunk is (BENCHMARKS.md, ninth session)
  model.attention_impl   the GFDM's and the GIDM encoder's attention kernel (None = XLA, "cudnn" on GPU); it sets
                         model.gfdm.attention_impl and model.gidm.attention_impl
  model.gfdm.remat / model.gidm.remat   per-block rematerialization of those towers (finetune=all trains the UNet)
  data.normalize_actions False = raw actions (the reference on CALVIN); True = [-1, 1] by dataset statistics
  data.source            frames (default: the frozen GFDM runs on every batch) | features (its one-step features
                         precomputed once by launch.precompute_features into data.features_dir; the adapter trains
                         on them without a GFDM forward; finetune=all refused)
  model.center_features  True: the policy subtracts the features' per-channel mean (a frozen parameter read from
                         init.sources.feature_stats, which data.source=features points at its store) before the
                         adapter; the adapter learns to read the scene with fewer windows (BENCHMARKS.md)
  model.scale_features   True (with center_features): also divides them by the store's per-channel standard
                         deviation, so the adapter sees one input scale whichever GFDM made the features
  policy.feature_stats_windows  training on frames with center_features: when init.sources.feature_stats.path
                         holds no statistics yet, the run first computes them there from this many training windows
                         of its GFDM (launch.precompute_features --stats_only); 0 refuses instead
  train.schedule         constant (the released run) | tri_stage (the configured but unused schedule)
  eval.obs_info_gap      True: evaluations also report eval_obs_info_gap (each sample sees another sample's images
                         of the same instruction), at about twice the evaluation's cost; False leaves it out
"""

import math
import os

import ml_collections

from configs import gfdm as gfdm_configs
from configs import gidm as gidm_configs
from configs.base import get_base_config
from defi_jax import weights


def _clip_goal(variant: str) -> dict:
    if variant == "tiny":   # byte-tokenized like the tiny GFDM's text tower
        return dict(vocab_size=260, hidden_size=32, intermediate_size=64, projection_dim=32, num_hidden_layers=1,
                    num_attention_heads=2, max_position_embeddings=32, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                    pad_token_id=2, bos_token_id=1, eos_token_id=2)
    return gfdm_configs._clip_text()   # OpenAI CLIP ViT-B/32 text tower (+ its 512 projection), context 77


def get_config(arg: str | None = None):
    variant = arg or "tiny"
    if variant not in ("tiny", "demo", "defi"):
        raise ValueError(f"configs/policy.py: unknown variant {variant!r} (tiny | demo | defi)")
    small = variant in ("tiny", "demo")
    gf = gfdm_configs.get_config("tiny" if small else "svd")
    gi = gidm_configs.get_config("tiny" if small else "defi")

    c = get_base_config()
    c.stage = "policy"
    m = c.model
    m.gfdm = gf.model
    m.gidm = gi.model
    m.attention_impl = ml_collections.FieldReference(None, field_type=str)  # None = XLA; "cudnn" on GPU
    m.gfdm.attention_impl = m.get_ref("attention_impl")
    m.gidm.attention_impl = m.get_ref("attention_impl")
    m.goal_text = _clip_goal("tiny" if small else variant)
    m.num_views = 2                         # static (primary) first, then the wrist camera
    m.gfdm_steps = 1
    m.latent_action = "vq"
    m.latent_bins = 8                       # binning: levels per latent dimension
    m.latent_gmm_temperature = 1.0          # gmm: softmax temperature over squared codebook distances
    m.latent_action_frames = (0, 5)         # predicted frames the GIDM reads (static view)
    m.video_former = dict(dim=384, depth=6, queries_per_frame=14, heads=8, dim_head=64, temporal_heads=8)
    m.head = dict(dim=384, enc_layers=4, dec_layers=4, heads=8, cross_attention="causal", attn_pdrop=0.3,
                  resid_pdrop=0.1, mlp_pdrop=0.05, sigma_data=0.5, sigma_min=1e-3, sigma_max=80.0,
                  train_sigma_loc=math.log(0.5), train_sigma_scale=0.5)   # training sigmas: log-logistic
    m.action_dim = 7
    m.horizon = 10
    m.sample_steps = 10                     # DDIM (DPM-Solver-1) steps at inference
    m.sample_sigma_min = 1.0                # the released evaluation's sigma_min (training draws from 1e-3)
    m.center_features = False               # subtract the GFDM features' mean (init.sources.feature_stats)
    m.scale_features = False                # and divide by their standard deviation (needs center_features)

    c.policy = ml_collections.ConfigDict()
    c.policy.finetune = "gidm_adapter"
    c.policy.gfdm_init = "pretrained"
    c.policy.gidm_init = "pretrained"
    c.policy.action_stats_dataset = ""      # whose statistics inference unnormalizes with ("" = largest in the mix)
    c.policy.pretrain_missing = False       # train a missing GFDM / GIDM source workdir first (tiny configs)
    c.policy.feature_stats_windows = 512    # missing init.sources.feature_stats: computed from this many windows

    c.init = weights.init_config()
    s = c.init.sources
    s.gfdm = weights.source("^gfdm/", "workdir")                     # a GFDM workdir (latest step)
    s.gidm = weights.source("^latent_actions/lam/", "workdir")       # a GIDM workdir: encoder, VQ, text tower
    s.goal_text = weights.source("^goal_text/", "hf_clip_text")      # transformers CLIP (with projection)
    s.svd_unet = weights.source("^gfdm/unet/", "diffusers_unet")     # gfdm_init=initial: published SVD
    s.svd_vae = weights.source("^gfdm/vae/", "diffusers_vae")
    s.svd_clip = weights.source("^gfdm/text_encoder/", "hf_clip_text")
    s.feature_stats = weights.source("^feature_stats/", "feature_stats")   # model.center_features: a features store
    c.init.tokenizer_path = ""              # CLIP BPE vocabulary folder (GFDM text and goal); "" = byte tokenizer

    c.data = gi.data.copy_and_resolve_references()
    c.data.mixture = "demo_robot"
    c.data.views = ("primary", "wrist")
    c.data.resolution = 256
    c.data.obs_frames = 1
    c.data.action_horizon = 10
    c.data.normalize_actions = True
    c.data.source = "frames"                # | features: launch.precompute_features's store (GFDM not run)
    c.data.features_dir = ""

    c.eval = ml_collections.ConfigDict()
    c.eval.batches = 4
    c.eval.obs_info_gap = True              # + eval_obs_info_gap: images swapped within a task (2x eval cost)

    t = c.train
    t.batch_size = 32
    t.num_steps = 50_000
    t.lr = 1e-4
    t.schedule = "constant"                 # the released script trains at a constant 1e-4 (see REFERENCE.md)
    t.tri_stage_init_scale = 0.1            # schedule=tri_stage: the configured (unused) reference schedule
    t.tri_stage_final_scale = 1e-6
    t.warmup_steps = 0
    t.b1, t.b2 = 0.9, 0.9
    t.weight_decay = 0.05
    t.grad_clip = 0.0
    t.ema_decay = 0.0
    t.frozen = ()                           # + configs' policy.finetune (defi_jax.policy.stage.frozen_patterns)
    t.log_every = 100
    t.eval_every = 5000
    t.save_every = 5000

    if small:
        m.latent_action_frames = (0, 3)     # the tiny GFDM predicts 4 frames
        m.video_former = dict(dim=32, depth=1, queries_per_frame=2, heads=2, dim_head=16, temporal_heads=2)
        m.head = dict(m.head, dim=32, enc_layers=1, dec_layers=1, heads=2)
        m.sample_steps = 10
        c.policy.pretrain_missing = True    # trains the demo's GFDM / GIDM first when they are missing
        demo = os.path.abspath(os.path.join("workdirs", "demo"))
        s.gfdm.path = os.path.join(demo, "gfdm")
        s.gidm.path = os.path.join(demo, "gidm")
        c.init.allow_random = True          # the tiny goal tower is random (no CLIP weights ship)
        c.data.mixture = "demo_robot"
        c.data.resolution = 32
        c.data.num_workers = 0
        c.eval.batches = 2
        t.batch_size = 8
        t.num_steps = 200
        t.lr = 1e-3
        t.compiler_options = {"xla_backend_optimization_level": 0}  # CPU: compiles dominate a tiny run
        t.log_every = 20
        t.eval_every = 0
        t.save_every = 100
    if variant == "demo":
        # Standardized features (the pretrained GFDM's are about twice as large as an initial one's, their per-channel
        # means as large as their spread): 0.555 -> 0.655 closed loop at 50 episodes per task (BENCHMARKS.md).
        m.center_features = m.scale_features = True
        s.feature_stats.path = os.path.join(demo, "feature_stats")   # computed there on the first run
        # At tiny's constant 1e-3 the closed-loop success swings between checkpoints (0.50 at step 250, 0.25 at
        # 500 in one run): the rate decays to 0 over the run instead (BENCHMARKS.md, Meta-World closed loop).
        t.num_steps = 400
        t.schedule = "warmup_cosine"
        t.warmup_steps = 10
        t.end_lr_factor = 0.0
        t.save_every = 200
        t.log_every = 50
        # Its run is long enough that XLA's optimized backend pays for its compile: 2.2 steps/s against 0.99 at
        # tiny's level 0 (2 idle cores).
        t.compiler_options = {"xla_backend_optimization_level": 2}
    return c
