"""T5 encoder + SentencePiece tokenizer parity with transformers (random weights, small configs, float32)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import defi_jax  # noqa: F401  (flax settings)
from defi_jax.interop import hf_t5
from defi_jax.models import t5
from defi_jax.models.t5_tokenizer import T5Tokenizer
from _encoder_checks import assert_shards_on_8_devices

transformers = pytest.importorskip("transformers")

CONFIGS = [
    dict(vocab_size=97, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4),
    dict(vocab_size=120, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=2,
         relative_attention_num_buckets=16, relative_attention_max_distance=20, feed_forward_proj="gated-gelu"),
]


def _rel(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / (np.abs(np.asarray(b)).max() + 1e-12))


def _inputs(vocab, L, seed=0):
    rs = np.random.RandomState(seed)
    ids = rs.randint(0, vocab, (3, L))
    mask = np.ones((3, L), np.int64)
    mask[1, L // 2:] = 0
    mask[2, L - 3:] = 0
    return ids, mask


@pytest.mark.parametrize("i", range(len(CONFIGS)))
def test_load_and_save_match_transformers(i, tmp_path):
    kw = CONFIGS[i]
    torch.manual_seed(i)
    ref = transformers.T5EncoderModel(transformers.T5Config(**kw)).eval()
    ref.save_pretrained(tmp_path / "hf")
    enc = hf_t5.load_encoder(str(tmp_path / "hf"))
    assert enc.config.is_gated_act == ("gated" in kw.get("feed_forward_proj", ""))
    fwd = jax.jit(lambda m, a, b: m(a, b))
    for L in (40, 6):  # 40 > max_distance / 2: the logarithmic buckets are exercised
        ids, mask = _inputs(kw["vocab_size"], L, seed=L)
        with torch.no_grad():
            want = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
        got = fwd(enc, jnp.asarray(ids), jnp.asarray(mask))
        assert got.shape == (3, L, kw["d_model"])
        assert _rel(got, want) <= 1e-4

    hf_t5.save_encoder(enc, str(tmp_path / "ours"))
    back = transformers.T5EncoderModel.from_pretrained(str(tmp_path / "ours")).eval()
    ids, mask = _inputs(kw["vocab_size"], 6, seed=6)
    with torch.no_grad():
        want = back(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    assert _rel(fwd(enc, jnp.asarray(ids), jnp.asarray(mask)), want) <= 1e-4


def test_load_reads_full_t5_folder(tmp_path):
    kw = CONFIGS[0]
    torch.manual_seed(5)
    full = transformers.T5ForConditionalGeneration(transformers.T5Config(**kw)).eval()
    full.save_pretrained(tmp_path)
    enc = hf_t5.load_encoder(str(tmp_path))
    ids, mask = _inputs(kw["vocab_size"], 7)
    with torch.no_grad():
        want = full.encoder(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state
    assert _rel(jax.jit(lambda m, a, b: m(a, b))(enc, jnp.asarray(ids), jnp.asarray(mask)), want.numpy()) <= 1e-4


def test_state_dict_round_trip_and_errors():
    cfg = t5.T5Config(**CONFIGS[1])
    abstract = lambda: nnx.eval_shape(lambda: t5.T5Encoder(cfg, rngs=nnx.Rngs(0)))  # noqa: E731
    torch.manual_seed(0)
    ref = transformers.T5EncoderModel(transformers.T5Config(**CONFIGS[1]))
    enc = hf_t5.from_state_dict(abstract(), {k: v.numpy() for k, v in ref.state_dict().items()})
    sd = hf_t5.to_state_dict(enc)
    assert set(sd) == set(ref.state_dict())
    for k, v in ref.state_dict().items():
        np.testing.assert_array_equal(sd[k], v.numpy(), err_msg=k)
    other = hf_t5.from_state_dict(abstract(), {k: np.zeros_like(v) for k, v in sd.items()})
    hf_t5.load_state_dict(other, sd)
    np.testing.assert_array_equal(other.blocks[1].ffn.wi_1.kernel[...], enc.blocks[1].ffn.wi_1.kernel[...])
    del sd["encoder.block.1.layer.1.DenseReluDense.wo.weight"]
    with pytest.raises(ValueError, match="missing.*block.1.layer.1.DenseReluDense.wo.weight"):
        hf_t5.load_state_dict(other, sd)


def test_relative_position_buckets_match_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention

    for L, nb, md in ((600, 32, 128), (50, 16, 20)):
        rel = torch.arange(L)[None, :] - torch.arange(L)[:, None]
        want = T5Attention._relative_position_bucket(rel, bidirectional=True, num_buckets=nb, max_distance=md)
        np.testing.assert_array_equal(t5.relative_position_buckets(L, nb, md), want.numpy())


def test_full_config_parameter_count_and_axes():
    model = nnx.eval_shape(lambda: t5.T5Encoder(t5.T5Config(), rngs=nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param)
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)) == 109_628_544
    assert_shards_on_8_devices(params, (32128, 768))
    for path, var in nnx.to_flat_state(params):
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == var.get_value().ndim, path


# ------------------------------------------------------------------------------------------ tokenizer

SENTENCES = ["pick up the red block and place it in the drawer", "open the drawer", "close the drawer",
             "push the blue block to the left", "lift the pink block from the slider", "turn on the led light",
             "turn off the lightbulb", "rotate the red block to the right", "stack the blocks",
             "unstack the blocks", "move the sliding door to the left", "go push the switch upwards"]


@pytest.fixture(scope="module")
def spiece_folder(tmp_path_factory):
    import sentencepiece

    path = tmp_path_factory.mktemp("t5_tok")
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES * 20), model_prefix=str(path / "spiece"), vocab_size=48,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    return path


TEXTS = ["Pick up the RED block, now!  ok", " open  the\tdrawer ", "x <extra_id_0> the block</s>",
         "café Ωmega", "turn off the lightbulb " * 8, ""]


def test_tokenizer_matches_transformers(spiece_folder):
    ref = transformers.T5Tokenizer.from_pretrained(str(spiece_folder))
    ours = T5Tokenizer.from_folder(str(spiece_folder))
    assert ours.vocab_size == len(ref)
    for text in TEXTS:
        assert ours.encode(text) == ref(text)["input_ids"], text
    ids, mask = ours.tokenize(TEXTS)
    want = ref(TEXTS, padding=True)
    np.testing.assert_array_equal(ids, np.asarray(want["input_ids"]))
    np.testing.assert_array_equal(mask, np.asarray(want["attention_mask"]))
    ids, mask = ours(TEXTS, max_length=12)
    want = ref(TEXTS, padding="max_length", truncation=True, max_length=12)
    np.testing.assert_array_equal(ids, np.asarray(want["input_ids"]))
    np.testing.assert_array_equal(mask, np.asarray(want["attention_mask"]))
    one_ids, one_mask = t5.T5Tokenizer(str(spiece_folder / "spiece.model")).encode_padded(TEXTS[0], 12)
    np.testing.assert_array_equal(one_ids, ids[0])
    np.testing.assert_array_equal(one_mask, mask[0])


def test_instruction_embedder_caches_and_matches_reference(spiece_folder):
    """Per-string embeddings equal the reference call (tokenize padding=True, T5EncoderModel)."""
    ref_tok = transformers.T5Tokenizer.from_pretrained(str(spiece_folder))
    kw = dict(CONFIGS[0], vocab_size=len(ref_tok))
    torch.manual_seed(9)
    ref = transformers.T5EncoderModel(transformers.T5Config(**kw)).eval()
    enc = t5.T5Encoder(t5.T5Config(**kw), rngs=nnx.Rngs(0))
    hf_t5.load_state_dict(enc, {k: v.numpy() for k, v in ref.state_dict().items()})

    embed = t5.InstructionEmbedder(enc, T5Tokenizer.from_folder(str(spiece_folder)), max_length=24, batch_size=4)
    texts = ["open the drawer", "push the blue block to the left", "open the drawer", "stack the blocks"]
    emb, mask = embed(texts)
    assert emb.shape == (4, 24, 32) and mask.shape == (4, 24)
    assert len(embed.cache) == 3
    batch = ref_tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        want = ref(**batch).last_hidden_state.numpy()
    want_mask = batch["attention_mask"].numpy()
    np.testing.assert_array_equal(mask[:, :want_mask.shape[1]], want_mask)
    assert mask[:, want_mask.shape[1]:].sum() == 0
    assert _rel(emb[:, :want.shape[1]] * want_mask[..., None], want * want_mask[..., None]) <= 1e-4
    assert np.all(emb[mask == 0] == 0)

    calls = []
    embed._forward = lambda *a: calls.append(1)  # cached strings must not run the encoder again
    emb2, _ = embed(["stack the blocks", "open the drawer"])
    assert not calls
    np.testing.assert_array_equal(emb2, emb[[3, 0]])

