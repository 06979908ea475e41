"""The community harnesses at the protocol boundary, on loopback with a stand-in policy: a client that sends
exactly what allenai's vla-evaluation-harness sends (HELLO, EPISODE_START, OBSERVATION with PNG-coded images,
EPISODE_END; src/vla_eval/protocol + runners/sync_runner.py + each benchmark's make_obs) against VlaEvalServer,
and openpi's LIBERO client's frames (examples/libero/main.py + openpi_client's episode_start / episode_end)
against PolicyServer with --image_keys. The simulators themselves are not run here."""

import contextlib
import io
import time

import msgpack
import numpy as np
import pytest
from PIL import Image
from scipy.spatial.transform import Rotation
from websockets.sync.client import connect

from defi_jax import serving
from defi_jax.evaluation import vla_eval

RES, HORIZON = 16, 10


class StandInPolicy:
    """DeFIPolicy's serving interface; row t of a chunk is [t, call, mean pixel / 255, ...] so tests can tell
    which call and which row an action came from."""

    views = ("primary", "wrist")
    resolution = RES
    horizon, action_dim = HORIZON, 7

    def __init__(self, views=("primary", "wrist")):
        self.views = views
        self.calls = []

    def act_batch(self, observations, instructions):
        out = []
        for obs, text in zip(observations, instructions):
            if text == "warm up":
                out.append(np.zeros((HORIZON, 7), np.float32))
                continue
            self.calls.append(text)
            chunk = np.zeros((HORIZON, 7), np.float32)
            chunk[:, 0] = np.arange(HORIZON) * 0.01
            chunk[:, 1] = len(self.calls) * 0.1
            chunk[:, 2] = obs["primary"].mean() / 255.0
            chunk[:, 3:6] = [0.1, -0.2, 0.3]
            chunk[:, 6] = 1.0   # open, in our pipelines' convention
            out.append(chunk)
        return np.stack(out)


# ---- vla_eval.protocol as the harness writes it (messages.py, numpy_codec.py, image_codec.py) -------------------

def _harness_encode(obj):
    if isinstance(obj, np.ndarray):
        if obj.ndim == 3 and obj.dtype == np.uint8 and obj.shape[2] in (1, 3, 4):   # image_codec, default png
            buf = io.BytesIO()
            Image.fromarray(obj).save(buf, format="PNG")
            return {"__image__": True, "format": "png", "data": buf.getvalue(), "shape": list(obj.shape)}
        return {"__ndarray__": True, "data": obj.tobytes(), "dtype": obj.dtype.str, "shape": list(obj.shape)}
    return obj


def _harness_decode(obj):
    if isinstance(obj, dict) and "__ndarray__" in obj:
        return np.frombuffer(obj["data"], np.dtype(obj["dtype"])).reshape(obj["shape"]).copy()
    return obj


class HarnessClient:
    """vla_eval.connection.Connection's frames, synchronously."""

    def __init__(self, port):
        self._stack = contextlib.ExitStack()
        self.ws = self._stack.enter_context(_connect(port))
        self.seq = 0

    def send(self, type_, payload):
        self.seq += 1
        self.ws.send(msgpack.packb({"type": type_, "payload": payload, "seq": self.seq, "timestamp": time.time()},
                                   default=_harness_encode, use_bin_type=True))
        return self.seq

    def recv(self):
        return msgpack.unpackb(self.ws.recv(timeout=60), object_hook=_harness_decode, raw=False)

    def act(self, obs):
        seq = self.send("observation", obs)
        reply = self.recv()
        assert reply["seq"] == seq
        return reply

    def close(self):
        self._stack.close()


def _connect(port):
    return connect(f"ws://127.0.0.1:{port}", compression=None, max_size=None)


def frame(seed, size=RES):
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def calvin_obs(seed, text="open the drawer", **extra):   # benchmarks/calvin make_obs, send_wrist_image=True
    return {"images": {"rgb_static": frame(seed, 200), "rgb_gripper": frame(seed + 1, 84)}, "task_description": text,
            **extra}


@pytest.fixture(scope="module")
def calvin_server():
    policy = StandInPolicy()
    with vla_eval.VlaEvalServer(policy, vla_eval.benchmark("calvin"), steps_per_chunk=3, host="127.0.0.1",
                                port=0) as server:
        yield server, policy


def test_hello_declares_the_benchmark_settings(calvin_server):
    server, _ = calvin_server
    client = HarnessClient(server.port)
    seq = client.send("hello", {"harness_version": "0.0.0", "protocol_version": 1, "benchmark": "calvin"})
    reply = client.recv()
    client.close()
    assert reply["type"] == "hello" and reply["seq"] == seq
    hello = reply["payload"]
    assert hello["protocol_version"] == vla_eval.PROTOCOL_VERSION
    assert hello["observation_params"] == {"ep_len": 360, "send_wrist_image": True}
    assert hello["action_spec"]["gripper"]["format"] == "binary_close_negative"
    assert set(hello["observation_spec"]) == {"rgb_static", "rgb_gripper", "language"}
    assert hello["defi_jax"]["steps_per_chunk"] == 3 and "official" in hello["defi_jax"]["benchmark_protocol"]
    assert vla_eval.benchmark("calvin", calvin_ep_len=720).observation_params == {"ep_len": 720}
    assert "NOT the official 360" in vla_eval.benchmark("calvin", calvin_ep_len=720).protocol


def test_calvin_episode_one_action_per_step_chunks_replayed_and_reset(calvin_server):
    server, policy = calvin_server
    policy.calls.clear()
    client = HarnessClient(server.port)
    client.send("hello", {"harness_version": "0.0.0", "protocol_version": 1})
    client.recv()
    client.send("episode_start", {"task": {"name": "seq0", "eval_sequence": ["open_drawer"]}})
    actions = [client.act(calvin_obs(t))["payload"]["actions"] for t in range(4)]
    assert all(a.shape == (7,) and a.dtype == np.float32 for a in actions)
    assert len(policy.calls) == 2   # steps 0-2 from the first chunk, step 3 asks again
    np.testing.assert_allclose(actions[0][[0, 1, 3, 4, 5, 6]], [0.0, 0.002, 0.005, -0.01, 0.015, 1.0], atol=1e-6)
    np.testing.assert_allclose(actions[2][0], 2 * 0.01 * 0.02, atol=1e-7)   # row 2 of the chunk, in metres
    np.testing.assert_allclose(actions[3][1], 0.2 * 0.02, atol=1e-7)        # second call
    # CALVIN's next subtask: episode_restart empties the plan, the new instruction is read at once
    client.act(calvin_obs(9, "push the block", episode_restart=True))
    assert policy.calls[-1] == "push the block" and len(policy.calls) == 3
    client.send("episode_end", {"metrics": {"success": False}})
    client.send("episode_start", {"task": {"name": "seq1"}})
    client.act(calvin_obs(10, "lift the block"))
    assert policy.calls[-1] == "lift the block" and len(policy.calls) == 4
    client.close()


def test_errors_name_the_field_and_the_session_goes_on(calvin_server):
    server, _ = calvin_server
    client = HarnessClient(server.port)
    client.send("episode_start", {"task": {}})
    no_wrist = client.act({"images": {"rgb_static": frame(0, 200)}, "task_description": "open the drawer"})
    assert no_wrist["type"] == "error"
    assert no_wrist["payload"]["error"].startswith("observation_failed: images.rgb_gripper: missing")
    assert "send_wrist_image=True" in no_wrist["payload"]["error"]
    no_text = client.act({"images": calvin_obs(0)["images"]})
    assert no_text["type"] == "error" and "task_description" in no_text["payload"]["error"]
    bad_dtype = client.act({"images": {"rgb_static": frame(0).astype(np.float32),
                                       "rgb_gripper": frame(1)}, "task_description": "x"})
    assert "images.rgb_static: expected dtype uint8" in bad_dtype["payload"]["error"]
    client.ws.send(msgpack.packb({"type": "teleport", "payload": {}, "seq": 99, "timestamp": 0.0}))
    assert "teleport" in client.recv()["payload"]["error"]
    client.ws.send(b"\xc1")
    assert "not msgpack" in client.recv()["payload"]["error"]
    assert client.act(calvin_obs(3))["type"] == "action"
    client.close()


def test_simpler_and_libero_conventions():
    a = np.array([0.1, 0.2, 0.3, 0.05, -0.1, 0.2, 1.0])
    simpler = vla_eval.benchmark("simpler")
    out = simpler.to_harness(a)
    np.testing.assert_allclose(Rotation.from_rotvec(out[3:6]).as_euler("xyz"), a[3:6], atol=1e-9)
    assert out[6] == 1.0 and simpler.observation_params == {"gripper_mode": "sticky"}
    libero = vla_eval.benchmark("libero")
    np.testing.assert_allclose(libero.to_harness(a), [*a[:6], -1.0])   # open -> LIBERO's -1
    assert libero.to_harness(np.r_[a[:6], 0.0])[6] == 1.0               # closed -> +1
    with pytest.raises(ValueError, match="benchmark 'rlbench'"):
        vla_eval.benchmark("rlbench")
    with pytest.raises(ValueError, match=r"also reads \['wrist'\]"):
        vla_eval.VlaEvalServer(StandInPolicy(), simpler)


def test_simpler_session_single_view_policy():
    policy = StandInPolicy(views=("primary",))
    with vla_eval.VlaEvalServer(policy, vla_eval.benchmark("simpler"), host="127.0.0.1", port=0) as server:
        client = HarnessClient(server.port)
        client.send("hello", {"protocol_version": 1})
        assert "send_wrist_image" not in client.recv()["payload"]["observation_params"]
        client.send("episode_start", {"task": {"name": "google_robot_pick_coke_can"}})
        obs = {"images": {"primary": frame(5, 64)}, "task_description": "pick coke can", "task_name": "x"}
        steps = [client.act(obs)["payload"]["actions"] for _ in range(HORIZON + 1)]
        client.close()
    assert len(policy.calls) == 2   # default: the whole chunk of 10, then a new call
    np.testing.assert_allclose([s[0] for s in steps[:HORIZON]], np.arange(HORIZON) * 0.01, atol=1e-6)


def test_simpler_variant_aggregation():
    def body(subname, rate, n):   # results/merge.py's aggregate JSON, the fields read
        return {"benchmark": f"SimplerEnvBenchmark_{subname}", "config": {"subname": subname}, "mean_success": rate,
                "num_episodes_total": n}
    got = vla_eval.simpler_variant_aggregation([
        body("move_near_va_base", 0.5, 60), body("move_near_va_bg_1", 0.25, 60),
        body("drawer_va_open_top_base", 1.0, 9), body("drawer_va_close_top_base", 0.0, 9),
        body("drawer_va_open_middle_bg_bedroom", 0.5, 9), body("pick_coke_can", 0.9, 24)])   # last: VM, left out
    assert got == {"drawer_close": {"success": 0.0, "variants": 1, "episodes": 9},
                   "drawer_open": {"success": 0.75, "variants": 2, "episodes": 18},
                   "move_near": {"success": 0.375, "variants": 2, "episodes": 120}}
    with pytest.raises(ValueError, match="no mean_success"):
        vla_eval.simpler_variant_aggregation([{"config": {"subname": "move_near_va_base"}}])


# ---- openpi's LIBERO client (examples/libero/main.py) against the openpi server -----------------------------------

def test_openpi_libero_client_frames():
    policy = StandInPolicy()
    keys = {"observation/image": "primary", "observation/wrist_image": "wrist"}
    with serving.PolicyServer(policy, host="127.0.0.1", port=0, image_keys=keys) as server:
        with _connect(server.port) as ws:
            metadata = serving.unpackb(ws.recv(timeout=60))
            assert metadata["horizon"] == HORIZON
            ws.send(serving.packb({"__ctrl__": "episode_start", "__experiment__": "libero_spatial",
                                   "__task__": "pick up the bowl", "__episode_id__": 0}))
            assert serving.unpackb(ws.recv(timeout=60)) == {"__ack__": "episode_start"}
            element = {"observation/image": frame(1, 224), "observation/wrist_image": frame(2, 224),
                       "observation/state": np.zeros(8), "prompt": "pick up the bowl"}
            ws.send(serving.packb(element))
            reply = serving.unpackb(ws.recv(timeout=60))
            assert reply["actions"].shape == (HORIZON, 7)   # >= the client's replan_steps (5)
            del element["observation/wrist_image"]
            ws.send(serving.packb(element))
            error = serving.unpackb(ws.recv(timeout=60))["error"]
            assert error.startswith("observation/wrist_image: missing view") and "image_keys" in error
            ws.send(serving.packb({"__ctrl__": "episode_end", "__success__": True}))
            assert serving.unpackb(ws.recv(timeout=60)) == {"__ack__": "episode_end"}
    assert policy.calls == ["pick up the bowl"]
    with pytest.raises(ValueError, match="not the policy's"):
        serving.PolicyServer(policy, image_keys={"observation/image": "front"})
