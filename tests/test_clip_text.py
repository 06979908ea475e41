"""CLIP text tower + tokenizer parity with transformers (random weights, small configs, float32)."""

import collections
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import defi_jax  # noqa: F401  (flax settings)
from defi_jax.interop import hf_clip
from defi_jax.models import clip_text
from defi_jax.models.clip_tokenizer import CLIPTokenizer, bytes_to_unicode
from _encoder_checks import assert_shards_on_8_devices

transformers = pytest.importorskip("transformers")

CONFIGS = [
    dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=99,
         max_position_embeddings=24),
    dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=120,
         max_position_embeddings=20, hidden_act="gelu"),
]


def _rel(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / (np.abs(np.asarray(b)).max() + 1e-12))


def _inputs(vocab, L, seed=0):
    rs = np.random.RandomState(seed)
    ids = rs.randint(0, vocab, (3, L))
    mask = np.ones((3, L), np.int64)
    mask[1, L // 2:] = 0
    mask[2, L - 2:] = 0
    return ids, mask


def _hf_model(kw, seed):
    torch.manual_seed(seed)
    return transformers.CLIPTextModel(transformers.CLIPTextConfig(**kw)).eval()


@pytest.mark.parametrize("i", range(len(CONFIGS)))
def test_load_and_save_match_transformers(i, tmp_path):
    kw = CONFIGS[i]
    ref = _hf_model(kw, seed=i)
    ref.save_pretrained(tmp_path / "hf")
    enc = hf_clip.load_text_encoder(str(tmp_path / "hf"))
    assert enc.config.hidden_act == kw.get("hidden_act", "quick_gelu")

    fwd = jax.jit(lambda m, a, b: m(a, b))
    for L in (kw["max_position_embeddings"], 7):
        ids, mask = _inputs(kw["vocab_size"], L, seed=L)
        with torch.no_grad():
            want = ref(torch.tensor(ids), attention_mask=torch.tensor(mask))
            want_nomask = ref(torch.tensor(ids)).last_hidden_state.numpy()
        got = fwd(enc, jnp.asarray(ids), jnp.asarray(mask))
        assert got.shape == (3, L, kw["hidden_size"])
        assert _rel(got, want.last_hidden_state.numpy()) <= 1e-4
        assert _rel(enc.pooled(jnp.asarray(ids), got), want.pooler_output.numpy()) <= 1e-4
        assert _rel(fwd(enc, jnp.asarray(ids), None), want_nomask) <= 1e-4

    # our save -> from_pretrained -> same outputs as our model
    hf_clip.save_text_encoder(enc, str(tmp_path / "ours"))
    back = transformers.CLIPTextModel.from_pretrained(str(tmp_path / "ours")).eval()
    ids, mask = _inputs(kw["vocab_size"], 7, seed=1)
    with torch.no_grad():
        want = back(torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    assert _rel(fwd(enc, jnp.asarray(ids), jnp.asarray(mask)), want) <= 1e-4


def test_load_reads_full_clip_model_folder(tmp_path):
    """openai/clip-vit-base-patch32 is a full CLIPModel folder: nested text_config, text_model. prefix."""
    kw = CONFIGS[0]
    torch.manual_seed(3)
    full = transformers.CLIPModel(transformers.CLIPConfig(
        text_config=kw, vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=32, patch_size=16))).eval()
    full.save_pretrained(tmp_path)
    enc = hf_clip.load_text_encoder(str(tmp_path))
    ids, mask = _inputs(kw["vocab_size"], 8)
    with torch.no_grad():
        want = full.text_model(torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    assert _rel(jax.jit(lambda m, a, b: m(a, b))(enc, jnp.asarray(ids), jnp.asarray(mask)), want) <= 1e-4


def test_with_projection_matches_clip_text_model_with_projection(tmp_path):
    kw = dict(CONFIGS[0], projection_dim=24, bos_token_id=97, eos_token_id=98)
    torch.manual_seed(4)
    ref = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**kw)).eval()
    ref.save_pretrained(tmp_path / "hf")
    enc = hf_clip.load_text_encoder(str(tmp_path / "hf"), with_projection=True)
    ids, mask = _inputs(97, 9)
    ids[:, 6] = 98  # pooling takes the first end-of-text token
    ids[1, 3] = 98
    enc_cfg = enc.config
    assert enc_cfg.projection_dim == 24
    embeds = jax.jit(lambda m, a, b: m.text_embeds(a, b))
    with torch.no_grad():
        want = ref(torch.tensor(ids), attention_mask=torch.tensor(mask)).text_embeds.numpy()
    assert want.shape == (3, 24)
    assert _rel(embeds(enc, jnp.asarray(ids), jnp.asarray(mask)), want) <= 1e-4
    hf_clip.save_text_encoder(enc, str(tmp_path / "ours"))
    back = transformers.CLIPTextModelWithProjection.from_pretrained(str(tmp_path / "ours")).eval()
    with torch.no_grad():
        want = back(torch.tensor(ids), attention_mask=torch.tensor(mask)).text_embeds.numpy()
    assert _rel(embeds(enc, jnp.asarray(ids), jnp.asarray(mask)), want) <= 1e-4
    # without a projection the same folder loads as the plain tower
    assert not hf_clip.load_text_encoder(str(tmp_path / "hf")).with_projection


def test_load_errors_name_the_bad_tensor(tmp_path):
    from safetensors.numpy import load_file, save_file

    _hf_model(CONFIGS[0], 0).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    bad = next(k for k in tensors if "layers.1.mlp.fc1.weight" in k)
    save_file({k: v for k, v in tensors.items() if k != bad}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="missing.*layers.1.mlp.fc1.weight"):
        hf_clip.load_text_encoder(str(tmp_path))


def test_full_config_parameter_count_and_axes():
    model = nnx.eval_shape(lambda: clip_text.CLIPTextEncoder(clip_text.CLIPTextConfig(), rngs=nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param)
    leaves = jax.tree.leaves(params)
    assert sum(int(np.prod(x.shape)) for x in leaves) == 63_165_952
    assert_shards_on_8_devices(params, (49408, 512))
    for path, var in nnx.to_flat_state(params):
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == var.get_value().ndim, path


def test_defi_text_condition():
    h = jnp.arange(2 * 77 * 4, dtype=jnp.float32).reshape(2, 77, 4)
    cond = clip_text.defi_text_condition(h)
    assert cond.shape == (2, 20, 8)
    np.testing.assert_array_equal(cond[..., :4], h[:, :20])
    np.testing.assert_array_equal(cond[..., 4:], h[:, :20])
    pe = clip_text.defi_text_condition(h[:, :20], position_encode=True)
    np.testing.assert_allclose(pe[0, 3, :4], h[0, 3] + clip_text.sincos_1d(4, 20)[3], rtol=1e-6)
    with pytest.raises(ValueError, match="num_tokens"):
        clip_text.defi_text_condition(h[:, :10])


# ------------------------------------------------------------------------------------------ tokenizer

CORPUS = ("pick up the red block and place it in the drawer. open the drawer! close the drawer, "
          "push the blue block to the left; lift the pink block from the slider 123 times. "
          "turn on the led light, turn off the lightbulb. it's rotating the red block to the right "
          "they're stacking blocks, we'll unstack them; don't move the sliding door").split()


def _train_bpe(words, num_merges):
    """A tiny BPE trainer (byte-level symbols, </w> on the last one) to make a realistic small vocab."""
    b2u = bytes_to_unicode()
    counts = collections.Counter(tuple(b2u[b] for b in w.lower().encode()) for w in words)
    counts = collections.Counter({w[:-1] + (w[-1] + "</w>",): c for w, c in counts.items()})
    merges = []
    for _ in range(num_merges):
        pairs = collections.Counter()
        for w, c in counts.items():
            for p in zip(w, w[1:]):
                pairs[p] += c
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        new = collections.Counter()
        for w, c in counts.items():
            out, i = [], 0
            while i < len(w):
                if i < len(w) - 1 and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new[tuple(out)] += c
        counts = new
    symbols = list(b2u.values()) + [c + "</w>" for c in b2u.values()] + ["".join(m) for m in merges]
    vocab = {s: i for i, s in enumerate(dict.fromkeys(symbols))}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab, merges


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip_tok")
    vocab, merges = _train_bpe(CORPUS, 120)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return path


TEXTS = [
    "Pick up the red block and place it in the drawer.",
    "  push   the BLUE block\tto the left!!  ",
    "it's 2024: they're unstacking 3 blocks, aren't they?",
    "café naïve résumé — ünïcödé 日本語 emoji 🤖 ok",
    "open the drawer <|endoftext|> then close it",
    "a very long instruction " * 12,
    "",
]


def test_tokenizer_matches_transformers(tokenizer_folder):
    ref = transformers.CLIPTokenizer.from_pretrained(str(tokenizer_folder))
    ours = CLIPTokenizer.from_folder(str(tokenizer_folder))
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (
        ref.bos_token_id, ref.eos_token_id, ref.pad_token_id)
    for text in TEXTS:
        assert ours.encode(text) == ref(text, add_special_tokens=False)["input_ids"], text
    for max_length in (20, 77):
        ids, mask = ours(TEXTS, max_length=max_length)
        want = ref(TEXTS, padding="max_length", truncation=True, max_length=max_length)
        np.testing.assert_array_equal(ids, np.asarray(want["input_ids"]))
        np.testing.assert_array_equal(mask, np.asarray(want["attention_mask"]))
    ids, mask = ours(TEXTS[:3])
    want = ref(TEXTS[:3], padding=True)
    np.testing.assert_array_equal(ids, np.asarray(want["input_ids"]))
    np.testing.assert_array_equal(mask, np.asarray(want["attention_mask"]))


def test_tokenizer_missing_folder_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        CLIPTokenizer.from_folder(str(tmp_path))

