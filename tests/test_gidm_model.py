"""GIDM latent action model: shapes, temporal causality, parity with the reference-structured torch
module on random weights, and ``load_gidm`` from the reference's checkpoint formats."""

import defi_jax  # noqa: F401
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from configs.gidm import model_config
from defi_jax.gidm.model import NUM_ACTION_QUERIES, LatentActionModel
from defi_jax.models.byte_tokenizer import gidm_bytes
from defi_jax.interop import defi_torch
from defi_jax.torch_ref.gidm import LatentActionModel as TorchLatentActionModel


def _small(**kw):
    c = model_config("tiny")
    c.update(dict(target="features", feature_dim=24, text_dim=20, model_dim=32, latent_dim=8, num_latents=6,
                  enc_blocks=2, dec_blocks=2, num_heads=4, patch_size=4, image_size=16, residual_target=False,
                  action_to_patches=False))   # the reference structure: no tiny-only extras
    c.update(kw)
    return c


def _torch_for(c):
    torch.manual_seed(0)
    return TorchLatentActionModel(dino_dim=c.feature_dim, model_dim=c.model_dim, latent_dim=c.latent_dim,
                                  num_latents=c.num_latents, enc_blocks=c.enc_blocks, dec_blocks=c.dec_blocks,
                                  num_heads=c.num_heads, text_dim=c.text_dim).eval()


@nnx.jit
def _forward_features(model, feats, text, mask):
    return model.forward_features(feats, text, mask)


def _ff(model, feats, text, mask):
    return _forward_features(model, jnp.asarray(feats), jnp.asarray(text), jnp.asarray(mask))


def _inputs(c, B=3, N=9, L=5, seed=0):
    rs = np.random.default_rng(seed)
    feats = rs.normal(size=(B, 2, N, c.feature_dim)).astype(np.float32)
    text = rs.normal(size=(B, L, c.text_dim)).astype(np.float32)
    mask = np.ones((B, L), np.int64)
    mask[0, 3:] = 0      # instructions of different lengths: padding must be masked
    mask[2, 1:] = 0
    return feats, text, mask


def test_shapes_tiny_pixels():
    c = model_config("tiny")
    model = LatentActionModel(c, rngs=nnx.Rngs(0))
    B = 2
    s = c.image_size
    frames = jnp.asarray(np.random.default_rng(0).integers(0, 255, (B, 2, s, s, 3)), jnp.uint8)
    ids, mask = zip(*(gidm_bytes(t, c.max_text_len) for t in ["pick up the red block", "open"]))
    out = nnx.jit(lambda m, f, i, a: m(f, i, a, shuffle_rng=jax.random.PRNGKey(1)))(
        model, frames, jnp.asarray(np.stack(ids)), jnp.asarray(np.stack(mask)))
    n = (s // 8) ** 2
    assert out["recon"].shape == (B, n, 8 * 8 * 3) == out["target"].shape == out["recon_shuffled"].shape
    assert out["z_q"].shape == out["z_e"].shape == (B, NUM_ACTION_QUERIES, c.latent_dim)
    assert out["indices"].shape == (B, NUM_ACTION_QUERIES)
    assert np.all(np.isfinite(np.asarray(out["recon"])))


def test_encoder_is_causal_in_time():
    c = _small()
    model = LatentActionModel(c, rngs=nnx.Rngs(0))
    feats, text, mask = _inputs(c)

    @nnx.jit
    def run(model, f):
        lang = model.lang_proj(jnp.asarray(text))
        B, T, N, _ = f.shape
        q = jnp.broadcast_to(model.action_latent[...], (B, T, NUM_ACTION_QUERIES, c.feature_dim))
        enc_mask, _ = model._masks(jnp.asarray(mask), NUM_ACTION_QUERIES + N, T)
        return model.encoder(jnp.concatenate([q, f], 2), jnp.broadcast_to(lang[:, None], (B, T, *lang.shape[1:])),
                             mask_bS=enc_mask)

    def encode(f):
        return np.asarray(run(model, jnp.asarray(f)))

    changed = feats.copy()
    changed[:, 1] += np.random.default_rng(1).normal(size=changed[:, 1].shape).astype(np.float32)
    a, b = encode(feats), encode(changed)
    np.testing.assert_allclose(a[:, 0], b[:, 0], atol=1e-6)      # frame 1 never sees frame 2
    assert np.abs(a[:, 1] - b[:, 1]).max() > 1e-2                  # frame 2 does see itself
    changed0 = feats.copy()
    changed0[:, 0] += np.random.default_rng(2).normal(size=changed0[:, 0].shape).astype(np.float32)
    assert np.abs(encode(changed0)[:, 1] - a[:, 1]).max() > 1e-2   # and frame 2 sees frame 1


@pytest.mark.parametrize("kw", [
    {},
    dict(feature_dim=16, text_dim=12, model_dim=24, latent_dim=4, num_latents=16, enc_blocks=1, dec_blocks=3,
         num_heads=3),
])
def test_parity_with_reference_structure(kw):
    c = _small(reference_mask_order=True, **kw)
    tm = _torch_for(c)
    model = LatentActionModel(c, rngs=nnx.Rngs(0))
    sd = {k: v.detach().numpy() for k, v in tm.state_dict().items()}
    defi_torch.load_gidm_state_dict(model, sd, skip_encoders=True)
    feats, text, mask = _inputs(c)
    with torch.no_grad():
        ref = tm.forward_features(*(torch.from_numpy(a) for a in (feats, text, mask)))
    out = _ff(model, feats, text, mask)
    for key in ("recon", "z_q"):
        a, b = np.asarray(out[key]), ref[key].numpy()
        assert a.shape == b.shape
        assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max(), key
    np.testing.assert_array_equal(np.asarray(out["indices"]), ref["indices"].numpy().reshape(out["indices"].shape))
    target = torch.from_numpy(feats[:, 1])
    ref_loss = float(tm.loss(ref, target))
    ours = float(jnp.mean((out["recon"] - feats[:, 1]) ** 2) + out["codebook_loss"] + 0.25 * out["commitment_loss"])
    assert abs(ours - ref_loss) <= 1e-4 * abs(ref_loss)

    # Export runs the same table backwards.
    back = defi_torch.gidm_state_dict(model)
    back = {k: v for k, v in back.items() if not k.startswith(("dino_encoder.", "text_encoder."))}
    assert sorted(back) == sorted(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)

    # Our default builds the language mask per sample; the reference's ordering quirk only differs when
    # the instructions in a batch have different lengths.
    c2 = c.copy_and_resolve_references()
    c2.reference_mask_order = False
    fixed = LatentActionModel(c2, rngs=nnx.Rngs(0))
    defi_torch.load_gidm_state_dict(fixed, sd, skip_encoders=True)
    assert np.abs(np.asarray(_ff(fixed, feats, text, mask)["z_e"])
                  - np.asarray(out["z_e"])).max() > 1e-5
    same = np.ones_like(mask)
    np.testing.assert_allclose(
        np.asarray(_ff(fixed, feats, text, same)["recon"]),
        np.asarray(_ff(model, feats, text, same)["recon"]),
        atol=1e-5)


def test_load_gidm_files_and_errors(tmp_path):
    c = _small(reference_mask_order=True)
    tm = _torch_for(c)
    feats, text, mask = _inputs(c)
    with torch.no_grad():
        ref = tm.forward_features(*(torch.from_numpy(a) for a in (feats, text, mask)))["recon"].numpy()

    # A Lightning checkpoint: ``lam.``-prefixed tensors plus hyper-parameters naming a class (which
    # torch.load(weights_only=True) refuses; load_gidm reads it without importing or running it).
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"lam." + k: v for k, v in tm.state_dict().items()},
                "hyper_parameters": {"optimizer": torch.optim.AdamW, "lam_num_latents": c.num_latents},
                "epoch": 3}, ckpt)
    sd = defi_torch.read_state_dict(ckpt)
    inferred = defi_torch.infer_gidm_config(sd, base=c)
    assert (inferred.num_latents, inferred.latent_dim, inferred.model_dim, inferred.enc_blocks,
            inferred.dec_blocks, inferred.feature_dim, inferred.text_dim) == (
        c.num_latents, c.latent_dim, c.model_dim, c.enc_blocks, c.dec_blocks, c.feature_dim, c.text_dim)
    for path in (ckpt,):
        model = defi_torch.load_gidm(path, c, skip_encoders=True)
        got = np.asarray(_ff(model, feats, text, mask)["recon"])
        assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()

    # safetensors written by our exporter loads back to the same model.
    st = tmp_path / "gidm.safetensors"
    defi_torch.save_gidm(model, st)
    again = defi_torch.load_gidm(st, c)
    got = np.asarray(_ff(again, feats, text, mask)["recon"])
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()

    bad = {k: v for k, v in tm.state_dict().items() if k != "vq.codebook.weight"}
    bad["decoder.extra.weight"] = torch.zeros(2)
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(KeyError, match=r"missing \['vq.codebook.weight'\].*unexpected \['decoder.extra.weight'\]"):
        defi_torch.load_gidm(tmp_path / "bad.pt", c, skip_encoders=True)
    wrong = dict(tm.state_dict())
    wrong["to_codebook.weight"] = torch.zeros(c.latent_dim + 1, c.model_dim)
    torch.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match="to_codebook.weight"):
        defi_torch.load_gidm(tmp_path / "wrong.pt", c, skip_encoders=True)
    with pytest.raises(FileNotFoundError):
        defi_torch.load_gidm(tmp_path / "absent.ckpt", c)


def test_load_gidm_full_reference_checkpoint(tmp_path):
    """A reference-layout stage-2 checkpoint with its frozen towers (torch-hub DINOv2 names under
    ``lam.dino_encoder.``, ``T5EncoderModel`` names under ``lam.text_encoder.``): our full model from
    uint8 frames equals transformers' DINOv2 + T5 + the reference-structured latent action model."""
    import transformers

    from defi_jax.interop import hf_dinov2
    from defi_jax.models.dinov2 import Dinov2, Dinov2Config

    dino_kw = dict(hidden_size=24, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14)
    t5_kw = dict(vocab_size=50, d_model=20, d_kv=8, d_ff=40, num_layers=1, num_heads=2)
    c = _small(visual_encoder="dinov2", text_encoder="t5", target="features", feature_dim=24, text_dim=20,
               image_size=28, patch_size=14)  # reference_mask_order off: load_gidm turns it on by default
    c.dino = dino_kw
    c.t5 = t5_kw

    dino_src = Dinov2(Dinov2Config(**dino_kw), rngs=nnx.Rngs(3))
    hf_dinov2.save(dino_src, str(tmp_path / "dino"))
    hf_dino = transformers.Dinov2WithRegistersModel.from_pretrained(str(tmp_path / "dino")).eval()
    torch.manual_seed(1)
    hf_t5 = transformers.T5EncoderModel(transformers.T5Config(**t5_kw, feed_forward_proj="relu")).eval()
    tm = _torch_for(c)

    sd = {"lam." + k: v for k, v in tm.state_dict().items()}
    sd |= {"lam.dino_encoder." + k: torch.from_numpy(np.ascontiguousarray(v))
           for k, v in hf_dinov2.to_torch_hub_state_dict(dino_src).items()}
    sd |= {"lam.text_encoder." + k: v for k, v in hf_t5.state_dict().items()}
    torch.save({"state_dict": sd}, tmp_path / "gidm.ckpt")
    model = defi_torch.load_gidm(tmp_path / "gidm.ckpt", c)
    assert model.reference_mask_order and not c.reference_mask_order   # the caller's config is not mutated

    rs = np.random.default_rng(0)
    frames = rs.integers(0, 256, (2, 2, 28, 28, 3)).astype(np.uint8)
    ids = rs.integers(2, 50, (2, 6)).astype(np.int64)
    mask = np.ones((2, 6), np.int64)
    mask[1, 4:] = 0
    with torch.no_grad():
        x = torch.from_numpy(frames).float().div(255).permute(0, 1, 4, 2, 3).reshape(4, 3, 28, 28)
        x = (x - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
        patches = hf_dino(pixel_values=x).last_hidden_state[:, 5:].reshape(2, 2, 4, 24)
        text = hf_t5(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state
        ref = tm.forward_features(patches, text, torch.from_numpy(mask))["recon"].numpy()
    out = nnx.jit(lambda m, f, i, a: m(f, i, a))(model, jnp.asarray(frames), jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(out["target"]), patches[:, 1].numpy(), atol=1e-4)
    ours_text = np.asarray(model.encode_text(jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(ours_text[0], text[0].numpy(), atol=1e-4)
    np.testing.assert_allclose(ours_text[1, :4], text[1, :4].numpy(), atol=1e-4)
    assert np.abs(np.asarray(out["recon"]) - ref).max() <= 1e-4 * np.abs(ref).max()

    # Exporting writes the same key set back (towers included).
    assert sorted(defi_torch.gidm_state_dict(model)) == sorted(k[len("lam."):] for k in sd)
