"""Per-module export parity: a module with random JAX weights (never seen by torch), written with the code
``export_torch`` uses, read by the PyTorch side, gives the JAX module's outputs (float32, 1e-4 relative).

Where each module of the deployment folder is checked (two or more small configs each):

=============== =================================================================================================
UNet            here (``two_level``, JAX-random weights); test_interop_diffusers_svd::
                test_unet_save_loads_in_diffusers_sharded_and_identical (``odd_size``: export bitwise equal to the
                diffusers model whose outputs test_svd_unet matches)
VAE             here (``three_level``); test_interop_diffusers_svd::test_vae_built_in_jax_exports_to_the_same_function
                (``two_level``); encode + decode
CLIP text       test_clip_text::test_load_and_save_match_transformers (2 configs, ``save_text_encoder`` ->
                ``CLIPTextModel``), ::test_with_projection_matches_clip_text_model_with_projection (the goal token)
DINOv2          test_dinov2::test_load_and_save_match_transformers (2 configs)
T5 encoder      test_t5::test_load_and_save_match_transformers (2 configs; ``save_encoder`` and the GIDM folder's
                ``to_state_dict`` share the rule table)
GIDM            test_gidm_model::test_parity_with_reference_structure (2 configs: ``gidm_state_dict`` is bitwise
                the ``torch_ref.gidm`` state dict whose outputs match)
Video Former,   here (``CONFIGS[0]``, ``CONFIGS[2]`` of test_policy_modules, JAX-initialised then perturbed);
action head     test_policy_modules::test_round_trip_bitwise_and_reference_strict_load (``CONFIGS[1]``)
whole policy    test_export_torch (actions of ``DeFIPolicyTorch`` vs ``DeFIPolicy``), test_export_lerobot
=============== =================================================================================================
"""

import numpy as np
import pytest
import torch
from _svd_reference import (UNET_CASES, VAE_CASES, assert_vae_matches_diffusers, jax_unet_outputs, max_rel_err,
                            torch_unet_outputs, unet_inputs, unet_inputs_jax)
from flax import nnx
from test_policy_modules import CONFIGS, IDS, _close, _fast, _head_inputs, _t

from defi_jax.benchmarks import export as export_benchmark
from defi_jax.interop import defi_policy, diffusers_svd
from defi_jax.models.svd_layers import trace_rngs
from defi_jax.models.svd_unet import UNetConfig, UNetSpatioTemporal
from defi_jax.models.svd_vae import AutoencoderKLTemporalDecoder, VAEConfig
from defi_jax.torch_ref import policy as tp

torch.set_default_dtype(torch.float32)


def test_unet_built_in_jax_exports_to_the_same_function(tmp_path):
    from diffusers import UNetSpatioTemporalConditionModel

    case = "two_level"
    cfg = UNetConfig.from_dict(UNET_CASES[case]["config"])
    unet = export_benchmark.random_weights(nnx.eval_shape(lambda: UNetSpatioTemporal(cfg, rngs=trace_rngs(0))), seed=11)
    diffusers_svd.save_unet(unet, str(tmp_path))
    ref = UNetSpatioTemporalConditionModel.from_pretrained(tmp_path).eval()
    inputs = unet_inputs(case, seed=12)
    ref_out, ref_feats = torch_unet_outputs(ref, inputs, num_up_blocks=2)
    out, feats = jax_unet_outputs(unet, *unet_inputs_jax(inputs), num_up_blocks=2)
    assert max_rel_err(out, ref_out) <= 1e-4
    for ours, theirs in zip(feats, ref_feats):      # the policy's features: the up blocks' outputs
        assert max_rel_err(ours, theirs) <= 1e-4
    moved = torch_unet_outputs(ref, dict(inputs, encoder_hidden_states=inputs["encoder_hidden_states"] + 1))[0]
    assert max_rel_err(out, moved) > 1e-3            # the text reaches the output: the comparison is not vacuous


def test_vae_three_level_built_in_jax_exports_to_the_same_function(tmp_path):
    cfg = VAEConfig(**VAE_CASES["three_level"]["config"])
    abstract = nnx.eval_shape(lambda: AutoencoderKLTemporalDecoder(cfg, rngs=trace_rngs(0)))
    assert_vae_matches_diffusers(export_benchmark.random_weights(abstract, seed=13), "three_level", tmp_path, seed=14)


@pytest.mark.parametrize("c", [CONFIGS[0], CONFIGS[2]], ids=[IDS[0], IDS[2]])
def test_video_former_and_head_built_in_jax_export_to_the_same_function(c):
    """``defi_policy``'s stage-3 tables (what export_torch writes to ``policy/model.safetensors``), loaded strictly
    by the PyTorch modules ``DeFIPolicyTorch`` is built from (``defi_jax.torch_ref.policy``)."""
    vf = export_benchmark.random_weights(nnx.eval_shape(lambda: c.video_former(seed=0)), seed=21)
    head = export_benchmark.random_weights(nnx.eval_shape(lambda: c.head(seed=0)), seed=22)
    tvf, th = c.torch_video_former(), c.torch_head()
    tvf.load_state_dict({k: _t(v) for k, v in defi_policy.video_former_state_dict(vf).items()}, strict=True)
    th.load_state_dict({k: _t(v) for k, v in defi_policy.action_head_state_dict(
        head, with_unused=True, num_video_tokens=c.frames * c.queries).items()}, strict=True)

    feats = np.random.default_rng(23).normal(size=(3, c.frames, c.tokens, c.cond)).astype(np.float32)
    goal, _, latent, actions, noise = _head_inputs(c, seed=24)
    sigma = np.array([1e-3, 0.7, 80.0], np.float32)

    def run(m, feats, goal, latent, actions, sigma, noise):
        vf_m, head_m = m
        video = vf_m(feats)
        context = head_m.encode(goal, video, latent)
        return (video, head_m.denoise(context, actions, sigma),
                head_m.sample(context, noise, num_steps=10, sigma_min=1e-3))

    video, denoised, sampled = _fast(run, nnx.List([vf, head]), feats, goal, latent, actions, sigma, noise)
    with torch.no_grad():
        t_video = tvf(_t(feats))
        _close(video, t_video.numpy())
        _close(denoised, th(t_video, _t(latent), _t(actions), _t(goal), _t(sigma)).numpy())
        ref = tp.sample_ddim(th, t_video, _t(latent), _t(noise) * 80.0, _t(goal),
                             tp.get_sigmas_exponential(10, 1e-3, 80.0))
    _close(sampled, ref.numpy())
    assert np.abs(np.asarray(sampled)).max() > 1e-2


def test_benchmark_case_smoke():
    """``python -m launch.benchmark export --gfdm_full`` on the tiny GFDM, in this process: streamed export, strict
    load back, import into modules and into a workdir; every row timed and measured."""
    rows = export_benchmark.run(["--gfdm_full", "--gfdm_config=tiny", "--in_process"])
    assert [r["what"] for r in rows] == ["gfdm_export", "gfdm_import", "gfdm_import_workdir"]
    for r in rows:
        assert r["case"] == "export" and r["median_s"] > 0 and r["peak_host_bytes"] >= 0
        assert r["weights_bytes"] == rows[0]["weights_bytes"] > 1e6
    assert rows[2]["params_bytes"] == rows[2]["weights_bytes"]    # the weights once: no AdamW moments
    assert rows[2]["written_bytes"] < 1.5 * rows[2]["weights_bytes"]
