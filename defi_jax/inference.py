"""DeFI policy inference: one compiled ``act`` from a policy checkpoint; serialized with ``jax.export``.

    from defi_jax.inference import DeFIPolicy, load_exported
    policy = DeFIPolicy.from_checkpoint("/tmp/policy")                 # latest step of a policy workdir
    actions = policy.act({"primary": rgb_HW3, "wrist": wrist_HW3}, "open the drawer")   # float32 [10, 7]
    batch = policy.act_batch([obs_a, obs_b], ["push the block", "close the drawer"])   # [2, 10, 7]
    policy.export("/tmp/policy_exported")                             # jax.export artifact + weights
    exported = load_exported("/tmp/policy_exported")                  # jax + numpy only, no model code
    actions = exported.act({"primary": rgb_HW3, "wrist": wrist_HW3}, "open the drawer")
    actions, future = policy.act_and_predict_batch([obs_a], ["push the block"], "primary")  # + uint8 [1, T, r, r, 3]
    torch_policy = load_torch("/tmp/defi_torch")                      # launch.export_torch's folder, same act_batch

``act`` runs the frozen GFDM for ``model.gfdm_steps`` denoising steps (1 by default), computes the action
head's encoder once and reuses it across the sampler's steps (``model.sample_steps``, sigma_min
``model.sample_sigma_min``), and unnormalizes with the action statistics stored beside the checkpoint
(``WORKDIR/assets/action_stats.json``). Instructions are tokenized and encoded by the three text towers once
per distinct string (cached). Images are uint8 [H, W, 3], resized to the training resolution when they differ.
Noise is drawn per row: every ``act_batch`` row has a 32-bit noise seed, and a row's actions depend only on its
observation, instruction and seed (the row is computed as a batch of one, vmapped), never on the rows it shares
a call with. Callers that replay episodes pass ``seeds`` (``launch.evaluate`` derives them from the episode and
the replanning step); otherwise the i-th call of a policy built with ``seed`` uses :func:`call_seeds`
``(seed, i, batch)``, so calls are deterministic for a seed, and the JAX, exported and PyTorch backends share
the seeds (the PyTorch one draws other numbers from them: torch's generator is not JAX's).
``act_and_predict_batch`` also returns the GFDM's one-step prediction of a view's future frames (the VAE-decoded
x0 estimate of the single denoising step whose features the actions came from), for evaluation videos and
failure attribution (``defi_jax/evaluation``); only the JAX policy has it (the exported artifact and the
PyTorch folder compute actions only).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence

import numpy as np

_log = logging.getLogger(__name__)

EXPORT_FORMAT = 2   # 2: act takes one uint32 noise seed per row (1: one key per call)


def call_seeds(seed: int, call: int, batch: int) -> np.ndarray:
    """uint32 [batch]: the rows' noise seeds of a policy's ``call``-th batch when the caller passes none (row i's
    seed does not depend on ``batch``)."""
    return np.random.SeedSequence((int(seed), int(call))).generate_state(batch)


def row_seeds(seeds, batch: int) -> np.ndarray:
    """The caller's per-row noise seeds as uint32 [batch], or a clear error."""
    arr = np.asarray(seeds)
    if arr.shape != (batch,) or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"seeds: expected {batch} integers (one per row), got {arr.dtype} {list(arr.shape)}")
    if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(np.uint32).max):
        raise ValueError(f"seeds: each must be in [0, 2**32), got {arr.min()} .. {arr.max()}")
    return arr.astype(np.uint32)


def rowwise(fn):
    """``fn(frames [1, ...], text {k: [1, ...]}, key) -> pytree [1, ...]`` as ``(frames [B, ...], text, seeds uint32
    [B]) -> pytree [B, ...]``: each row computed as a batch of one from ``jax.random.key(seed)`` (vmapped, so one
    batched computation), so a row's draws and result do not depend on the other rows."""
    import jax

    def one(frames, text, seed):
        out = fn(frames[None], jax.tree.map(lambda x: x[None], text), jax.random.key(seed))
        return jax.tree.map(lambda x: x[0], out)

    return jax.vmap(one)


def act_rows(model, frames, text, seeds, *, num_steps: int, sigma_min: float):
    """``DeFIPolicyModel.act`` with one noise seed per row (:func:`rowwise`): what every backend deploys."""
    return rowwise(lambda f, t, k: model.act(f, t, k, num_steps=num_steps, sigma_min=sigma_min))(frames, text, seeds)


def resize_image(image: np.ndarray, size: int, name: str) -> np.ndarray:
    """uint8 [H, W, 3] -> [size, size, 3] (PIL bilinear), as every policy backend resizes its inputs; ``name``
    is the view named in the error."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image {name!r}: expected uint8 [H, W, 3], got {image.dtype} {list(image.shape)}")
    if image.shape[:2] == (size, size):
        return image
    from PIL import Image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))


def stack_views(observations: Sequence[Mapping[str, np.ndarray]], views: Sequence[str], size: int) -> np.ndarray:
    """[B, V, size, size, 3] uint8 from one ``{view: uint8[H, W, 3]}`` per robot; names the missing view."""
    out = []
    for i, obs in enumerate(observations):
        missing = [v for v in views if v not in obs]
        if missing:
            raise KeyError(f"observation {i}: missing view(s) {missing}; the policy reads {list(views)}")
        out.append(np.stack([resize_image(obs[v], size, v) for v in views]))
    return np.stack(out)


def unnormalize(actions: np.ndarray, stats_asset: Mapping) -> np.ndarray:
    """Model outputs -> robot actions with the checkpoint's statistics asset (identity for raw actions)."""
    if not stats_asset.get("normalized", False):
        return np.asarray(actions, np.float32)
    from data_pipelines import actions as actions_lib
    return actions_lib.unnormalize(actions, stats_asset["stats"])


def with_sampler(config, *, gfdm_steps: int | None = None, sample_steps: int | None = None,
                 sample_sigma_min: float | None = None):
    """A copy of ``config`` with ``model.gfdm_steps`` / ``model.sample_steps`` / ``model.sample_sigma_min`` replaced
    where given (inference only: the parameters do not depend on them), checked as training checks them
    (ValueError naming the key)."""
    from defi_jax.policy import stage as policy_stage

    config = config.copy_and_resolve_references()
    for key, value in (("gfdm_steps", gfdm_steps), ("sample_steps", sample_steps),
                       ("sample_sigma_min", sample_sigma_min)):
        if value is not None:
            config.model[key] = value
    policy_stage.validate_sampler(config.model)
    return config


class DeFIPolicy:
    """A policy checkpoint ready to act; build with :meth:`from_checkpoint`."""

    def __init__(self, config, model, stats_asset: Mapping, *, seed: int = 0,
                 compiler_options: Mapping | None = None):
        import jax
        from flax import nnx

        from defi_jax.policy import stage as policy_stage

        self.config = config
        self.views = tuple(config.data.views)
        self.resolution = int(config.data.resolution)
        self.stats_asset = dict(stats_asset)
        self.num_steps = int(config.model.sample_steps)
        self.sigma_min = float(config.model.sample_sigma_min)
        self._graphdef, self._state = nnx.split(model)
        self._tokenizers = policy_stage.tokenizers(config)
        self._seed = int(seed)
        self._compiler_options = dict(compiler_options or {})   # XLA options of the compiled act (tests: fast)
        self._calls = 0
        self._text_cache: dict[str, dict] = {}
        self._act_fns: dict[int, object] = {}
        self._predict_fns: dict[tuple[int, int], object] = {}
        graphdef = self._graphdef

        @jax.jit
        def encode(state, ids):
            return nnx.merge(graphdef, state).encode_instruction(*ids)

        self._encode = encode

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, workdir: str, *, step: int | None = None, ema: bool = False, seed: int = 0,
                        gfdm_steps: int | None = None, sample_steps: int | None = None,
                        sample_sigma_min: float | None = None,
                        compiler_options: Mapping | None = None) -> DeFIPolicy:
        """Reads only the parameters of ``workdir``'s checkpoint (latest ``step``), its config and assets.
        ``gfdm_steps``, ``sample_steps`` and ``sample_sigma_min`` replace the checkpoint config's
        ``model.gfdm_steps``, ``model.sample_steps`` and ``model.sample_sigma_min`` (inference only).
        ``compiler_options``: XLA options of the compiled act (default XLA's own; tests pass fast CPU compiles)."""
        from defi_jax import paths, trainer

        workdir = paths.abspath(workdir)
        config = trainer.checkpoint_config(workdir, step)
        if config.get("stage") != "policy":
            raise ValueError(f"{workdir}: a {config.get('stage')!r} checkpoint, not a policy (configs/policy.py)")
        config = with_sampler(config, gfdm_steps=gfdm_steps, sample_steps=sample_steps,
                              sample_sigma_min=sample_sigma_min)
        asset = paths.join(workdir, "assets", "action_stats.json")
        if not paths.exists(asset):
            raise FileNotFoundError(f"{asset}: the policy's action statistics are missing (written when training "
                                    f"starts); without them actions cannot be unnormalized")
        stats = json.loads(paths.read_text(asset))
        # One device: a policy acts with batch sizes of a few robots, and every array then has one placement.
        import jax
        import ml_collections

        from defi_jax import sharding
        mesh = sharding.make_mesh(ml_collections.ConfigDict({"shape": (1, 1, 1)}), devices=jax.devices()[:1])
        model = trainer.restore_model(config, workdir, step=step, ema=ema, mesh=mesh)
        return cls(config, model, stats, seed=seed, compiler_options=compiler_options)

    # ---- acting ---------------------------------------------------------------------------------
    def encode_instructions(self, instructions: Sequence[str]) -> dict:
        """Text-tower outputs for a batch of instructions, each string encoded once and cached."""
        import jax.numpy as jnp

        rows = []
        for text in instructions:
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"instruction must be a non-empty string, got {text!r}")
            if text not in self._text_cache:
                ids = []
                for tok in self._tokenizers:
                    i, m = tok(text)
                    ids += [np.asarray(i, np.int32)[None], np.asarray(m, np.int32)[None]]
                self._text_cache[text] = self._encode(self._state, tuple(ids))
            rows.append(self._text_cache[text])
        return {k: jnp.concatenate([r[k] for r in rows]) for k in rows[0]}

    def _act_fn(self, batch: int):
        if batch not in self._act_fns:
            from flax import nnx

            graphdef, steps, sigma_min = self._graphdef, self.num_steps, self.sigma_min

            def act(state, frames, text, seeds):
                return act_rows(nnx.merge(graphdef, state), frames, text, seeds, num_steps=steps,
                                sigma_min=sigma_min)

            self._act_fns[batch] = self._compile(act, batch)
        return self._act_fns[batch]

    def _predict_fn(self, batch: int, view: int):
        """``act`` that also decodes the GFDM's one-step x0 estimate of view ``view``'s future."""
        if (batch, view) not in self._predict_fns:
            import jax
            import jax.numpy as jnp
            from flax import nnx

            graphdef, steps, sigma_min = self._graphdef, self.num_steps, self.sigma_min

            def act_and_predict(model, frames_BVHW3, text, key):
                # DeFIPolicyModel.act / .features, keeping the x0 estimate of the very UNet step whose features
                # the policy reads (same key split, same noise): the prediction is what the actions came from.
                k_feat, k_noise = jax.random.split(key)
                B, V = frames_BVHW3.shape[:2]
                frames_NHW3 = frames_BVHW3.reshape(B * V, *frames_BVHW3.shape[2:]).astype(jnp.float32) / 127.5 - 1
                feats_NThwC, latents_NThwc = model.gfdm.one_step_features(
                    frames_NHW3, jnp.repeat(text["gfdm"], V, axis=0), k_feat, denoise_steps=model.gfdm_steps)
                N, T, h, w, C = feats_NThwC.shape
                context, _ = model.context(feats_NThwC.reshape(B, V, T, h * w, C), text)
                noise = model.head.initial_noise(k_noise, B)
                actions = model.head.sample(context, noise, num_steps=steps, sigma_min=sigma_min)
                latents_BThwc = latents_NThwc.reshape(B, V, *latents_NThwc.shape[1:])[:, view]
                future_BTHW3 = model.gfdm.decode(latents_BThwc)                    # [-1, 1]
                return actions, jnp.clip(jnp.round((future_BTHW3 + 1.0) * 127.5), 0, 255).astype(jnp.uint8)

            def rows(state, frames, text, seeds):
                model = nnx.merge(graphdef, state)
                return rowwise(lambda f, t, k: act_and_predict(model, f, t, k))(frames, text, seeds)

            self._predict_fns[(batch, view)] = self._compile(rows, batch)
        return self._predict_fns[(batch, view)]

    def _compile(self, fn, batch: int):
        import jax

        frames = jax.ShapeDtypeStruct((batch, len(self.views), self.resolution, self.resolution, 3), np.uint8)
        text = jax.eval_shape(lambda: self.encode_instructions(["a"] * batch))
        seeds = jax.ShapeDtypeStruct((batch,), np.uint32)
        return jax.jit(fn).lower(self._state, frames, text, seeds).compile(self._compiler_options or None)

    def _seeds(self, seeds, batch: int) -> np.ndarray:
        """The call's row seeds: the caller's, or :func:`call_seeds` of this policy's seed and call count."""
        out = call_seeds(self._seed, self._calls, batch) if seeds is None else row_seeds(seeds, batch)
        self._calls += 1
        return out

    def act_batch(self, observations: Sequence[Mapping[str, np.ndarray]], instructions: Sequence[str],
                  *, seeds: Sequence[int] | None = None, normalized: bool = False) -> np.ndarray:
        """float32 [B, horizon, action_dim]: one chunk per robot (``normalized=True``: the model's units).
        ``seeds``: one noise seed per row (default: :func:`call_seeds` of the policy's seed and call count)."""
        if len(observations) != len(instructions):
            raise ValueError(f"{len(observations)} observations but {len(instructions)} instructions")
        frames = stack_views(observations, self.views, self.resolution)
        text = self.encode_instructions(instructions)
        seeds = self._seeds(seeds, len(frames))
        out = np.asarray(self._act_fn(len(frames))(self._state, frames, text, seeds), np.float32)
        return out if normalized else unnormalize(out, self.stats_asset)

    def act(self, images: Mapping[str, np.ndarray], instruction: str) -> np.ndarray:
        """float32 [horizon, action_dim] unnormalized actions for one observation."""
        return self.act_batch([images], [instruction])[0]

    def act_and_predict_batch(self, observations: Sequence[Mapping[str, np.ndarray]], instructions: Sequence[str],
                              view: str | None = None, *, seeds: Sequence[int] | None = None,
                              normalized: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """``act_batch``'s actions (the same draws for the same seeds; the i-th call of either acts alike) and the
        GFDM's one-step predicted future of ``view`` (default: the first, the static camera) that they came from:
        uint8 [B, T, resolution, resolution, 3], frame 0 the GFDM's rendering of the observed frame, then the
        predicted next frames (the GFDM's ``data.frame_stride`` apart). Compiled once per batch size and view,
        apart from ``act_batch``, which stays as fast as without it."""
        view = self.views[0] if view is None else view
        if view not in self.views:
            raise ValueError(f"view {view!r}: the policy reads {list(self.views)}")
        if len(observations) != len(instructions):
            raise ValueError(f"{len(observations)} observations but {len(instructions)} instructions")
        frames = stack_views(observations, self.views, self.resolution)
        text = self.encode_instructions(instructions)
        fn = self._predict_fn(len(frames), self.views.index(view))
        actions, future = fn(self._state, frames, text, self._seeds(seeds, len(frames)))
        actions = np.asarray(actions, np.float32)
        return (actions if normalized else unnormalize(actions, self.stats_asset)), np.asarray(future)

    # ---- serialization --------------------------------------------------------------------------
    def export(self, path: str, *, platforms: Sequence[str] | None = None) -> dict:
        """Writes a ``jax.export`` artifact: ``act.jax`` (symbolic batch), ``encode.jax`` (one instruction's
        text towers), ``weights.npz``, the tokenizer files, the statistics and ``manifest.json``. A local folder
        is written under a temporary name and renamed when complete; a ``gs://`` one is staged locally and
        uploaded with ``manifest.json`` last. Returns the manifest."""
        import datetime
        import jax
        from jax import export as jax_export

        platforms = tuple(platforms or _default_platforms())
        leaves, treedef = jax.tree.flatten(self._state)
        graphdef, steps, sigma_min, merge = self._graphdef, self.num_steps, self.sigma_min, _merge
        tree = treedef

        to_robot = _unnormalizer(self.stats_asset)

        def act(flat, frames, text, seeds):
            return to_robot(act_rows(merge(graphdef, tree, flat), frames, text, seeds, num_steps=steps,
                                     sigma_min=sigma_min))

        def encode(flat, ids):
            return merge(graphdef, tree, flat).encode_instruction(*ids)

        flat_spec = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves]
        (b,) = jax_export.symbolic_shape("b")
        r, V = self.resolution, len(self.views)
        text1 = jax.eval_shape(lambda: self.encode_instructions(["a"]))
        text_spec = {k: jax.ShapeDtypeStruct((b, *v.shape[1:]), v.dtype) for k, v in text1.items()}
        frames_spec = jax.ShapeDtypeStruct((b, V, r, r, 3), np.uint8)
        seeds_spec = jax.ShapeDtypeStruct((b,), np.uint32)
        ids_spec = tuple(jax.ShapeDtypeStruct((1, len(np.asarray(t("a")[0]))), np.int32)
                         for t in self._tokenizers for _ in range(2))
        exp_act = jax_export.export(jax.jit(act), platforms=platforms)(flat_spec, frames_spec, text_spec, seeds_spec)
        exp_enc = jax_export.export(jax.jit(encode), platforms=platforms)(flat_spec, ids_spec)

        from defi_jax import paths
        with paths.staged_dir(path) as tmp:
            with open(os.path.join(tmp, "act.jax"), "wb") as f:
                f.write(exp_act.serialize())
            with open(os.path.join(tmp, "encode.jax"), "wb") as f:
                f.write(exp_enc.serialize())
            np.savez(os.path.join(tmp, "weights.npz"), **{f"p{i:05d}": np.asarray(x) for i, x in enumerate(leaves)})
            manifest = {
                "format": EXPORT_FORMAT, "what": "defi-jax DeFI policy", "jax_version": jax.__version__,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "platforms": list(platforms), "views": list(self.views), "resolution": r,
                "horizon": int(self.config.model.horizon), "action_dim": int(self.config.model.action_dim),
                "num_weights": len(leaves), "text_keys": sorted(text1),
                "tokenizers": _tokenizer_spec(self.config), "action_stats": self.stats_asset,
            }
            with open(os.path.join(tmp, "manifest.json"), "w") as f:
                json.dump(manifest, f, indent=1)
        return manifest


def _unnormalizer(stats_asset: Mapping):
    """``data_pipelines.actions.unnormalize`` in jnp, so the exported computation returns robot actions."""
    import jax.numpy as jnp

    if not stats_asset.get("normalized", False):
        return lambda a: a
    lo = jnp.asarray(stats_asset["stats"]["q01"], jnp.float32)[:6]
    hi = jnp.asarray(stats_asset["stats"]["q99"], jnp.float32)[:6]

    def to_robot(a):
        pos = (jnp.clip(a[..., :6], -1, 1) + 1) / 2 * (hi - lo) + lo
        grip = (jnp.clip(a[..., 6:], -1, 1) + 1) / 2
        return jnp.concatenate([pos, grip], axis=-1)

    return to_robot


def _merge(graphdef, treedef, flat):
    import jax
    from flax import nnx
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, list(flat)))


def _default_platforms() -> list[str]:
    """cpu, cuda and tpu lowerings in one artifact where this jax can lower them."""
    return ["cpu", "cuda", "tpu"]


def _tokenizer_spec(config) -> list[dict]:
    """How the exported artifact tokenizes: one entry per text tower (gfdm, goal, gidm)."""
    m = config.model
    init = config.get("init", {})
    clip = init.get("tokenizer_path", "") or init.get("clip_path", "")
    goal_len = int(dict(m.goal_text)["max_position_embeddings"])
    clip_kind = {"kind": "clip_bpe", "path": clip} if clip else {"kind": "clip_bytes"}
    gidm = ({"kind": "gidm_bytes"} if m.gidm.text_encoder == "bytes"
            else {"kind": "t5_sentencepiece", "path": m.gidm.tokenizer_path})
    return [dict(clip_kind, max_length=int(m.gfdm.text_tokens)), dict(clip_kind, max_length=goal_len),
            dict(gidm, max_length=int(m.gidm.max_text_len))]


# ---------------------------------------------------------------------------------------------------------
# Loading an exported artifact: jax + numpy only (no flax, no model code)
# ---------------------------------------------------------------------------------------------------------

def _clip_bytes(text: str, max_length: int):
    """The byte tokenizer of tiny configs (``defi_jax.gfdm.stage.ByteTokenizer``): bos 1, eos = pad 2."""
    seq = [1, *(b + 3 for b in " ".join(text.split()).lower().encode()), 2]
    if len(seq) > max_length:
        seq = seq[:max_length - 1] + [2]
    ids = np.full((max_length,), 2, np.int32)
    mask = np.zeros((max_length,), np.int32)
    ids[:len(seq)], mask[:len(seq)] = seq, 1
    return ids, mask


def _gidm_bytes(text: str, max_length: int):
    """``defi_jax.gidm.model.byte_tokenize``: id = byte + 1, 0 = pad."""
    raw = text.encode("utf-8")[:max_length] or b" "
    ids = np.zeros((max_length,), np.int32)
    ids[:len(raw)] = np.frombuffer(raw, np.uint8).astype(np.int32) + 1
    return ids, (ids > 0).astype(np.int32)


def _make_tokenizer(spec: dict):
    n = int(spec["max_length"])
    if spec["kind"] == "clip_bytes":
        return lambda t: _clip_bytes(t, n)
    if spec["kind"] == "gidm_bytes":
        return lambda t: _gidm_bytes(t, n)
    if spec["kind"] == "clip_bpe":
        from defi_jax.models.clip_tokenizer import CLIPTokenizer   # pure Python
        tok = CLIPTokenizer.from_folder(spec["path"])
        return lambda t: tuple(a[0] for a in tok([t], max_length=n))
    if spec["kind"] == "t5_sentencepiece":
        from defi_jax.models.t5_tokenizer import T5Tokenizer       # sentencepiece
        tok = T5Tokenizer(spec["path"])
        return lambda t: tuple(np.asarray(a, np.int32) for a in tok.encode_padded(t, n))
    raise ValueError(f"unknown tokenizer kind {spec['kind']!r} in the export manifest")


class ExportedPolicy:
    """An exported policy folder, runnable with jax and numpy only (see :func:`load_exported`)."""

    def __init__(self, path: str):
        import jax
        from jax import export as jax_export

        from defi_jax import paths

        self.path = path
        manifest_file = paths.join(path, "manifest.json")
        if not paths.exists(manifest_file):
            raise FileNotFoundError(f"{manifest_file}: not a defi-jax exported policy (no manifest.json)")
        self.manifest = json.loads(paths.read_text(manifest_file))
        if self.manifest.get("format") != EXPORT_FORMAT:
            raise ValueError(f"{manifest_file}: export format {self.manifest.get('format')!r}; this defi-jax reads "
                             f"format {EXPORT_FORMAT} (re-export the checkpoint with this version)")
        platform = jax.default_backend()
        if platform not in self.manifest["platforms"]:
            raise ValueError(f"{path}: exported for {self.manifest['platforms']}, this jax runs on {platform!r}")
        try:
            self._act = jax_export.deserialize(bytearray(paths.read_bytes(paths.join(path, "act.jax"))))
            self._encode = jax_export.deserialize(bytearray(paths.read_bytes(paths.join(path, "encode.jax"))))
        except Exception as e:   # a truncated or foreign file
            raise ValueError(f"{path}: cannot read the exported computation ({type(e).__name__}: {e}); the "
                             f"artifact is damaged or was written by an incompatible jax "
                             f"({self.manifest.get('jax_version')}, this is {jax.__version__})") from e
        with paths.open(paths.join(path, "weights.npz"), "rb") as f, np.load(f, allow_pickle=False) as w:
            self._weights = [jax.device_put(w[f"p{i:05d}"]) for i in range(self.manifest["num_weights"])]
        self._tokenizers = [_make_tokenizer(s) for s in self.manifest["tokenizers"]]
        self.views = tuple(self.manifest["views"])
        self.resolution = int(self.manifest["resolution"])
        self._cache: dict[str, dict] = {}
        self._calls = 0

    def _text(self, instructions: Sequence[str]) -> dict:
        rows = []
        for text in instructions:
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"instruction must be a non-empty string, got {text!r}")
            if text not in self._cache:
                ids = []
                for tok in self._tokenizers:
                    i, m = tok(text)
                    ids += [np.asarray(i, np.int32)[None], np.asarray(m, np.int32)[None]]
                self._cache[text] = self._encode.call(self._weights, tuple(ids))
            rows.append(self._cache[text])
        return {k: np.concatenate([np.asarray(r[k]) for r in rows]) for k in rows[0]}

    def act_batch(self, observations, instructions, *, seeds: Sequence[int] | None = None,
                  seed: int = 0) -> np.ndarray:
        """float32 [B, horizon, action_dim] robot actions. ``seeds``: one noise seed per row, the draws of
        ``DeFIPolicy.act_batch`` with the same seeds; default :func:`call_seeds` ``(seed, i, B)`` on the i-th call
        (what a ``DeFIPolicy`` built with ``seed`` draws on its i-th)."""
        if len(observations) != len(instructions):
            raise ValueError(f"{len(observations)} observations but {len(instructions)} instructions")
        frames = stack_views(observations, self.views, self.resolution)
        seeds = call_seeds(seed, self._calls, len(frames)) if seeds is None else row_seeds(seeds, len(frames))
        self._calls += 1
        return np.asarray(self._act.call(self._weights, frames, self._text(instructions), seeds), np.float32)

    def act(self, images, instruction: str) -> np.ndarray:
        return self.act_batch([images], [instruction])[0]


def load_exported(path: str) -> ExportedPolicy:
    """Reads a folder written by :meth:`DeFIPolicy.export` (local or ``gs://``); refuses one it cannot read,
    saying why."""
    from defi_jax import paths
    return ExportedPolicy(paths.abspath(path))


# ---------------------------------------------------------------------------------------------------------
# A PyTorch deployment folder behind the same batch interface (torch + the torch extra; no jax needed)
# ---------------------------------------------------------------------------------------------------------

class TorchPolicy:
    """A folder of ``python -m launch.export_torch`` as ``act_batch``: :class:`defi_jax_torch.DeFIPolicyTorch`
    acts on one observation at a time, so a batch runs row by row, each row's noise drawn from a
    ``torch.Generator`` seeded with the row's seed (the caller's ``seeds``, or :func:`call_seeds` of ``seed``
    and the call count, as the JAX backends)."""

    def __init__(self, path: str, *, seed: int = 0, device=None):
        import torch
        from defi_jax_torch import DeFIPolicyTorch

        self.path = path
        self.policy = DeFIPolicyTorch.from_pretrained(path, device=device)
        self.views = self.policy.views
        self.resolution = self.policy.resolution
        self.device = str(self.policy.time_pos_emb.device)
        self._seed, self._calls = int(seed), 0

    def act_batch(self, observations, instructions, *, seeds: Sequence[int] | None = None) -> np.ndarray:
        """float32 [B, horizon, action_dim] robot actions; ``seeds``: one noise seed per row."""
        import torch
        if len(observations) != len(instructions):
            raise ValueError(f"{len(observations)} observations but {len(instructions)} instructions")
        n = len(observations)
        seeds = call_seeds(self._seed, self._calls, n) if seeds is None else row_seeds(seeds, n)
        self._calls += 1
        return np.stack([self.policy.act(o, t, generator=torch.Generator().manual_seed(int(s)))
                         for o, t, s in zip(observations, instructions, seeds)])

    def act(self, images, instruction: str) -> np.ndarray:
        return self.act_batch([images], [instruction])[0]


def load_torch(path: str, *, seed: int = 0, device=None) -> TorchPolicy:
    """Reads a local PyTorch folder written by ``python -m launch.export_torch`` (see :class:`TorchPolicy`)."""
    from defi_jax import paths
    if paths.is_remote(path):   # diffusers / transformers / torch read local folders
        raise ValueError(f"{path}: a PyTorch folder is read from local disk; copy it first "
                         f"(gcloud storage cp -r {path} .)")
    return TorchPolicy(os.path.abspath(path), seed=seed, device=device)
