"""A DeFI policy behind allenai's vla-evaluation-harness (``vla-eval``): CALVIN, SimplerEnv and LIBERO.

    from defi_jax.evaluation import vla_eval
    vla_eval.VlaEvalServer(policy, vla_eval.benchmark("calvin"), port=8000).serve_forever()
    # or: python -m launch.serve --checkpoint=DIR --protocol=vla-eval --benchmark=calvin [--calvin_ep_len=720]
    # then, in the harness's checkout (server.url: ws://HOST:8000):
    #     vla-eval run -c configs/benchmarks/calvin/eval.yaml

The simulators run in the harness's own containers; this module is the model-server end of its websocket.
Every message field below is taken from the harness's sources (github.com/allenai/vla-evaluation-harness at
e1ee9adf, files under ``src/vla_eval/``):

- Frames are binary msgpack maps ``{"type", "payload", "seq", "timestamp"}`` (``protocol/messages.py``,
  ``pack_message`` with ``use_bin_type=True``); ``type`` is one of ``hello``, ``observation``, ``action``,
  ``episode_start``, ``episode_end``, ``error``. An array is ``{"__ndarray__": True, "data", "dtype", "shape"}``
  (``protocol/numpy_codec.py``: str keys, unlike openpi's bytes keys); an HWC uint8 image is
  ``{"__image__": True, "format": "raw" | "png" | "jpeg", "data", "shape"[, "dtype"]}`` (``protocol/image_codec.py``;
  the harness sends PNG by default).
- ``hello`` (client first, ``connection.py``) is answered with a ``hello`` of the same ``seq`` whose payload
  carries ``protocol_version``, ``model_server``, ``capabilities``, ``observation_params`` (merged by the
  orchestrator into the benchmark's constructor arguments its config does not set: here ``send_wrist_image``,
  CALVIN's ``ep_len``, SimplerEnv's ``gripper_mode``), ``action_spec`` and ``observation_spec``
  (``DimSpec.to_dict`` dicts, ``specs.py``; the orchestrator warns on a mismatch) (``model_servers/serve.py``).
- ``episode_start`` (payload ``{"task": {...}, "recording"?: {...}}``, ``runners/sync_runner.py``) and
  ``episode_end`` get no reply; they reset the connection's action plan.
- ``observation`` (payload ``{"images": {camera: uint8[H, W, 3]}, "task_description": str, "states"?, ...,
  "episode_restart"?: True}``, each benchmark's ``make_obs``) is answered by an ``action`` with the same ``seq``
  and payload ``{"actions": float32[7]}``: ONE action per environment step (the benchmarks' ``step`` read the
  first 7 numbers of ``"actions"``). The policy's chunk is kept per connection and its first
  ``steps_per_chunk`` actions are played out before the policy is asked again, as ``PredictModelServer`` does with
  ``chunk_size`` (``model_servers/predict.py``); ``episode_restart`` (CALVIN's next subtask) empties the plan.
- A request the server cannot act on gets ``error`` with payload ``{"error": "observation_failed: <message naming
  the field>"}`` and the same ``seq``; the connection stays open (``model_servers/serve.py``).

What a benchmark sends and expects, and how the policy's 7-D actions (as our data pipelines feed them in
fine-tuning) become the benchmark's (:data:`BENCHMARKS`):

- ``calvin`` (``benchmarks/calvin/benchmark.py``, config ``configs/benchmarks/calvin/eval.yaml``: ABC->D, 1000
  sequences x 5 chained subtasks, 360 steps per subtask; ``ep_len=720`` is offered as a labelled, non-official
  option): cameras ``rgb_static`` -> ``primary``, ``rgb_gripper`` -> ``wrist``; the harness adds each action to
  the last commanded pose (delta mode), in metres / radians, gripper > 0 open. The policy predicts CALVIN's
  ``rel_actions`` (``data_pipelines/calvin.py``: deltas scaled to [-1, 1] by the robot's ``max_rel_pos`` 0.02 m
  and ``max_rel_orn`` 0.05 rad, gripper -1 close / 1 open), so position x 0.02, rotation x 0.05, gripper as is.
- ``simpler`` (``benchmarks/simpler/benchmark.py``; Google Robot visual matching
  ``configs/benchmarks/simpler/google_robot_vm.yaml``, variant aggregation ``google_robot_*_va.yaml``, whose
  variants the harness runs as separate benchmarks; :func:`simpler_variant_aggregation` turns their aggregate
  JSONs into each task's VA number, the mean over its variants):
  camera ``primary`` -> ``primary``; action [delta xyz, rotation vector (the controller applies
  ``Rotation.from_rotvec``), gripper]. With ``gripper_mode="sticky"`` (asked for in ``observation_params``, as the
  harness's GR00T Google Robot config does) the gripper is openness in [0, 1] (0 = close, 1 = open) turned into
  the robot's relative, 15-step sticky command. The policy predicts OXE fractal actions
  (``data_pipelines/oxe_table.py``: roll/pitch/yaw deltas, gripper 1 = open, 0 = closed), so roll/pitch/yaw ->
  rotation vector (SimplerEnv's own RT-1 / Octo adapters do the same), gripper as is.
- ``libero`` (``benchmarks/libero/benchmark.py``, ``configs/benchmarks/libero/{spatial,object,goal,10,all}.yaml``;
  images already flipped upright by the harness): cameras ``agentview`` -> ``primary``, ``wrist`` -> ``wrist``;
  action [delta xyz, delta axis-angle, gripper < 0 open / >= 0 close]. The policy predicts LIBERO's actions as
  ``data_pipelines/lerobot.py`` standardizes them (first six as recorded, gripper 1 = open, 0 = closed), so the
  gripper becomes 1 - 2 g.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import logging
import re
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import msgpack
import numpy as np

from defi_jax import serving

_log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1                     # vla_eval.protocol.messages.PROTOCOL_VERSION
MESSAGE_TYPES = ("hello", "observation", "action", "episode_start", "episode_end", "error")
CALVIN_EP_LEN = 360                      # the official steps per subtask (vla_eval calvin EP_LEN)
CALVIN_MAX_REL_POS, CALVIN_MAX_REL_ORN = 0.02, 0.05   # calvin_env robot: rel_actions = clip(delta / max, -1, 1)


# ---------------------------------------------------------------------------------------------------------
# Wire format (vla_eval.protocol)
# ---------------------------------------------------------------------------------------------------------

def _encode(obj):
    if isinstance(obj, np.ndarray):
        obj = np.ascontiguousarray(obj)
        return {"__ndarray__": True, "data": obj.tobytes(), "dtype": obj.dtype.str, "shape": list(obj.shape)}
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def _decode(obj):
    if not isinstance(obj, dict):
        return obj
    if "__image__" in obj:
        if obj.get("format") == "raw":
            return np.frombuffer(obj["data"], np.dtype(obj["dtype"])).reshape(obj["shape"]).copy()
        from PIL import Image
        return np.asarray(Image.open(io.BytesIO(obj["data"])).convert("RGB"))
    if "__ndarray__" in obj:
        dtype = np.dtype(obj["dtype"])
        if dtype.kind not in "biuf":
            raise ValueError(f"numpy dtype {dtype} is not accepted (bool, int, uint, float only)")
        return np.frombuffer(obj["data"], dtype).reshape(obj["shape"]).copy()
    return obj


def pack_message(type_: str, payload: Mapping[str, Any], seq: int = 0) -> bytes:
    """One vla-eval frame: ``{"type", "payload", "seq", "timestamp"}`` as msgpack (arrays as ``__ndarray__``)."""
    if type_ not in MESSAGE_TYPES:
        raise ValueError(f"message type {type_!r}: one of {MESSAGE_TYPES}")
    return msgpack.packb({"type": type_, "payload": dict(payload), "seq": int(seq), "timestamp": time.time()},
                         default=_encode, use_bin_type=True)


def unpack_message(data: bytes) -> dict:
    """The map of one frame (arrays and ``__image__`` images decoded); ``ValueError`` naming what is wrong."""
    if isinstance(data, str):
        raise ValueError("frame: expected a binary msgpack frame, got a text frame")
    try:
        raw = msgpack.unpackb(data, object_hook=_decode, raw=False)
    except Exception as e:
        raise ValueError(f"frame: not msgpack ({type(e).__name__}: {e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"frame: expected a map, got {type(raw).__name__}")
    missing = [k for k in ("type", "payload", "seq", "timestamp") if k not in raw]
    if missing:
        raise ValueError(f"frame: missing {missing}; it has {sorted(map(str, raw))}")
    if raw["type"] not in MESSAGE_TYPES:
        raise ValueError(f"type: {raw['type']!r} is not one of {MESSAGE_TYPES}")
    if not isinstance(raw["payload"], dict):
        raise ValueError(f"payload: expected a map, got {type(raw['payload']).__name__}")
    return raw


# ---------------------------------------------------------------------------------------------------------
# Benchmarks
# ---------------------------------------------------------------------------------------------------------

def _dim(name: str, dims: int, fmt: str, value_range=None) -> dict:
    """A ``vla_eval.specs.DimSpec.to_dict()``."""
    return {"name": name, "dims": dims, "format": fmt, **({"range": list(value_range)} if value_range else {})}


_IMAGE, _LANGUAGE = _dim("image", 0, "rgb_hwc_uint8"), _dim("language", 0, "language")


def _calvin_action(a: np.ndarray) -> np.ndarray:
    return np.concatenate([a[:3] * CALVIN_MAX_REL_POS, a[3:6] * CALVIN_MAX_REL_ORN, a[6:7]])


def _simpler_action(a: np.ndarray) -> np.ndarray:
    from scipy.spatial.transform import Rotation
    rotvec = Rotation.from_euler("xyz", a[3:6]).as_rotvec()   # transforms3d's 'sxyz' (static axes), as SimplerEnv
    return np.concatenate([a[:3], rotvec, a[6:7]])


def _libero_action(a: np.ndarray) -> np.ndarray:
    return np.concatenate([a[:6], [1.0 - 2.0 * a[6]]])


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """How one harness benchmark talks: its cameras, its action convention, the settings we ask of it."""

    name: str
    cameras: Mapping[str, str]                    # harness camera key -> our view name
    to_harness: Callable[[np.ndarray], np.ndarray]  # one policy action float[7] -> the benchmark's float[7]
    action_spec: Mapping[str, dict]
    observation_params: Mapping[str, Any]         # merged into the benchmark's constructor arguments
    configs: tuple[str, ...]                      # the harness's configs this profile is meant for
    protocol: str                                 # one line stamped into the HELLO reply and the results

    def camera_of(self, view: str) -> str | None:
        return next((c for c, v in self.cameras.items() if v == view), None)


def benchmark(name: str, *, calvin_ep_len: int = CALVIN_EP_LEN) -> Benchmark:
    """The profile of a harness benchmark: ``calvin``, ``simpler`` (Google Robot VM / VA) or ``libero``."""
    if name == "calvin":
        if calvin_ep_len < 1:
            raise ValueError(f"calvin_ep_len={calvin_ep_len}: must be >= 1 (official: {CALVIN_EP_LEN})")
        label = "official" if calvin_ep_len == CALVIN_EP_LEN else f"NOT the official {CALVIN_EP_LEN}"
        return Benchmark(
            "calvin", {"rgb_static": "primary", "rgb_gripper": "wrist"}, _calvin_action,
            {"position": _dim("position", 3, "delta_xyz", (-1, 1)),
             "rotation": _dim("rotation", 3, "euler_xyz", (-3.15, 3.15)),
             "gripper": _dim("gripper", 1, "binary_close_negative", (-1, 1))},
            {"ep_len": int(calvin_ep_len)}, ("configs/benchmarks/calvin/eval.yaml",),
            f"CALVIN ABC->D, 1000 sequences x 5 subtasks, {calvin_ep_len} steps per subtask ({label}); rel_actions "
            f"x ({CALVIN_MAX_REL_POS} m, {CALVIN_MAX_REL_ORN} rad) as deltas")
    if name == "simpler":
        return Benchmark(
            "simpler", {"primary": "primary"}, _simpler_action,
            {"position": _dim("position", 3, "delta_xyz", (-1, 1)),
             "rotation": _dim("rotation", 3, "axis_angle", (-3.15, 3.15)),
             "gripper": _dim("gripper", 1, "continuous_01", (0, 1))},
            {"gripper_mode": "sticky"}, ("configs/benchmarks/simpler/google_robot_vm.yaml",
                 *(f"configs/benchmarks/simpler/google_robot_{t}_va.yaml"
                   for t in ("pick_coke_can", "move_near", "drawer", "put_in_drawer"))),
            "SimplerEnv Google Robot, visual matching (google_robot_vm.yaml) and variant aggregation "
            "(google_robot_*_va.yaml, a task's VA score = mean over its variants); fractal roll/pitch/yaw -> "
            "rotation vector, gripper openness in [0, 1] with the Google Robot's sticky gripper")
    if name == "libero":
        return Benchmark(
            "libero", {"agentview": "primary", "wrist": "wrist"}, _libero_action,
            {"position": _dim("position", 3, "delta_xyz", (-1, 1)),
             "rotation": _dim("rotation", 3, "axis_angle", (-3.15, 3.15)),
             "gripper": _dim("gripper", 1, "binary_close_positive", (-1, 1))},
            {}, tuple(f"configs/benchmarks/libero/{s}.yaml" for s in ("spatial", "object", "goal", "10", "all")),
            "LIBERO (spatial / object / goal / 10), harness-flipped 256 px images; gripper 1 - 2 open")
    raise ValueError(f"benchmark {name!r}: one of {BENCHMARKS}")


BENCHMARKS = ("calvin", "simpler", "libero")


_VARIANT = re.compile(r"(?P<task>.+?)_va(?:_(?P<drawer>open|close))?(?:_|$)")


def simpler_variant_aggregation(aggregates: Sequence[Mapping[str, Any]]) -> dict[str, dict]:
    """SimplerEnv variant aggregation from the harness's per-benchmark aggregate JSONs (``vla-eval merge``
    output, ``results/merge.py``: ``benchmark``, ``config.subname``, ``mean_success``, ``num_episodes_total``)
    of a ``google_robot_*_va.yaml`` run: per task, the mean of its variants' success rates (SimplerEnv's VA
    number), with the variant and episode counts. A task is the subname before ``_va`` (drawer variants split
    into ``drawer_open`` / ``drawer_close``); a subname without ``_va`` (visual matching) is left out."""
    groups: dict[str, list[tuple[float, int]]] = {}
    for body in aggregates:
        subname = (body.get("config") or {}).get("subname") or str(body.get("benchmark", "")).split("_", 1)[-1]
        match = _VARIANT.match(subname or "")
        if match is None:
            continue
        if "mean_success" not in body:
            raise ValueError(f"aggregate {body.get('benchmark')!r}: no mean_success (keys {sorted(body)})")
        task = match["task"] + (f"_{match['drawer']}" if match["drawer"] else "")
        groups.setdefault(task, []).append((float(body["mean_success"]), int(body.get("num_episodes_total", 0))))
    return {task: {"success": float(np.mean([r for r, _ in rows])), "variants": len(rows),
                   "episodes": sum(n for _, n in rows)} for task, rows in sorted(groups.items())}


# ---------------------------------------------------------------------------------------------------------
# Server
# ---------------------------------------------------------------------------------------------------------

class VlaEvalServer(serving.PolicyServer):
    """:class:`defi_jax.serving.PolicyServer` speaking vla-eval's protocol (module doc) for ``bench``.

    Batching, warm-up, ``/health``, graceful stop and the thread model are the base class's. Each connection
    (one harness shard) keeps its own action plan; ``steps_per_chunk`` actions of each chunk (default: all of
    them) are played before the policy is asked again.
    """

    def __init__(self, policy, bench: Benchmark, *, steps_per_chunk: int | None = None, **kwargs):
        super().__init__(policy, **kwargs)
        self.bench = bench
        unserved = [v for v in self.views if bench.camera_of(v) is None]
        if unserved:
            raise ValueError(f"benchmark {bench.name!r} sends cameras {list(bench.cameras)} "
                             f"(-> views {list(bench.cameras.values())}); the policy also reads {unserved}")
        if steps_per_chunk is not None and steps_per_chunk < 1:
            raise ValueError(f"steps_per_chunk={steps_per_chunk}: must be >= 1")
        self.steps_per_chunk = steps_per_chunk

    def _prepare(self) -> dict:
        metadata = super()._prepare()
        if metadata["action_dim"] != 7:
            raise ValueError(f"{self.description}: action_dim {metadata['action_dim']}; benchmark "
                             f"{self.bench.name!r} takes 7-D actions")
        steps = self.steps_per_chunk or metadata["horizon"]
        if steps > metadata["horizon"]:
            raise ValueError(f"steps_per_chunk={steps} exceeds the policy's horizon {metadata['horizon']}")
        self.steps_per_chunk = steps
        params = dict(self.bench.observation_params)
        if self.bench.camera_of("wrist") is not None:   # CALVIN and LIBERO send their wrist camera on request
            params["send_wrist_image"] = "wrist" in self.views
        return {**metadata, "protocol": "vla-eval", "benchmark": self.bench.name, "steps_per_chunk": steps,
                "observation_params": params, "benchmark_protocol": self.bench.protocol}

    def hello_payload(self) -> dict:
        m = self.metadata
        return {"protocol_version": PROTOCOL_VERSION, "model_server": f"defi-jax {m['policy']}", "capabilities": {},
                "observation_params": m["observation_params"],
                "action_spec": dict(self.bench.action_spec),
                "observation_spec": {**{c: {**_IMAGE, "name": c} for c, v in self.bench.cameras.items()
                                        if v in self.views}, "language": _LANGUAGE},
                "defi_jax": {k: m[k] for k in ("policy", "views", "resolution", "horizon", "action_dim",
                                                "steps_per_chunk", "benchmark", "benchmark_protocol")}}

    def parse(self, payload: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], str]:
        """``({view: uint8[H, W, 3]}, instruction)`` from an observation payload; RequestError naming the field."""
        text = payload.get("task_description")
        if not isinstance(text, str) or not text.strip():
            raise serving.RequestError(f"task_description: expected a non-empty string, got {text!r}; the payload "
                                       f"has {sorted(map(str, payload))}")
        images = payload.get("images")
        if not isinstance(images, Mapping):
            raise serving.RequestError(f"images: expected a map {{camera: uint8[H, W, 3]}}, got "
                                       f"{type(images).__name__}")
        out = {}
        for view in self.views:
            camera = self.bench.camera_of(view)
            if camera not in images:
                raise serving.RequestError(f"images.{camera}: missing (the policy's {view!r} view); images has "
                                           f"{sorted(map(str, images))}" + (
                                               "; start the benchmark with send_wrist_image=True"
                                               if view == "wrist" else ""))
            out[view] = serving.check_image(images[camera], f"images.{camera}")
        return out, text

    async def _handle(self, websocket):
        from websockets.exceptions import ConnectionClosed

        session = uuid.uuid4().hex[:8]
        plan: collections.deque = collections.deque()   # float32[7] actions left of the current chunk
        episodes = steps = 0
        self._clients += 1
        _log.info("harness session %s connected (%d open)", session, self._clients)

        async def send(type_, payload, seq):
            await websocket.send(pack_message(type_, payload, seq))

        try:
            async for data in websocket:
                seq = 0
                try:
                    msg = unpack_message(data)
                    seq, kind, payload = msg["seq"], msg["type"], msg["payload"]
                except ValueError as e:
                    await send("error", {"error": f"observation_failed: {e}"}, seq)
                    continue
                if kind == "hello":
                    await send("hello", self.hello_payload(), seq)
                elif kind in ("episode_start", "episode_end"):
                    plan.clear()
                    episodes += kind == "episode_start"
                elif kind == "observation":
                    if payload.get("episode_restart"):
                        plan.clear()
                    reply = await self._act(payload, plan)
                    if "error" in reply:
                        await send("error", {"error": f"observation_failed: {reply['error']}"}, seq)
                    else:
                        await send("action", reply, seq)
                        steps += 1
                elif kind == "error":
                    _log.error("harness session %s reports: %s", session, payload)
        except ConnectionClosed:
            pass
        finally:
            self._clients -= 1
            _log.info("harness session %s left after %d episode(s), %d step(s) (%d open)", session, episodes, steps,
                      self._clients)

    async def _act(self, payload: Mapping[str, Any], plan: collections.deque) -> dict:
        if not plan:
            try:
                images, text = self.parse(payload)
            except serving.RequestError as e:
                return {"error": str(e)}
            reply = await self.submit(images, text)
            if "error" in reply:
                return reply
            chunk = np.asarray(reply["actions"], np.float64)[:self.steps_per_chunk]
            plan.extend(np.asarray(self.bench.to_harness(a), np.float32) for a in chunk)
        return {"actions": plan.popleft()}

