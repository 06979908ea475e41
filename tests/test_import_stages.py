"""launch.import_torch for every stage: a diffusers SVD folder -> a GFDM workdir, the reference's stage-2
checkpoint -> a GIDM workdir, and our own export folders back into workdirs, bitwise in float32 (JAX -> torch ->
JAX); bad input names the file / tensor. Every model is tiny and random."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from _helpers import random_model, save_model
from flax import nnx

from configs import gidm as gidm_configs
from configs import policy as policy_configs
from defi_jax import checkpoint, export_torch
from defi_jax.interop import defi_torch, import_stages

STATS = {"normalized": True, "stats": {"q01": [-0.5] * 7, "q99": [0.5] * 7}}


def _assert_bitwise(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]), k


def _imported(workdir: str) -> dict:
    ckpt = checkpoint.Checkpointer(workdir, read_only=True)
    assert ckpt.latest_step() == 0
    ckpt.close()
    assert os.path.isfile(os.path.join(workdir, "config.json"))
    return checkpoint.restore_params(workdir, 0)


def _host_model(stage: str, config, seed: int):
    """``stage``'s model of ``config`` with weights drawn on the host (``_helpers.random_model``: no constant tensor
    that a swap would leave unchanged, and no random init compiled) and its other variables (the VQ's usage and
    dead-code restart shift) at a new model's zeros: an export folds that shift into the codebook."""
    model = random_model(stage, config, seed)
    for _, v in nnx.to_flat_state(nnx.state(model, nnx.Not(nnx.Param))):
        v.set_value(np.zeros_like(v.get_value()))
    return model


def _gidm_model_config():
    """configs/gidm.py:tiny with the reference's frozen towers, tiny: DINOv2 (torch-hub names in the file) and T5."""
    m = gidm_configs.model_config("tiny")
    m.update(dict(visual_encoder="dinov2", text_encoder="t5", target="features", feature_dim=24, text_dim=20,
                  model_dim=32, latent_dim=8, num_latents=6, enc_blocks=1, dec_blocks=1, num_heads=4,
                  image_size=28, patch_size=14, residual_target=False, action_to_patches=False))
    m.dino = dict(hidden_size=24, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14)
    m.t5 = dict(vocab_size=50, d_model=20, d_kv=8, d_ff=40, num_layers=1, num_heads=2)
    return m


def _gidm_config(fast_compile):
    c = gidm_configs.get_config("tiny")
    c.model = _gidm_model_config()
    c.data.resolution = c.model.image_size
    c.train.compiler_options = fast_compile
    return c


# ---------------------------------------------------------------------------------------------------
# Published PyTorch weights, and our export of the workdir made from them back (JAX -> torch -> JAX, bitwise)
# ---------------------------------------------------------------------------------------------------
# The imports write on one device: orbax saves an array sharded over the 8 fake devices slice by slice, one
# compile per slice shape (sources placed into shardings and sharded import writes: test_weights.py and
# test_checkpoint.py).

def _svd_folder(root) -> None:
    """A tiny random diffusers SVD folder with a CLIP text tower (two UNet levels, cross attention 16 = 2 x 8)."""
    import transformers

    from tests._svd_reference import torch_unet, torch_vae
    torch_unet("two_level").save_pretrained(root / "unet")
    torch_vae("two_level").save_pretrained(root / "vae")
    torch.manual_seed(0)
    transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=260, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=32, pad_token_id=2, bos_token_id=1, eos_token_id=2)).save_pretrained(
        root / "text_encoder")


def test_gfdm_from_a_diffusers_svd_folder_and_its_export_back(tmp_path, tiny_config, one_device_mesh):
    from defi_jax.interop import diffusers_svd, hf_clip

    _svd_folder(tmp_path / "svd")
    config = import_stages.import_gfdm(str(tmp_path / "svd"), str(tmp_path / "gfdm"), tiny_config("gfdm"),
                                       mesh=one_device_mesh)
    assert tuple(config.model.unet["block_out_channels"]) == (32, 64) and config.model.text_encoder["hidden_size"] == 8
    got = _imported(str(tmp_path / "gfdm"))
    want = {}
    for prefix, module in (("unet/", diffusers_svd.load_unet(str(tmp_path / "svd" / "unet"))),
                           ("vae/", diffusers_svd.load_vae(str(tmp_path / "svd" / "vae"))),
                           ("text_encoder/", hf_clip.load_text_encoder(str(tmp_path / "svd" / "text_encoder")))):
        want |= {prefix + "/".join(map(str, p)): np.asarray(v.get_value())
                 for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}
    _assert_bitwise(got, want)

    # JAX -> torch -> JAX: the export of that workdir imports back bitwise, into the same config.model (recorded in
    # the export's config.json: the base's frames, which the networks' folders cannot tell, are not used).
    export_torch.export(str(tmp_path / "gfdm"), str(tmp_path / "out"))
    meta = json.loads((tmp_path / "out" / "config.json").read_text())
    assert meta["model"] == json.loads(config.model.to_json_best_effort())
    base = tiny_config("gfdm")
    base.model.num_frames, base.data.num_frames = 6, 5
    again, note = import_stages.import_export(str(tmp_path / "out"), str(tmp_path / "again"), base,
                                              mesh=one_device_mesh)
    assert note == "" and again.stage == "gfdm" and again.data.num_frames == config.model.num_frames - 1
    assert json.loads(again.model.to_json_best_effort()) == meta["model"]
    _assert_bitwise(_imported(str(tmp_path / "again")), got)

    # An export without it (older ones): the networks' sizes from the folders, the rest from the base config.
    shutil.copytree(tmp_path / "out", tmp_path / "older")
    (tmp_path / "older" / "config.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "model"}))
    older, _ = import_stages.import_export(str(tmp_path / "older"), str(tmp_path / "from_older"), base,
                                           mesh=one_device_mesh)
    assert older.model.num_frames == 6 and older.model.unet == again.model.unet
    _assert_bitwise(_imported(str(tmp_path / "from_older")), got)


def test_streamed_reader_reads_each_tensor_when_made_and_names_a_bad_file(tmp_path):
    import ml_dtypes
    from safetensors.numpy import save_file

    from defi_jax.interop import _convert

    want = {"a.weight": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.arange(5, dtype=np.int64),
            "c": np.linspace(-2, 2, 6).astype(ml_dtypes.bfloat16).reshape(2, 3)}
    file = tmp_path / "model.safetensors"
    save_file(want, str(file))
    lazy = _convert.lazy_safetensors(str(file))
    assert all(isinstance(v, _convert.Lazy) for v in lazy.values())          # nothing read yet: the headers only
    assert {k: (v.shape, v.dtype) for k, v in lazy.items()} == {k: (v.shape, v.dtype) for k, v in want.items()}
    _assert_bitwise({k: np.asarray(v) for k, v in lazy.items()}, want)
    assert _convert.read_safetensors(str(tmp_path), "model").keys() == want.keys()
    data = file.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-8])      # the last tensor's bytes cut short
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    last = max(want, key=lambda k: header[k]["data_offsets"][1])
    with pytest.raises(ValueError, match=rf"cut.safetensors: tensor '{last}' .* truncated or corrupt"):
        _convert.lazy_safetensors(str(tmp_path / "cut.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(ValueError, match="junk.safetensors: not a safetensors file"):
        _convert.lazy_safetensors(str(tmp_path / "junk.safetensors"))

    # transformers folders (CLIP text, DINOv2, T5) stream the same way, widened to float32 when placed.
    from defi_jax.interop import _hf_folders
    for path in (tmp_path, file):
        lazy = _hf_folders.read_tensors(str(path))
        assert all(isinstance(v, _convert.Lazy) and v.dtype == np.float32 for v in lazy.values())
        _assert_bitwise({k: np.asarray(v) for k, v in lazy.items()}, {k: v.astype(np.float32) for k, v in want.items()})


def test_streamed_reader_reads_object_store_uris(tmp_path, monkeypatch):
    """A ``gs://`` file goes through ``defi_jax.paths`` (epath: tf.io.gfile or fsspec): the header and each tensor
    one ranged read. Here a local file is routed that way, through a file object with only seek / read (as
    tf.io.gfile's)."""
    import io

    from safetensors.numpy import save_file

    from defi_jax import paths
    from defi_jax.interop import _convert

    want = {"w": np.arange(24, dtype=np.float32).reshape(4, 6), "b": np.arange(3, dtype=np.float16)}
    save_file(want, str(tmp_path / "model.safetensors"))
    opened = []

    class Ranged:   # seek + read, no readinto
        def __init__(self, path):
            self._f = io.open(path, "rb")
            opened.append(path)

        def seek(self, offset):
            self._f.seek(offset)

        def read(self, n):
            return self._f.read(n)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._f.close()

    monkeypatch.setattr(paths, "is_remote", lambda path: True)
    monkeypatch.setattr(paths, "open", lambda path, mode="r": Ranged(path))
    lazy = _convert.read_safetensors(str(tmp_path), "model")
    assert len(opened) == 1                                                 # the header only, so far
    _assert_bitwise({k: np.asarray(v) for k, v in lazy.items()}, want)
    assert len(opened) == 3                                                 # then one read per tensor


def _reference_stage2(c, path, drop: str = "", reshape: str = "") -> dict:
    """A reference-layout stage-2 Lightning checkpoint of a random GIDM (``lam.``-prefixed, with torch-hub DINOv2
    and T5 towers, hyper-parameters naming a class); returns the model's parameters by our paths."""
    model = _host_model("gidm", c, seed=1)
    params = {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in
              nnx.to_flat_state(nnx.state(model, nnx.Param))}
    sd = {"lam." + k: torch.from_numpy(np.array(v)) for k, v in defi_torch.gidm_state_dict(model).items()
          if k != drop}
    if reshape:
        sd["lam." + reshape] = torch.zeros(3, 5)
    torch.save({"state_dict": sd, "hyper_parameters": {"optimizer": torch.optim.AdamW}, "epoch": 3}, path)
    return params


def test_gidm_from_the_reference_stage2_checkpoint_and_its_export_back(tmp_path, fast_compile, one_device_mesh):
    import ml_dtypes

    c = _gidm_config(fast_compile)
    want = _reference_stage2(c, tmp_path / "last.ckpt")
    base = _gidm_config(fast_compile)
    base.model.num_latents = 99   # sizes come from the file
    config = import_stages.import_gidm(str(tmp_path / "last.ckpt"), str(tmp_path / "gidm"), base,
                                       mesh=one_device_mesh)
    assert config.model.num_latents == 6 and config.model.reference_mask_order
    assert config.init.sources.dinov2.kind == "torch_hub_dinov2" and config.init.sources.t5.prefix == "text_encoder."
    _assert_bitwise(_imported(str(tmp_path / "gidm")), want)   # the towers too: from torch-hub / T5 names

    export_torch.export(str(tmp_path / "gidm"), str(tmp_path / "out"))
    config, note = import_stages.import_export(str(tmp_path / "out"), str(tmp_path / "again"),
                                               gidm_configs.get_config("tiny"), mesh=one_device_mesh)
    assert note == "" and config.model.visual_encoder == "dinov2" and config.model.reference_mask_order
    _assert_bitwise(_imported(str(tmp_path / "again")), want)

    # bfloat16: imported (each weight widened exactly), with a note that it is not bitwise.
    export_torch.export(str(tmp_path / "gidm"), str(tmp_path / "bf16"), dtype="bfloat16")
    _, note = import_stages.import_export(str(tmp_path / "bf16"), str(tmp_path / "from_bf16"),
                                          gidm_configs.get_config("tiny"), mesh=one_device_mesh)
    assert "bfloat16" in note and "not bitwise" in note
    got = _imported(str(tmp_path / "from_bf16"))
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        np.testing.assert_array_equal(got[k], v.astype(ml_dtypes.bfloat16).astype(np.float32), err_msg=k)


def test_policy_export_round_trip_is_bitwise(tmp_path, fast_compile, one_device_mesh):
    c = policy_configs.get_config("tiny")
    g = c.model.gfdm   # a smaller GFDM than the tiny one (same 64 + 64 feature channels, 4 frames): quicker builds
    g.unet = dict(g.unet, down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
                  up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
                  block_out_channels=(64, 64), num_attention_heads=(2, 2))
    g.vae = dict(g.vae, down_block_types=("DownEncoderBlock2D",), block_out_channels=(32,))
    # The workdir exported: a params-only step 0 (as an import writes) of host-drawn weights, which the round trip
    # must hold for as for any (a random init of this policy compiled by XLA takes ~50 s).
    save_model(c, str(tmp_path / "policy"), _host_model("policy", c, seed=0))
    (tmp_path / "policy" / "assets").mkdir()
    (tmp_path / "policy" / "assets" / "action_stats.json").write_text(json.dumps(STATS))
    original = _imported(str(tmp_path / "policy"))
    export_torch.export(str(tmp_path / "policy"), str(tmp_path / "out"))

    base = policy_configs.get_config("defi")    # what the folder cannot tell comes from here, not one size
    base.train.compiler_options = fast_compile
    config, note = import_stages.import_export(str(tmp_path / "out"), str(tmp_path / "again"), base,
                                               mesh=one_device_mesh)
    assert note == ""
    _assert_bitwise(_imported(str(tmp_path / "again")), original)
    assert json.loads((tmp_path / "again" / "assets" / "action_stats.json").read_text()) == STATS
    assert config.model.video_former["dim"] == 32 and config.model.gidm.text_encoder == "bytes"
    assert tuple(config.data.views) == ("primary", "wrist") and config.data.resolution == 32
    # The workdir holds a checkpoint now: a second import refuses it before reading anything.
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        import_stages.import_export(str(tmp_path / "out"), str(tmp_path / "again"), base)


# ---------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------

def test_bad_input_names_the_file_and_tensor(tmp_path, fast_compile, tiny_config):
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"empty/config.json not found: expected an export folder"):
        import_stages.import_export(str(tmp_path / "empty"), str(tmp_path / "w1"))
    with pytest.raises(FileNotFoundError, match=r"empty/unet/config.json not found: expected a diffusers"):
        import_stages.import_gfdm(str(tmp_path / "empty"), str(tmp_path / "w2"), tiny_config("gfdm"))
    (tmp_path / "empty" / "config.json").write_text(json.dumps({"stage": "toy"}))
    with pytest.raises(ValueError, match=r"empty/config.json: stage 'toy' is not policy, gfdm or gidm"):
        import_stages.import_export(str(tmp_path / "empty"), str(tmp_path / "w3"))
    with pytest.raises(FileNotFoundError, match="absent.ckpt"):
        import_stages.import_gidm(str(tmp_path / "absent.ckpt"), str(tmp_path / "w4"), _gidm_config(fast_compile))

    c = _gidm_config(fast_compile)
    _reference_stage2(c, tmp_path / "missing.ckpt", drop="decoder.out.bias")
    with pytest.raises(ValueError, match=r"missing decoder\.out\.bias \(ours: decoder/out/bias \(24,\)\)"):
        import_stages.import_gidm(str(tmp_path / "missing.ckpt"), str(tmp_path / "w5"), _gidm_config(fast_compile))
    _reference_stage2(c, tmp_path / "wrong.ckpt", reshape="lang_proj.bias")
    with pytest.raises(ValueError, match=r"lang_proj\.bias: file \(3, 5\), expected \(32,\)"):
        import_stages.import_gidm(str(tmp_path / "wrong.ckpt"), str(tmp_path / "w6"), _gidm_config(fast_compile))
    _reference_stage2(c, tmp_path / "extra.ckpt", reshape="decoder.extra.weight")
    with pytest.raises(ValueError, match=r"extra.ckpt: 1 tensor\(s\) that no parameter .* decoder\.extra\.weight "
                                         r"\(3, 5\)"):
        import_stages.import_gidm(str(tmp_path / "extra.ckpt"), str(tmp_path / "w7"), _gidm_config(fast_compile))
    assert not os.path.exists(tmp_path / "w5" / "checkpoints") and not os.path.exists(tmp_path / "w6" / "config.json")
