"""GIDM stage: configs, parameter counts, ahead-of-time compile of the full train step on 8 fake devices,
the linear probe, and a short CPU pretraining run through the real trainer on the demo data."""

import json
import os

import defi_jax  # noqa: F401
import jax
import numpy as np
import pytest
from _helpers import random_model

from configs import gidm as gidm_configs
from defi_jax import trainer
from defi_jax.gidm import stage


def test_param_counts_of_the_released_architecture():
    # One block per transformer keeps the abstract build fast; the per-block sizes give the 12-block totals
    # (``launch.describe --config=configs/gidm.py:defi`` prints encoder 113,959,680, decoder 86,211,072).
    c = gidm_configs.get_config("defi")
    c.model.enc_blocks = c.model.dec_blocks = 1
    counts = trainer.param_counts(c)
    assert counts["dino_encoder"] == 86_583_552        # DINOv2-B/14 with 4 registers
    assert counts["text_encoder"] == 109_628_544       # T5-base encoder
    d = 768
    attn = 4 * d * d + d                                # to_q/k/v (no bias) + to_out
    ffn = 2 * 4 * d * d + 5 * d
    stem = 2 * (2 * d) + d * d + d                      # ffn = LayerNorm, Linear, LayerNorm
    enc_block, dec_block = 2 * attn + ffn + 3 * 2 * d, attn + ffn + 2 * 2 * d
    assert counts["encoder"] == stem + enc_block
    assert counts["decoder"] == stem + dec_block + d * d + d
    assert stem + 12 * enc_block == 113_959_680 and stem + 12 * dec_block + d * d + d == 86_211_072
    assert counts["vq"] == 16 * 128 and counts["action_latent"] == 4 * d
    assert counts["to_codebook"] == d * 128 + 128 and counts["action_up"] == 128 * d + d


def test_train_step_compiles_for_8_devices(fast_compile):
    """The defi config's step (frozen DINOv2 + T5, VQ state, fsdp over 8 devices) compiles, nothing runs.

    Depth is cut to one block per tower and the backend compiles unoptimized to keep the test fast (the optimized
    HLO, its collectives and memory are the same); the full depth compiles the same code
    (``python -m launch.describe --config=configs/gidm.py:defi --num_devices=8``, several minutes on CPU).
    """
    assert jax.device_count() == 8
    c = gidm_configs.get_config("defi")
    c.model.enc_blocks = c.model.dec_blocks = 1
    c.model.dino.num_hidden_layers = 1
    c.model.t5.num_layers = 1
    c.init.allow_random = True      # shapes only: no DINOv2 / T5 weights are needed to compile
    c.train.batch_size = 8
    c.mesh.shape = (2, 4, 1)
    c.train.compiler_options = fast_compile
    compiled, mem = trainer.compile_train_step(c)
    assert mem["argument"] > 0
    text = compiled.as_text()
    assert "all-reduce" in text or "reduce-scatter" in text     # gradients are reduced across devices


def test_ridge_probe_recovers_a_linear_map():
    rs = np.random.default_rng(0)
    x = rs.normal(size=(200, 6))
    y = x @ rs.normal(size=(6, 3)) + 0.01 * rs.normal(size=(200, 3))
    assert stage.ridge_probe_r2(x[:100], y[:100], x[100:], y[100:], 1e-4) > 0.99
    noise = rs.normal(size=(200, 3))
    assert stage.ridge_probe_r2(x[:100], noise[:100], x[100:], noise[100:], 1e-4) < 0.1


def test_validate_names_bad_keys():
    c = gidm_configs.get_config("tiny")
    c.model.target = "features"
    with pytest.raises(ValueError, match="model.target"):
        stage.validate(c)
    c = gidm_configs.get_config("tiny")
    c.model.image_size = 60
    with pytest.raises(ValueError, match="image_size"):
        stage.validate(c)


def test_evaluation_compiles_once_per_run(demo_data_dir, count_compiles, tiny_config):
    """The second evaluation of a run reuses the first one's compiled step; another config compiles its own."""
    c = tiny_config("gidm", batch_size=4)      # unoptimized compiles: what is counted, not how fast they run
    c.data.data_dir = demo_data_dir
    c.eval.batches = 2
    model = random_model("gidm", c)            # any weights: the random init (eager, op by op) is not under test
    batches = [b for _, b in zip(range(2), stage.make_data(c, 0, 1, "eval"))]
    assert {"actions", "has_actions", "input_ids"} <= set(batches[0])

    def evaluate(config):
        with count_compiles() as n:
            metrics = stage.evaluate(model, config, None, 5, iter(batches))
        return metrics, n[0]

    first, compiles = evaluate(c)
    assert compiles > 0 and np.isfinite(first["eval_recon_loss"])
    again, compiles = evaluate(c)
    assert compiles == 0 and again == first
    c.model.vq_beta = 0.5      # another run's config: its own step (its loss weighs the commitment term more)
    other, compiles = evaluate(c)
    assert compiles > 0 and other["eval_loss"] != first["eval_loss"]


def test_tiny_pretraining_on_demo_data(demo_data_dir, tmp_path, one_device_mesh):
    """Pretraining from scratch on the demo data through the real trainer: the loss falls, the codebook is
    in use, the decoder reads the latent actions (shuffling them across the batch costs a clear share of
    the reconstruction loss) and the encoder's latents linearly predict the true (held-out) robot actions.

    The gap appears after ~150 steps (about 0.15 x recon_loss by step 250 with this seed); before it the
    decoder only learns what the current frame alone predicts. One device: what is learnt, not the sharding
    (test_train_step_compiles_for_8_devices, test_checkpoint), with less to compile.
    """
    c = gidm_configs.get_config("tiny")
    c.data.data_dir = demo_data_dir
    c.train.num_steps = 250
    c.train.log_every = 25
    c.train.save_every = 1000
    c.train.progress_bar = False
    # XLA's level 1: init and step compile in 19 CPU-s instead of 24, the steps run as fast (level 0: 2.5x slower)
    c.train.compiler_options = {"xla_backend_optimization_level": 1, "xla_llvm_disable_expensive_passes": True}
    c.eval.batches = 4
    workdir = str(tmp_path / "gidm")
    trainer.Trainer(c, mesh=one_device_mesh).fit(workdir)
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    train_rows = [r for r in rows if "action_info_gap" in r]
    assert train_rows[-1]["step"] == 250
    last = train_rows[len(train_rows) // 2:]
    assert np.mean([r["codebook_perplexity"] for r in last]) > 4
    assert np.mean([r["recon_loss"] for r in last]) < 0.6 * train_rows[0]["recon_loss"]
    end = train_rows[-3:]
    gap, recon = np.mean([r["action_info_gap"] for r in end]), np.mean([r["recon_loss"] for r in end])
    assert gap > 0.05 * recon, (gap, recon)        # a token-blind decoder gives |gap| < 1e-4
    final = [r for r in rows if "probe_r2" in r][-1]
    assert final["eval_action_info_gap"] > 0 and np.isfinite(final["probe_r2"])
    assert final["probe_r2_continuous"] > 0.3
