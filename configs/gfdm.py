"""GFDM pretraining (DeFI stage 1): Stable Video Diffusion + CLIP text, EDM v-prediction.

    python -m launch.train --config=configs/gfdm.py:tiny --workdir=/tmp/gfdm      # minutes on a CPU, demo data
    python -m launch.train --config=configs/gfdm.py:svd --workdir=gs://.../gfdm \\
        --config.init.svd_path=/ckpt/stable-video-diffusion-img2vid \\
        --config.init.clip_path=/ckpt/clip-vit-base-patch32 --config.data.mixture=gfdm_released \\
        --config.data.data_dir=/data/oxe

Variants:
  ``svd``   the full model (UNet 1,524,623,082 + VAE 97,742,847 + CLIP text 63,165,952 parameters),
            256 x 256, 16 frames, the released recipe: AdamW lr 5e-6, weight decay 0, global batch 48
            (6 x 8 GPUs), VAE and text encoder frozen; bfloat16 compute (the reference used fp16 autocast;
            ``--config.train.compute_dtype=float32`` for full precision).
  ``tiny``  a small random model on 32 x 32 frames, 4 frames, for tests and the demo (embedded demo data
            when ``config.data.data_dir`` is empty; the byte tokenizer since no CLIP vocabulary ships).
Precomputed latents (the released recipe's input): ``python -m launch.precompute_latents
--config=configs/gfdm.py:VARIANT --out=DIR`` then ``--config.data.source=latents --config.data.latents_dir=DIR``.
"""

import ml_collections

from configs.base import get_base_config
from defi_jax import weights
from data_pipelines.config import default_data_config


def _svd_unet() -> dict:
    # diffusers UNetSpatioTemporalConditionModel defaults (stable-video-diffusion-img2vid's unet/config.json).
    return dict(
        sample_size=96, in_channels=8, out_channels=4,
        down_block_types=("CrossAttnDownBlockSpatioTemporal",) * 3 + ("DownBlockSpatioTemporal",),
        up_block_types=("UpBlockSpatioTemporal",) + ("CrossAttnUpBlockSpatioTemporal",) * 3,
        block_out_channels=(320, 640, 1280, 1280), addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=768, layers_per_block=2, cross_attention_dim=1024,
        transformer_layers_per_block=1, num_attention_heads=(5, 10, 20, 20), num_frames=14)


def _svd_vae() -> dict:
    # diffusers AutoencoderKLTemporalDecoder (stable-video-diffusion-img2vid's vae/config.json).
    return dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                sample_size=768, scaling_factor=0.18215, force_upcast=True)


def _clip_text() -> dict:
    # openai/clip-vit-base-patch32's text tower.
    return dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, projection_dim=512,
                num_hidden_layers=12, num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu",
                layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=49406, eos_token_id=49407)


def get_config(arg: str | None = None):
    variant = arg or "tiny"
    c = get_base_config()
    c.stage = "gfdm"

    m = c.model
    m.unet = _svd_unet()
    m.vae = _svd_vae()
    m.text_encoder = _clip_text()
    m.num_frames = 16                  # predicted frames, the current one included (as the reference)
    m.text_tokens = 20
    m.text_position_encoding = False
    m.text_drop_prob = 0.05
    m.fps = 7
    m.motion_bucket_id = 127
    m.noise_aug_log_mean = -3.0
    m.noise_aug_log_std = 0.5
    m.p_mean = 0.7
    m.p_std = 1.6
    m.feature_fps = 4
    m.feature_steps = 20
    m.feature_up_blocks = 2
    m.sample_steps = 30                # Euler steps of sampled videos (evaluation)
    m.guidance_min = 1.0
    m.guidance_max = 7.5
    m.sample_noise_aug = 0.02
    m.decode_chunk_size = 7
    m.remat = True                     # per-block rematerialization in the UNet (gradient checkpointing)
    m.attention_impl = ml_collections.FieldReference(None, field_type=str)  # None = XLA; "cudnn" on GPU

    # Published weights (defi_jax/weights.py). svd_path / clip_path fill the sources below whose own path
    # is empty: <svd_path>/unet, <svd_path>/vae, clip_path; a source's path can also be set on its own.
    c.init.svd_path = ""               # diffusers SVD folder (unet/, vae/)
    c.init.clip_path = ""              # transformers CLIP folder: text tower weights + tokenizer vocabulary
    c.init.tokenizer_path = ""         # overrides the tokenizer folder (defaults to clip_path)
    c.init.sources.unet = weights.source("^unet/", "diffusers_unet")
    c.init.sources.vae = weights.source("^vae/", "diffusers_vae")
    c.init.sources.text_encoder = weights.source("^text_encoder/", "hf_clip_text")

    c.data = default_data_config()
    c.data.source = "frames"           # frames | latents
    c.data.latents_dir = ""
    # A preset name (gfdm_released, gfdm_paper, ...) or "name:w,name:w"; config validation checks every name.
    c.data.mixture = "gfdm_released"
    c.data.resolution = 256
    c.data.num_frames = 15             # future frames after the current one: 16 predicted in all

    c.eval = ml_collections.ConfigDict()
    c.eval.batches = 4                 # validation-loss batches
    c.eval.num_videos = 4              # clips sampled (model.sample_steps), scored (PSNR / SSIM), in a GIF
    c.eval.gif_fps = 4

    t = c.train
    t.batch_size = 48
    t.lr = 5e-6
    t.schedule = "constant"
    t.warmup_steps = 0
    t.weight_decay = 0.0
    t.grad_clip = 1.0
    t.frozen = (r"^vae/", r"^text_encoder/")
    t.ema_decay = 0.0
    # The trainer's remat wraps the whole loss, which does not lower the peak: without per-block remat the
    # full step measured ~196 GiB per device on 8 fake CPU devices (batch 6 per device, float32). The UNet
    # therefore recomputes each res-block / transformer in the backward pass (diffusers' gradient
    # checkpointing), ``model.remat``.
    t.remat_policy = "none"
    t.num_steps = 500_000
    t.log_every = 100
    t.eval_every = 50_000
    t.save_every = 5_000

    if variant == "tiny":
        m.remat = False
        # Three UNet levels (SVD has four): the same block kinds, a third of the compile time on a CPU.
        m.unet = dict(
            sample_size=16, in_channels=8, out_channels=4,
            down_block_types=("CrossAttnDownBlockSpatioTemporal",) * 2 + ("DownBlockSpatioTemporal",),
            up_block_types=("UpBlockSpatioTemporal",) + ("CrossAttnUpBlockSpatioTemporal",) * 2,
            block_out_channels=(32, 64, 64), addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=24, layers_per_block=1, cross_attention_dim=64,
            transformer_layers_per_block=1, num_attention_heads=(2, 4, 4), num_frames=4)
        # Two VAE levels: 32 px frames -> 16 x 16 latents, so the UNet's four levels still fit. With a VAE trained
        # by configs/vae.py:tiny, set scaling_factor to 1 / its eval_latent_std (unit-scale latents for the EDM's
        # sigma_data = 1; launch.demo does).
        m.vae = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                     block_out_channels=(32, 32), layers_per_block=1, latent_channels=4, sample_size=32,
                     scaling_factor=0.18215, force_upcast=True)
        m.text_encoder = dict(vocab_size=260, hidden_size=32, intermediate_size=64, projection_dim=32,
                              num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=32,
                              hidden_act="quick_gelu", layer_norm_eps=1e-5, pad_token_id=2, bos_token_id=1,
                              eos_token_id=2)
        m.num_frames = 4
        m.sample_steps = 8
        # The tiny VAE comes from a configs/vae.py:tiny workdir (the demo's WORKDIR/vae): its parameters are this
        # model's vae/ sub-tree. With no path set (tests) it starts random, and so does the text encoder always:
        # no weights ship for it.
        c.init.sources.vae_workdir = weights.source("^vae/", "workdir")
        c.init.allow_random = True
        m.decode_chunk_size = 0
        c.data.mixture = "demo"
        c.data.data_dir = ""
        c.data.resolution = 32
        c.data.num_frames = 3
        c.data.views = ("primary",)
        c.eval.batches = 2
        c.eval.num_videos = 4
        t.batch_size = 8
        t.lr = 1e-3
        t.schedule = "warmup_cosine"
        t.warmup_steps = 5
        t.end_lr_factor = 0.1
        t.remat_policy = "none"
        t.compiler_options = {"xla_backend_optimization_level": 0}  # CPU: compiles dominate a tiny run
        t.num_steps = 60
        t.log_every = 10
        t.eval_every = 0
        t.save_every = 30
    elif variant == "svd":
        t.compute_dtype = "bfloat16"   # mixed precision, as the reference's fp16 autocast; float32 master weights
    else:
        raise ValueError(f"configs/gfdm.py: unknown variant {variant!r} (tiny | svd)")
    return c
