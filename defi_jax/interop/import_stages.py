"""Published PyTorch weights -> a defi-jax stage workdir at step 0 (``python -m launch.import_torch``).

    config = import_gfdm("/ckpt/stable-video-diffusion-img2vid", "/ckpt/gfdm")        # diffusers SVD folder
    config = import_gidm("/ckpt/defi/stage2/last.ckpt", "/ckpt/gidm")                 # the reference's stage 2
    config, note = import_export("/tmp/defi_torch", "/ckpt/policy")                   # launch.export_torch's folder

Every importer only builds a config whose ``config.init`` names the sources (``defi_jax.weights``: the files are
read once on the host, streamed, each safetensors tensor read when its parameter is placed into its sharding;
every missing or mis-shaped tensor named with both shapes) and hands it to :func:`write_workdir`, which the
reference stage-3 import (``defi_policy.import_policy_workdir``) shares: it refuses a workdir that holds
checkpoints, runs ``Trainer.init_params`` (the sources fill the parameters, donated into place: no second copy)
and writes a params-only ``checkpoints/0`` (``params``, ``frozen``, ``extra``: the weights once, no optimizer
moments, which published weights do not have and a fresh optimizer starts at zero anyway), ``config.json`` and
the stage's ``assets/``; ``launch.train`` with the same config continues from step 0 (``StateLayout.restore``:
fresh optimizer state, EMA = params). Host memory peaks near the weights (1.14x on the full 1.7B-parameter
GFDM: ``launch.benchmark export --gfdm_full``, row ``gfdm_import_workdir``).

Sizes: what the weights fix is read off the files (``config.json`` of the diffusers / transformers folders,
``defi_torch.infer_gidm_config`` on the stage-2 tensors, the export's ``config.json``); the rest (heads,
frames, schedules, data) comes from the base config.

``import_export`` reads back each stage that ``defi_jax.export_torch`` writes (its top ``config.json`` names
the stage): ``gfdm/`` (diffusers UNet / VAE + transformers CLIP text; the top ``config.json`` holds the run's
``config.model``), ``gidm/`` (``config.json`` = the GIDM's
``config.model``, ``model.safetensors`` in the reference's stage-2 names) and a policy folder (``policy/`` +
``gidm/`` = the reference's stage-3 names, read by the ``torch_export`` kind through :func:`policy_export_key`;
``text_encoder/`` the goal tower; ``gfdm/``; ``action_stats.json``). JAX -> torch -> JAX is bitwise in float32.
A ``bfloat16`` export is imported too (each weight widened exactly to float32), with a note that the result
equals the exported bfloat16 weights, not the float32 ones they were rounded from.
"""

from __future__ import annotations

import dataclasses
import json

from defi_jax.interop._convert import Rule, torch_key

EXPORT_PARTS = r"^(?=(video_former|head|latent_actions)/)"   # torch_export fills these (full paths: a lookahead)


# ---------------------------------------------------------------------------------------------------
# The shared writer
# ---------------------------------------------------------------------------------------------------

def require_fresh(workdir: str) -> None:
    """Raises ``FileExistsError`` when ``workdir`` already holds a checkpoint (an import never overwrites a run)."""
    from defi_jax import paths
    from defi_jax.checkpoint import Checkpointer

    if not paths.isdir(paths.join(workdir, "checkpoints")):
        return
    probe = Checkpointer(workdir, read_only=True)
    try:
        step = probe.latest_step()
    finally:
        probe.close()
    if step is not None:
        raise FileExistsError(f"{workdir} already holds checkpoints (step {step}): import into a fresh workdir")


def write_workdir(config, workdir: str, *, assets: dict[str, str] | None = None, mesh=None) -> None:
    """Writes the stage workdir of ``config`` at step 0: a params-only ``checkpoints/0`` (``Trainer.init_params``:
    the ``config.init`` sources fill the parameters), ``config.json`` and ``assets/`` (``assets``, default the
    stage's own ``assets(config)``). Refuses a workdir that holds checkpoints."""
    from defi_jax import paths, trainer
    from defi_jax import stage as stage_lib
    from defi_jax.checkpoint import Checkpointer

    workdir = paths.abspath(workdir)
    require_fresh(workdir)
    parts = trainer.Trainer(config, mesh=mesh).init_params()
    config_json = config.to_json_best_effort(sort_keys=True)
    ckpt = Checkpointer(workdir, async_save=False, ocdbt=False)   # (no OCDBT: nothing buffered until the commit)
    try:
        ckpt.save(0, parts, None, config_json)
        ckpt.wait()
    finally:
        ckpt.close()
    del parts
    paths.write_text(paths.join(workdir, "config.json"), config_json)
    if assets is None:
        stage = stage_lib.get(config.stage)
        assets = dict(stage.assets(config)) if stage.assets is not None else {}
    for name, text in assets.items():
        paths.write_text(paths.join(workdir, "assets", name), text)


def _base(config, spec: str):
    if config is None:
        import importlib
        module, variant = spec.split(":")
        config = importlib.import_module(f"configs.{module}").get_config(variant)
    return config.copy_and_resolve_references()


def _json(path: str, what: str) -> dict:
    from defi_jax import paths

    if not paths.exists(path) or paths.isdir(path):
        raise FileNotFoundError(f"{path} not found: expected {what}")
    try:
        return json.loads(paths.read_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None


def _sizes(cls, full, base) -> dict:
    """``full`` (a network config dataclass) as a config dict: the base's keys, plus those off the defaults."""
    full, defaults, base = dataclasses.asdict(full), dataclasses.asdict(cls()), dict(base)
    return {k: v for k, v in full.items() if k in base or v != defaults.get(k)}


# ---------------------------------------------------------------------------------------------------
# GFDM: a diffusers SVD folder
# ---------------------------------------------------------------------------------------------------

def gfdm_sizes(model, unet: str, vae: str, text: str = "") -> None:
    """Sets ``model.unet`` / ``model.vae`` (/ ``model.text_encoder``) of a GFDM ``config.model`` from the
    ``config.json`` of the diffusers UNet / VAE folders (and of the transformers CLIP text folder)."""
    from defi_jax import paths
    from defi_jax.interop import hf_clip
    from defi_jax.models.clip_text import CLIPTextConfig
    from defi_jax.models.svd_unet import UNetConfig
    from defi_jax.models.svd_vae import VAEConfig

    for key, folder, cls, name in (("unet", unet, UNetConfig, "UNetSpatioTemporalConditionModel"),
                                   ("vae", vae, VAEConfig, "AutoencoderKLTemporalDecoder")):
        file = paths.join(folder, "config.json")
        cfg = _json(file, f"a diffusers {name} folder")
        if cfg.get("_class_name") not in (None, name):
            raise ValueError(f"{file}: _class_name is {cfg['_class_name']!r}, expected {name!r}")
        try:
            model[key] = _sizes(cls, cls.from_dict(cfg), model[key])
        except (TypeError, ValueError) as e:
            raise ValueError(f"{file}: {e}") from None
    if text:
        file = paths.join(text, "config.json")
        cfg = hf_clip.config_from_hf(_json(file, "a transformers CLIP text folder"), file)
        model.text_encoder = _sizes(CLIPTextConfig, cfg, model.text_encoder)


def import_gfdm(src: str, workdir: str, config=None, *, mesh=None):
    """A GFDM workdir from a diffusers SVD folder (``unet/``, ``vae/``; the CLIP text tower from
    ``text_encoder/`` when the folder has one, else ``config.init.sources.text_encoder`` / ``clip_path``);
    ``config`` default ``configs/gfdm.py:svd``. Returns the config written."""
    from defi_jax import paths, weights

    src, workdir = paths.abspath(src), paths.abspath(workdir)
    require_fresh(workdir)
    config = _base(config, "gfdm:svd")
    if config.get("stage") != "gfdm":
        raise ValueError(f"config.stage={config.get('stage')!r}: a diffusers SVD folder imports into a GFDM config")
    unet, vae, text = (paths.join(src, sub) for sub in ("unet", "vae", "text_encoder"))
    s = config.init.sources
    if paths.isdir(text):
        s.text_encoder.path = text
    else:
        text = next((a.path for a in weights.active_sources(config) if a.name == "text_encoder"), "")
        text = text if text and paths.isdir(text) else ""
    gfdm_sizes(config.model, unet, vae, text)
    s.unet.path, s.vae.path = unet, vae
    write_workdir(config, workdir, mesh=mesh)
    return config


# ---------------------------------------------------------------------------------------------------
# GIDM: the reference's stage-2 checkpoint
# ---------------------------------------------------------------------------------------------------

_TOWERS = (("dinov2", "dino_encoder", "visual_encoder", "dinov2", "torch_hub_dinov2"),
           ("t5", "text_encoder", "text_encoder", "t5", "hf_t5_encoder"))


def import_gidm(src: str, workdir: str, config=None, *, mesh=None, reference: bool = True):
    """A GIDM workdir from the reference's stage-2 checkpoint (``.ckpt`` / ``.pt`` / ``.safetensors``, with or
    without ``lam.``); ``config`` default ``configs/gidm.py:defi``, sizes read off the tensors
    (``defi_torch.infer_gidm_config``; heads and the DINOv2 / T5 sizes come from ``config``). The file's frozen
    towers (``dino_encoder.*`` torch-hub names, ``text_encoder.*`` T5 names) fill the model's; a file without
    them leaves ``config.init.sources.dinov2`` / ``t5`` as configured. Strict: a tensor no parameter reads is an
    error (as are missing and mis-shaped ones, named with both shapes). ``reference``: also turn on
    ``model.reference_mask_order`` (the reference's language-mask quirk), as ``defi_torch.load_gidm`` does."""
    from defi_jax import paths, weights
    from defi_jax.interop import defi_torch

    src, workdir = paths.abspath(src), paths.abspath(workdir)
    require_fresh(workdir)
    config = _base(config, "gidm:defi")
    if config.get("stage") != "gidm":
        raise ValueError(f"config.stage={config.get('stage')!r}: a stage-2 checkpoint imports into a GIDM config")
    with weights.local_file(src) as local:   # a gs:// file: a temporary local copy (torch.load, memory map)
        tensors = defi_torch.read_state_dict(local)
    config.model = defi_torch.infer_gidm_config(tensors, config.model)
    if reference:
        config.model.reference_mask_order = True
    unexpected = defi_torch.unexpected_tensors(config.model, tensors)   # missing / mis-shaped: config.init names
    if unexpected:
        raise ValueError(f"{src}: {len(unexpected)} tensor(s) that no parameter of the GIDM reads: "
                         + "; ".join(unexpected[:30]) + (" ..." if len(unexpected) > 30 else ""))
    s, excluded = config.init.sources, []
    for name, sub, key, kind, source_kind in _TOWERS:
        if config.model[key] != kind:
            continue   # a trainable (tiny) tower: in the file under the GIDM's own names
        excluded.append(sub)
        if any(k.startswith(sub + ".") for k in tensors):
            s[name] = weights.source(f"^{sub}/", source_kind, src, prefix=sub + ".")
    del tensors
    target = f"^(?!({'|'.join(excluded)})/)" if excluded else "^"
    with s.unlocked():
        s.reference = weights.source(target, "reference_gidm", src)
    write_workdir(config, workdir, mesh=mesh)
    return config


# ---------------------------------------------------------------------------------------------------
# Our own export folders
# ---------------------------------------------------------------------------------------------------

_BYTES_TEXT = Rule(r"^embed\.embedding$", "embed.weight")   # the tiny GIDM's byte embedding (nn.Embedding)


def policy_export_key(path: str, ndim: int) -> tuple[str, tuple[int, ...] | None]:
    """Our policy parameter path (dotted) -> (its name in an export's ``policy/`` + ``gidm/`` tensors, transpose):
    the reference's stage-3 names, by ``defi_policy``'s tables per network."""
    from defi_jax.interop import defi_policy, hf_t5

    parts = (("video_former.", defi_policy.VIDEO_FORMER_PREFIX, defi_policy.VIDEO_FORMER_RULES),
             ("head.", defi_policy.ACTION_HEAD_PREFIX, defi_policy.ACTION_HEAD_RULES),
             ("latent_actions.lam.text_encoder.", defi_policy.GIDM_T5_PREFIX, (_BYTES_TEXT, *hf_t5.RULES)),
             ("latent_actions.", "", defi_policy.LATENT_ACTION_RULES))
    for ours, theirs, rules in parts:
        if path.startswith(ours):
            key, perm = torch_key(path[len(ours):], ndim, rules)
            return theirs + key, perm
    return path, None


def read_policy_export(path: str) -> dict:
    """Every tensor of a policy export's ``policy/`` and ``gidm/`` ``model.safetensors`` (``Lazy``: each read when
    placed)."""
    from defi_jax import paths
    from defi_jax.interop._convert import lazy_safetensors

    out = {}
    for part in ("policy", "gidm"):
        file = paths.join(path, part, "model.safetensors")
        if not paths.exists(file):
            raise FileNotFoundError(f"{file} not found: a policy export of launch.export_torch holds policy/ and "
                                    f"gidm/ model.safetensors")
        out.update(lazy_safetensors(file))
    return out


def _export_policy_config(src: str, meta: dict, config):
    """The policy config of an export folder: its ``config.json`` and the sub-folders' sizes on ``config``."""
    from defi_jax import paths, weights
    from defi_jax.models.t5 import T5Config

    c = _base(config, "policy:defi")
    m, g = c.model, meta["gfdm"]
    gfdm_sizes(m.gfdm, *(paths.join(src, "gfdm", sub) for sub in ("unet", "vae", "text_encoder")))
    for key, value in (("num_frames", g["num_frames"]), ("text_tokens", g["text_tokens"]),
                       ("text_position_encoding", g["text_position_encoding"]), ("feature_fps", g["fps"]),
                       ("motion_bucket_id", g["motion_bucket_id"]), ("feature_steps", g["feature_steps"]),
                       ("feature_up_blocks", g["feature_up_blocks"])):
        m.gfdm[key] = value
    from defi_jax.interop import hf_clip
    goal = paths.join(src, "text_encoder", "config.json")
    m.goal_text = dataclasses.asdict(hf_clip.config_from_hf(_json(goal, "the goal CLIP text folder"), goal))
    m.video_former, m.head = meta["video_former"], meta["head"]
    m.action_dim, m.horizon, m.num_views = meta["action_dim"], meta["horizon"], meta["num_views"]
    m.latent_action_frames = tuple(meta["latent_action_frames"])
    m.gfdm_steps, m.sample_steps, m.sample_sigma_min = meta["gfdm_steps"], meta["sample_steps"], \
        meta["sample_sigma_min"]
    gidm = dict(meta["gidm"])
    t5 = gidm.pop("t5", None)
    gidm.pop("bytes_vocab_size", None)
    for key, value in gidm.items():
        m.gidm[key] = value
    if t5 is not None:
        known = {f.name for f in dataclasses.fields(T5Config)}
        m.gidm.t5 = {k: v for k, v in t5.items() if k in known}
    clip, _, gidm_tok = meta["tokenizers"]
    if clip.get("path"):
        c.init.tokenizer_path = paths.join(src, clip["path"])
    if gidm_tok.get("path"):
        m.gidm.tokenizer_path = paths.join(src, gidm_tok["path"])
    c.data.views, c.data.resolution = tuple(meta["views"]), meta["resolution"]
    c.data.action_horizon = meta["horizon"]
    c.data.normalize_actions = bool(meta["action_stats"].get("normalized", False))
    c.policy.pretrain_missing = False
    s = c.init.sources
    s.gfdm.path = s.gidm.path = ""
    s.svd_unet.path, s.svd_vae.path, s.svd_clip.path = (paths.join(src, "gfdm", sub)
                                                        for sub in ("unet", "vae", "text_encoder"))
    s.goal_text.path = paths.join(src, "text_encoder")
    with s.unlocked():
        s.export = weights.source(EXPORT_PARTS, "torch_export", src)
    return c


def export_stage(src: str) -> str:
    """The stage an export folder holds (its ``config.json``'s ``stage``); errors name the file."""
    from defi_jax import paths

    file = paths.join(paths.abspath(src), "config.json")
    stage = _json(file, "an export folder of launch.export_torch (its config.json)").get("stage")
    if stage not in ("policy", "gfdm", "gidm"):
        raise ValueError(f"{file}: stage {stage!r} is not policy, gfdm or gidm: not an export of launch.export_torch")
    return stage


def import_export(src: str, workdir: str, config=None, *, mesh=None) -> tuple:
    """A workdir of the stage an export folder of ``launch.export_torch`` holds; returns ``(config, note)``.

    ``config``: the base the folder's sizes go on (default ``configs/<stage>.py``'s full-size variant: gfdm:svd,
    gidm:defi, policy:defi). A GFDM export's ``config.json`` records the run's ``config.model``, which replaces
    the base's (and ``data.num_frames`` follows its frames); an older export without it holds only the networks'
    sizes, so pass the GFDM config it came from (frames, text tokens). ``note``: "" for a float32 export; for a
    bfloat16 one, that the import is exact to the bfloat16 weights, not bitwise to the float32 weights they were
    exported from.
    """
    import ml_collections

    from defi_jax import paths

    src, workdir = paths.abspath(src), paths.abspath(workdir)
    stage = export_stage(src)
    meta = _json(paths.join(src, "config.json"), "")
    dtype = meta.get("dtype", "float32")
    note = "" if dtype == "float32" else (
        f"{src} holds {dtype} weights: the workdir holds them widened to float32 exactly, which is not bitwise "
        f"the float32 weights they were exported from (export with --dtype=float32 for a bitwise round trip)")
    require_fresh(workdir)
    if stage == "gfdm":
        config = _base(config, "gfdm:svd")
        if "model" in meta:   # the run's config.model (exports that record it): the same model, nothing guessed
            config.model = ml_collections.ConfigDict(meta["model"])
            if config.data.get("source", "frames") == "frames":
                config.data.num_frames = int(config.model.num_frames) - 1   # the future frames it predicts
        return import_gfdm(paths.join(src, "gfdm"), workdir, config, mesh=mesh), note
    if stage == "gidm":
        config = _base(config, "gidm:defi")
        config.model = ml_collections.ConfigDict(
            _json(paths.join(src, "gidm", "config.json"), "the GIDM's config.model of the export"))
        config.data.resolution = int(config.model.image_size)   # the frames the exported encoder reads
        return import_gidm(paths.join(src, "gidm", "model.safetensors"), workdir, config, mesh=mesh,
                           reference=False), note
    config = _export_policy_config(src, meta, config)
    stats = paths.join(src, "action_stats.json")
    _json(stats, "the policy's action statistics")
    assets = {"action_stats.json": paths.read_text(stats)}
    write_workdir(config, workdir, assets=assets, mesh=mesh)
    return config, note
