"""GIDM pretraining (DeFI stage 2): the latent action model on frame pairs, no actions used.

    python -m launch.train --config=configs/gidm.py:tiny --workdir=/tmp/gidm
    python -m launch.train --config=configs/gidm.py:defi --workdir=gs://bucket/gidm --config.data.data_dir=... \
        --config.init.sources.dinov2.path=/ckpt/dinov2-with-registers-base \
        --config.init.sources.t5.path=/ckpt/t5-base --config.model.tokenizer_path=/ckpt/t5-base
    python -m launch.describe --config=configs/gidm.py:defi

Variants:
  defi   the released recipe: frozen DINOv2-B/14-reg (224 px -> 256 patch tokens) and T5-base, 768 wide,
         12 encoder + 12 decoder blocks, 12 heads, latent 128, codebook 16 (``model.num_latents=128`` is
         the paper's table), AdamW lr 1e-4, weight decay 1e-2, grad clip 0.1, constant lr, batch 64 x 8.
         The towers' weights: ``config.init.sources.dinov2`` (a transformers folder, or
         ``--config.init.sources.dinov2.kind=torch_hub_dinov2`` with the hub's .safetensors / .pth file) and
         ``config.init.sources.t5``; validation refuses the frozen towers without them.
  tiny   minutes on a CPU: a patch encoder trained from scratch, byte-level instruction embeddings,
         predicts normalized pixel patches of the future frame; with no data flags it trains on the
         embedded demo data (written on first use).

model keys:
  visual_encoder  "dinov2" (frozen, predicts its features) | "patch" (trained from scratch)
  text_encoder    "t5" (frozen T5-base encoder) | "bytes" (trainable byte embedding, tiny)
  target          "features" (future frame's encoder features) | "pixels" (normalized pixel patches)
  feature_dim / text_dim / model_dim / latent_dim / num_latents / enc_blocks / dec_blocks / num_heads
  patch_size, max_text_len (instructions are padded / cut to this many tokens)
  vq_beta (commitment weight), vq_restart_every (steps between dead-code restarts; the reference does it
  once per epoch), vq_restart_from ("codebook" = the reference, "encoder" = random encoder outputs)
  remat (recompute each transformer block in the backward pass), attention_impl (None = XLA, "cudnn" on GPU);
  the layers compute in ``config.train.compute_dtype``
  reference_mask_order: reproduce the reference's encoder language-mask ordering quirk (see model.py)
  residual_target: the decoder output is added to the current frame's target, its output layer starts at
                   zero (tiny; not in the reference)
  action_to_patches: the latent actions are also projected and added to every decoder patch token
                   (tiny; not in the reference, whose decoder reaches them only through attention)
"""

import ml_collections

from configs.base import get_base_config
from defi_jax import weights


def model_config(variant: str = "defi") -> ml_collections.ConfigDict:
    """``config.model`` of a variant (no data / trainer keys; what ``load_gidm`` and tests build from)."""
    m = ml_collections.ConfigDict()
    m.visual_encoder = "dinov2"
    m.text_encoder = "t5"
    m.target = "features"
    m.dino = ml_collections.ConfigDict()   # kwargs of defi_jax.models.dinov2.Dinov2Config (defaults: ViT-B/14-reg)
    m.t5 = ml_collections.ConfigDict()     # kwargs of defi_jax.models.t5.T5Config (defaults: t5-base)
    m.tokenizer_path = ""                  # T5 SentencePiece folder / spiece.model (required for training)
    m.feature_dim = 768
    m.text_dim = 768
    m.model_dim = 768
    m.latent_dim = 128
    m.num_latents = 16                     # released code; the paper's table says 128
    m.enc_blocks = 12
    m.dec_blocks = 12
    m.num_heads = 12
    m.patch_size = 14
    m.image_size = 224
    m.max_text_len = 32
    m.vq_beta = 0.25
    m.vq_restart_every = 5000
    m.vq_restart_from = "codebook"
    m.reference_mask_order = False
    m.residual_target = False              # tiny: decoder predicts target(t+n) - target(t)
    m.action_to_patches = False            # tiny: latent actions also added to every decoder patch token
    m.remat = False                        # per-block rematerialization (gradient checkpointing)
    m.attention_impl = ml_collections.FieldReference(None, field_type=str)  # None = XLA; "cudnn" on GPU
    if variant == "tiny":
        m.visual_encoder = "patch"
        m.text_encoder = "bytes"
        m.target = "pixels"
        m.feature_dim = 64
        m.text_dim = 64
        m.model_dim = 64
        m.latent_dim = 16
        m.num_latents = 32                 # more room than 16 for 4 tokens on a few hundred CPU steps
        m.enc_blocks = 2
        m.dec_blocks = 2
        m.num_heads = 4
        m.patch_size = 8
        m.image_size = 32                  # 4 x 4 patches: a CPU run reaches the tokens within minutes
        m.max_text_len = 32
        m.vq_restart_every = 25
        m.vq_restart_from = "encoder"
        m.residual_target = True
        m.action_to_patches = True
    elif variant != "defi":
        raise ValueError(f"configs/gidm.py: unknown variant {variant!r} (defi | tiny)")
    return m


def get_config(arg: str | None = None):
    variant = arg or "defi"
    c = get_base_config()
    c.stage = "gidm"
    c.model = model_config(variant)
    # The frozen towers' published weights (defi_jax/weights.py): set the path on the command line.
    c.init.sources.dinov2 = weights.source("^dino_encoder/", "hf_dinov2")   # or kind "torch_hub_dinov2"
    c.init.sources.t5 = weights.source("^text_encoder/", "hf_t5_encoder")

    from data_pipelines.config import default_data_config
    c.data = default_data_config()
    c.data.mixture = "gidm_paper"
    c.data.normalize_instructions = True   # the reference collator: lower-case, punctuation stripped
    c.data.pair_spacing = "reference"      # the reference's frame pairs (10-frame window, per-dataset ranges)

    c.eval = ml_collections.ConfigDict()
    c.eval.batches = 8                     # held-out batches for eval losses and the action probe
    c.eval.probe_ridge = 1e-3              # ridge strength of the closed-form linear probe (probe_r2)

    t = c.train
    t.batch_size = 512                     # 64 per GPU x 8 GPUs
    t.num_steps = 200_000
    t.lr = 1e-4
    t.schedule = "constant"                # the reference passes no scheduler to AdamW
    t.warmup_steps = 0
    t.weight_decay = 1e-2
    t.grad_clip = 0.1
    t.compute_dtype = "bfloat16"
    t.frozen = (r"^dino_encoder/", r"^text_encoder/")
    t.reverse_pair_prob = 0.0              # time-reversal augmentation of training pairs (not in the reference)
    t.log_every = 100
    t.eval_every = 5000
    t.save_every = 5000

    if variant == "tiny":
        c.data.normalize_instructions = False
        c.data.pair_spacing = "seconds"    # pair_seconds at the demo's control rate
        c.data.mixture = "demo"
        # 32 x 16 pairs: the ridge probe fits ~64 token features, so on 4 batches (~30 robot pairs per half) it
        # overfits and scores below 0 (-0.25 on make demo's GIDM); on 32 the same checkpoint scores 0.17 (0.29
        # from the continuous latents), ~20 s of evaluation on a CPU
        c.eval.batches = 32
        t.batch_size = 16
        t.num_steps = 300
        t.lr = 1e-3
        t.schedule = "warmup_cosine"
        t.warmup_steps = 20
        t.grad_clip = 1.0
        t.compute_dtype = "float32"
        t.frozen = ()
        t.reverse_pair_prob = 0.5          # scripted demos: makes the motion direction need the latent
        t.log_every = 25
        t.eval_every = 0
        t.save_every = 300
    c.data.resolution = c.model.image_size
    return c
