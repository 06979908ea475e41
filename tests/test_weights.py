"""config.init: stages start from diffusers / transformers / torch-hub / workdir weights, read on the host.

Each check builds its source with the library that publishes it (diffusers, transformers) from random
weights, points a config at it and initialises through the real trainer: the state holds exactly those
weights, the compiled init takes them as arguments (no weight constant), and errors name the key / tensors.
"""

import re

import jax
import numpy as np
import pytest
import torch

import defi_jax  # noqa: F401
from configs import gfdm as gfdm_configs, gidm as gidm_configs
from defi_jax import config_validation, trainer as trainer_lib, weights


def _flat(tree):
    return {jax.tree_util.keystr(p): np.asarray(jax.device_get(x))
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _assert_bitwise(got_tree, want_module):
    from flax import nnx
    got, want = _flat(got_tree), _flat(nnx.to_pure_dict(nnx.state(want_module, nnx.Param)))
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def _largest_constant(hlo_text: str) -> int:
    """Bytes of the largest dense array constant spelled in a lowered program (hex blobs and lists)."""
    blobs = [len(b) // 2 for b in re.findall(r'dense<"0x([0-9A-Fa-f]+)">', hlo_text)]
    lists = [m.count(",") * 4 for m in re.findall(r"dense<\[([^>]*)\]>", hlo_text)]
    return max(blobs + lists + [0])


# ------------------------------------------------------------------------------------------ GFDM

def _write_svd_and_clip(config, root):
    import diffusers
    import transformers

    torch.manual_seed(0)
    m = config.model
    diffusers.UNetSpatioTemporalConditionModel(**dict(m.unet)).save_pretrained(root / "svd" / "unet")
    diffusers.AutoencoderKLTemporalDecoder(**dict(m.vae)).save_pretrained(root / "svd" / "vae")
    t = dict(m.text_encoder)
    t.pop("projection_dim", None)
    transformers.CLIPTextModel(transformers.CLIPTextConfig(**t)).save_pretrained(root / "clip")


def test_gfdm_starts_from_diffusers_and_transformers_folders(tmp_path, tiny_config, make_mesh):
    from defi_jax.interop import diffusers_svd, hf_clip

    config = tiny_config("gfdm")
    config.init.allow_random = False
    _write_svd_and_clip(config, tmp_path)
    config.init.svd_path = str(tmp_path / "svd")
    config.init.clip_path = str(tmp_path / "clip")
    tr = trainer_lib.Trainer(config, mesh=make_mesh((1, 8, 1)))

    # The init program takes the weights as arguments and spells none of them as a constant.
    lowered = tr.lower_init()
    loaded_bytes = sum(int(np.prod(s.shape)) * 4 for s in tr.layout.abstract_params().values())
    assert len(jax.tree.leaves(lowered.args_info)) == len(tr.layout.abstract_params())  # every param is loaded
    assert _largest_constant(lowered.as_text()) < 1024 < loaded_bytes

    state = tr.init_state()
    _assert_bitwise(state.params["unet"], diffusers_svd.load_unet(str(tmp_path / "svd" / "unet")))
    _assert_bitwise(state.frozen["vae"], diffusers_svd.load_vae(str(tmp_path / "svd" / "vae")))
    _assert_bitwise(state.frozen["text_encoder"], hf_clip.load_text_encoder(str(tmp_path / "clip")))
    kernel = state.params["unet"]["conv_in"]["kernel"]
    assert kernel.sharding == tr.state_shardings.params["unet"]["conv_in"]["kernel"]


def test_gfdm_frozen_towers_need_a_source():
    config = gfdm_configs.get_config("svd")
    with pytest.raises(config_validation.ConfigError,
                       match=r"config.init.sources.text_encoder.path is empty \(and config.init.clip_path\)"):
        config_validation.validate(config, num_devices=8)
    config.init.clip_path = "/ckpt/clip"
    with pytest.raises(config_validation.ConfigError, match=r"config.init.sources.vae.path.*config.init.svd_path"):
        config_validation.validate(config, num_devices=8)
    config.init.sources.vae.path = "/ckpt/svd/vae"   # the UNet is trained: random is allowed (not advised)
    config_validation.validate(config, num_devices=8)
    config = gfdm_configs.get_config("svd")
    config.init.allow_random = True
    config_validation.validate(config, num_devices=8)


# ------------------------------------------------------------------------------------------ GIDM

DINO = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=28, patch_size=14,
            num_register_tokens=4)
T5 = dict(vocab_size=64, d_model=24, d_kv=8, d_ff=40, num_layers=2, num_heads=3,
          relative_attention_num_buckets=8, relative_attention_max_distance=16)


def _small_defi_config(fast_compile):
    """``configs/gidm.py:defi`` in shape (frozen DINOv2-with-registers + T5 encoder), tiny widths."""
    c = gidm_configs.get_config("defi")
    m = c.model
    m.dino, m.t5 = dict(DINO), dict(T5)
    m.feature_dim, m.text_dim = DINO["hidden_size"], T5["d_model"]
    m.model_dim, m.latent_dim, m.num_latents = 16, 8, 4
    m.enc_blocks = m.dec_blocks = 1
    m.num_heads = 2
    m.patch_size, m.image_size, m.max_text_len = 14, 28, 8
    c.data.resolution = 28
    c.train.batch_size = 8
    c.train.compute_dtype = "float32"
    c.train.compiler_options = fast_compile
    return c


def _write_dino_and_t5(root):
    import transformers

    torch.manual_seed(1)
    dino = transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(**DINO))
    with torch.no_grad():  # non-trivial registers and layer scales
        for name, p in dino.named_parameters():
            if "register_tokens" in name or "lambda1" in name:
                p.copy_(torch.randn_like(p))
    dino.save_pretrained(root / "dino")
    transformers.T5EncoderModel(transformers.T5Config(**T5)).save_pretrained(root / "t5")
    return str(root / "dino"), str(root / "t5")


def test_gidm_loads_dinov2_and_t5_and_refuses_random_frozen_towers(tmp_path, make_mesh, fast_compile):
    from safetensors.numpy import save_file

    from defi_jax.interop import hf_dinov2, hf_t5

    c = _small_defi_config(fast_compile)
    with pytest.raises(config_validation.ConfigError, match=r"config.init.sources.dinov2.path is empty.*"
                       r"dino_encoder/\* is frozen.*config.init.allow_random=True"):
        config_validation.validate(c)
    dino_dir, t5_dir = _write_dino_and_t5(tmp_path)
    c.init.sources.dinov2.path = dino_dir
    with pytest.raises(config_validation.ConfigError, match="config.init.sources.t5.path is empty"):
        config_validation.validate(c)
    c.init.sources.t5.path = t5_dir

    tr = trainer_lib.Trainer(c, mesh=make_mesh((2, 4, 1)))
    state = tr.init_state()
    dino, t5 = hf_dinov2.load(dino_dir), hf_t5.load_encoder(t5_dir)
    _assert_bitwise(state.frozen["dino_encoder"], dino)
    _assert_bitwise(state.frozen["text_encoder"], t5)
    assert set(state.frozen) == {"dino_encoder", "text_encoder"}

    # The torch-hub file the reference loads gives the same tower.
    hub = tmp_path / "dinov2_hub.safetensors"
    save_file({k: np.ascontiguousarray(v) for k, v in hf_dinov2.to_torch_hub_state_dict(dino).items()}, str(hub))
    c.init.sources.dinov2.kind, c.init.sources.dinov2.path = "torch_hub_dinov2", str(hub)
    from_hub = weights.load_init_params(c, tr.layout.abstract_params())
    want = {"dino_encoder/" + "/".join(str(k.key) for k in p): np.asarray(x)
            for p, x in jax.tree_util.tree_flatten_with_path(jax.device_get(state.frozen["dino_encoder"]))[0]}
    got = {k: v for k, v in from_hub.items() if k.startswith("dino_encoder/")}
    assert got.keys() == want.keys()
    for path, arr in got.items():
        np.testing.assert_array_equal(np.asarray(arr), want[path], err_msg=path)
    # (the T5 weights of the same read are in their sharding, not on one device)
    t5_emb = from_hub["text_encoder/shared"]
    assert t5_emb.sharding == tr.state_shardings.frozen["text_encoder"]["shared"]


def test_mismatched_sources_fail_naming_every_tensor_with_both_shapes(tmp_path, make_mesh, fast_compile,
                                                                    error_message):
    import transformers

    c = _small_defi_config(fast_compile)
    layout = trainer_lib.StateLayout(c, mesh=make_mesh((1, 8, 1)))
    wide = dict(DINO, mlp_ratio=3)  # every fc1 / fc2 of both layers has the wrong width
    transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(**wide)).save_pretrained(
        tmp_path / "dino")
    from safetensors.numpy import load_file, save_file
    file = str(tmp_path / "dino" / "model.safetensors")
    tensors = load_file(file)
    del tensors[next(k for k in tensors if k.endswith("embeddings.cls_token"))]
    save_file(tensors, file)
    c.init.sources.dinov2.path = str(tmp_path / "dino")
    c.init.sources.t5.path = str(tmp_path / "no_t5")
    with pytest.raises(FileNotFoundError, match=r"config.init.sources.t5.path='.*no_t5' \(hf_t5_encoder\)"):
        weights.load_init_params(c, layout.abstract_params())
    c.init.sources.t5.path = ""
    msg = error_message(weights.load_init_params, c, layout.abstract_params(), exc=ValueError)
    assert msg.count("mis-shaped") == 6, msg   # 2 layers x (fc1 weight, fc1 bias, fc2 weight), all listed
    assert "missing embeddings.cls_token (ours: dino_encoder/cls_token (1, 1, 32))" in msg
    assert "encoder.layer.1.mlp.fc2.weight: file (32, 96), expected (32, 64) (ours: " \
           "dino_encoder/layers/1/mlp/fc2/kernel (64, 32))" in msg


def test_sources_on_an_object_store_read_as_the_local_ones(tmp_path, make_mesh, fast_compile, monkeypatch):
    """``gs://`` folders and files go through ``defi_jax.paths`` (config.json, listings, a ranged read per
    safetensors tensor; a torch-hub ``.pth`` through a temporary local copy): the same weights as the local paths,
    bitwise. ``gs://bucket/`` is served from ``tmp_path`` under epath (as tf.io.gfile / gcsfs would serve it), so an
    ``os.path`` / ``open`` left on a URI finds nothing."""
    import os

    from etils import epath
    from flax import nnx

    from defi_jax.interop import hf_dinov2, import_stages

    c = _small_defi_config(fast_compile)
    abstract = trainer_lib.StateLayout(c, mesh=make_mesh((1, 8, 1))).abstract_params()
    dino_dir, t5_dir = _write_dino_and_t5(tmp_path)
    dino = hf_dinov2.load(dino_dir)
    hub = hf_dinov2.to_torch_hub_state_dict(dino)
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in hub.items()}, tmp_path / "dinov2_hub.pth")
    c.init.sources.dinov2.path, c.init.sources.t5.path = dino_dir, t5_dir
    local = {k: np.asarray(v) for k, v in weights.load_init_params(c, abstract).items()}
    assert {k.split("/")[0] for k in local} == {"dino_encoder", "text_encoder"}

    served = []
    real = epath.Path

    def bucket(path, *parts):
        path = os.fspath(path)
        if path.startswith("gs://bucket/"):
            served.append(path)
            path = str(tmp_path / path[len("gs://bucket/"):])
        return real(path, *parts)

    monkeypatch.setattr(epath, "Path", bucket)
    c.init.sources.dinov2.path, c.init.sources.t5.path = "gs://bucket/dino", "gs://bucket/t5"
    remote = weights.load_init_params(c, abstract)
    assert remote.keys() == local.keys()
    for k, v in remote.items():
        np.testing.assert_array_equal(np.asarray(v), local[k], err_msg=k)
    assert "gs://bucket/t5/model.safetensors" in served

    c.init.sources.dinov2.kind, c.init.sources.dinov2.path = "torch_hub_dinov2", "gs://bucket/dinov2_hub.pth"
    from_hub = weights.load_init_params(c, abstract)
    for k, v in from_hub.items():
        np.testing.assert_array_equal(np.asarray(v), local[k], err_msg=k)

    # The interop loaders' transformers folders (config.json + model.safetensors), and launch.import_torch's reads.
    _assert_bitwise(nnx.to_pure_dict(nnx.state(hf_dinov2.load("gs://bucket/dino"), nnx.Param)), dino)
    with pytest.raises(FileNotFoundError, match=r"gs://bucket/no_export/config.json not found: expected an export"):
        import_stages.export_stage("gs://bucket/no_export")

    c.init.sources.t5.path = "gs://bucket/no_t5"
    with pytest.raises(FileNotFoundError, match=r"config.init.sources.t5.path='gs://bucket/no_t5' \(hf_t5_encoder\): "
                       r"no model.safetensors .* in gs://bucket/no_t5 \(found: folder does not exist\)"):
        weights.load_init_params(c, abstract)


# ------------------------------------------------------------------------------------------ any stage

def test_describe_and_compile_read_no_weight_file(tiny_config):
    """Shapes, memory and the AOT-compiled step need no weights: a source that does not exist is not read."""
    c = tiny_config()
    c.mesh.shape = (2, 2, 2)
    c.init.sources.enc = weights.source("^encoder/", "hf_dinov2", "/nonexistent/dinov2")
    counts = trainer_lib.param_counts(c)
    assert trainer_lib.state_bytes_per_device(c)["params"] > 0 and counts["total"] > 0
    _, stats = trainer_lib.compile_train_step(c)
    assert stats["argument"] > 0
    with pytest.raises(FileNotFoundError, match=r"config.init.sources.enc.path='/nonexistent/dinov2'"):
        trainer_lib.Trainer(c).init_state()


def test_a_stage_starts_from_another_stages_workdir(tmp_path, tiny_config, make_mesh):
    """A ``workdir`` source: the encoder from a trained run's EMA, the rest initialised as without it."""
    mesh = make_mesh((2, 2, 1))
    trained = trainer_lib.Trainer(tiny_config(num_steps=2, ema_decay=0.5), mesh=mesh).fit(str(tmp_path / "a")).state
    c = tiny_config()
    c.seed = 7
    fresh = trainer_lib.Trainer(c, mesh=mesh).init_state()
    # Our encoder/... <- the source's encoder/... (the part matched by target is replaced by prefix).
    c.init.sources.prev = weights.source("^encoder/", "workdir", str(tmp_path / "a"), prefix="encoder/", ema=True)
    state = trainer_lib.Trainer(c, mesh=mesh).init_state()
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params["encoder"]),
                 jax.device_get(trained.ema["encoder"]))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params["mlp"]),
                 jax.device_get(fresh.params["mlp"]))
    assert not np.array_equal(jax.device_get(state.params["encoder"]["conv_in"]["kernel"]),
                              jax.device_get(fresh.params["encoder"]["conv_in"]["kernel"]))
    # A prefix that is not in the source names the missing parameters.
    c.init.sources.prev.prefix = "gfdm/encoder/"
    with pytest.raises(ValueError, match=r"config.init.sources.prev.path=.*6 missing: gfdm/encoder/conv_down/bias"):
        trainer_lib.Trainer(c, mesh=mesh).init_state()
