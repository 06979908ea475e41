"""The policy server on loopback with a stand-in policy: openpi's wire format (metadata first, msgpack-numpy),
/healthz, error replies naming the field on a connection that keeps serving, concurrent robots batched (each
answered with its own actions), a failing batch costing only its bad request, graceful stop and SIGTERM."""

import functools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import msgpack
import numpy as np
import pytest
from websockets.sync.client import connect

from defi_jax.serving import PolicyClient, PolicyServer, ServerError, packb

ROOT = Path(__file__).resolve().parents[1]
VIEWS = ("primary", "wrist")
RES = 16


def stand_in_actions(images, prompt):
    """float32 [10, 7]: depends on every pixel of both views and on the prompt."""
    primary = images["primary"].astype(np.float32)
    wrist = images["wrist"].astype(np.float32)
    grid = primary.reshape(-1)[:70].reshape(10, 7) / 255.0
    text = sum(prompt.encode()) % 97 + len(prompt)
    return (grid + wrist.mean() / 7.0 + 0.01 * text).astype(np.float32)


class StandInPolicy:
    """The interface of DeFIPolicy (views, resolution, act_batch) with a numpy function for a model."""

    views = VIEWS
    resolution = RES

    def __init__(self):
        self.batch_sizes = []
        self.prompts = []

    def act_batch(self, observations, instructions):
        assert len(observations) == len(instructions)
        self.batch_sizes.append(len(observations))
        self.prompts.append(list(instructions))
        if "explode" in instructions:
            raise ValueError("the stand-in refuses to explode")
        return np.stack([stand_in_actions(o, t) for o, t in zip(observations, instructions)])


def image(seed, shape=(RES, RES, 3)):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def observation(seed, prompt="open the drawer"):
    return {"images": {"primary": image(seed), "wrist": image(seed + 1000)}, "prompt": prompt}


# openpi_client.msgpack_numpy, written from its spec: the server must read and write exactly this.
def _openpi_pack(obj):
    if isinstance(obj, np.ndarray):
        return {b"__ndarray__": True, b"data": obj.tobytes(), b"dtype": obj.dtype.str, b"shape": obj.shape}
    if isinstance(obj, np.generic):
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    return obj


def _openpi_unpack(obj):
    if b"__ndarray__" in obj:
        return np.ndarray(buffer=obj[b"data"], dtype=np.dtype(obj[b"dtype"]), shape=obj[b"shape"])
    if b"__npgeneric__" in obj:
        return np.dtype(obj[b"dtype"]).type(obj[b"data"])
    return obj


openpi_packb = functools.partial(msgpack.packb, default=_openpi_pack)
openpi_unpackb = functools.partial(msgpack.unpackb, object_hook=_openpi_unpack)


@pytest.fixture(scope="module")
def served():
    policy = StandInPolicy()
    with PolicyServer(policy, host="127.0.0.1", port=0, description="stand-in") as server:
        yield server, policy


def test_metadata_first_then_actions_on_openpi_wire(served):
    server, policy = served
    with connect(f"ws://127.0.0.1:{server.port}", compression=None, max_size=None, proxy=None) as ws:
        meta = openpi_unpackb(ws.recv(timeout=10))
        assert meta["views"] == list(VIEWS) and meta["resolution"] == RES and meta["policy"] == "stand-in"
        assert (meta["horizon"], meta["action_dim"]) == (10, 7)   # learned by running the stand-in once
        assert meta["max_batch"] == 8 and meta["batch_window_ms"] == 5.0
        obs = observation(1) | {"state": np.arange(8, dtype=np.float32), "step": np.int64(3)}   # ignored keys
        ws.send(openpi_packb(obs))
        reply = openpi_unpackb(ws.recv(timeout=10))
    assert reply["actions"].dtype == np.float32 and reply["actions"].shape == (10, 7)
    np.testing.assert_array_equal(reply["actions"], stand_in_actions(obs["images"], obs["prompt"]))
    timing = reply["server_timing"]
    assert timing["batch_size"] == 1 and timing["infer_ms"] >= 0 and timing["queue_ms"] >= 0
    assert ["open the drawer"] in policy.prompts


def test_client_and_the_accepted_spellings(served):
    server, _ = served
    obs = observation(2, "push the block")
    with PolicyClient("127.0.0.1", server.port, timeout=10) as client:
        assert client.metadata["views"] == list(VIEWS)
        want = stand_in_actions(obs["images"], obs["prompt"])
        np.testing.assert_array_equal(client.infer(obs)["actions"], want)
        # "instruction" for the text, top-level view keys, a channels-first [3, H, W] image
        other = {"instruction": "push the block", "primary": obs["images"]["primary"],
                 "wrist": np.ascontiguousarray(obs["images"]["wrist"].transpose(2, 0, 1))}
        np.testing.assert_array_equal(client.infer(other)["actions"], want)


def test_healthz(served):
    server, _ = served
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=10) as r:
        assert r.status == 200 and r.read().strip() == b"OK"


def test_bad_requests_name_the_field_and_the_connection_keeps_serving(served):
    server, policy = served
    good = observation(3, "close the drawer")
    want = stand_in_actions(good["images"], good["prompt"])
    no_wrist = {"images": {"primary": image(0)}, "prompt": "x"}
    floats = {"images": {"primary": image(0).astype(np.float32), "wrist": image(1)}, "prompt": "x"}
    flat = {"images": {"primary": image(0), "wrist": image(1, (RES, RES))}, "prompt": "x"}
    cases = [
        (packb(no_wrist), "images.wrist: missing view; images has ['primary']"),
        (packb(floats), "images.primary: expected dtype uint8, got float32"),
        (packb(flat), "images.wrist: expected shape [H, W, 3], got [16, 16]"),
        (packb(good | {"prompt": "  "}), "prompt: expected a non-empty string"),
        (packb({"images": good["images"]}), "prompt: missing"),
        (packb({"instruction": "x", "primary": image(0)}), "wrist: missing view; request (no 'images' map)"),
        (packb({"images": [1, 2], "prompt": "x"}), "images: expected a map"),
        (packb([1, 2, 3]), "request: expected a map"),
        (b"\xc1 not msgpack at all", "request: not msgpack-numpy"),
        ("a text frame", "request: expected a binary msgpack frame"),
    ]
    calls_before = len(policy.batch_sizes)
    with connect(f"ws://127.0.0.1:{server.port}", compression=None, proxy=None) as ws:
        openpi_unpackb(ws.recv(timeout=10))
        for payload, message in cases:
            ws.send(payload)
            reply = openpi_unpackb(ws.recv(timeout=10))
            assert set(reply) == {"error"} and reply["error"].startswith(message), (message, reply)
            ws.send(openpi_packb(good))                         # the same connection still answers
            np.testing.assert_array_equal(openpi_unpackb(ws.recv(timeout=10))["actions"], want)
    assert len(policy.batch_sizes) == calls_before + len(cases)   # bad requests never reached the policy
    with PolicyClient("127.0.0.1", server.port, timeout=10) as client:
        with pytest.raises(ServerError, match=r"images\.wrist: missing view"):
            client.infer(no_wrist)
        np.testing.assert_array_equal(client.infer(good)["actions"], want)


def _concurrently(port, observations):
    """Each observation from its own client, sent together; the replies (or exceptions) in order."""
    clients = [PolicyClient("127.0.0.1", port, timeout=20) for _ in observations]
    barrier = threading.Barrier(len(observations))
    replies = [None] * len(observations)

    def run(i):
        barrier.wait(timeout=10)
        try:
            replies[i] = clients[i].infer(observations[i])
        except ServerError as e:
            replies[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(observations))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for c in clients:
        c.close()
    assert not any(t.is_alive() for t in threads)
    return replies


def test_concurrent_clients_are_batched_and_get_their_own_actions():
    policy = StandInPolicy()
    observations = [observation(10 + i, f"task number {i}") for i in range(3)]
    with PolicyServer(policy, host="127.0.0.1", port=0, batch_window_ms=1000) as server:
        policy.batch_sizes.clear()
        replies = _concurrently(server.port, observations)
    for obs, reply in zip(observations, replies):
        np.testing.assert_array_equal(reply["actions"], stand_in_actions(obs["images"], obs["prompt"]))
        assert reply["server_timing"]["batch_size"] == 3
    assert policy.batch_sizes == [4]                                 # 3 requests, padded to a power of two


def test_max_batch_caps_a_batch_and_warmup_compiles_each_size():
    policy = StandInPolicy()
    observations = [observation(20 + i, f"task {i}") for i in range(3)]
    with PolicyServer(policy, host="127.0.0.1", port=0, max_batch=2, batch_window_ms=1000, warmup=True) as server:
        assert policy.batch_sizes == [1, 2]                         # every padded size, before listening
        policy.batch_sizes.clear()
        replies = _concurrently(server.port, observations)
    for obs, reply in zip(observations, replies):
        np.testing.assert_array_equal(reply["actions"], stand_in_actions(obs["images"], obs["prompt"]))
    assert policy.batch_sizes == [2, 1]                              # two at once, the third after its window
    assert sorted(r["server_timing"]["batch_size"] for r in replies) == [1, 2, 2]


def test_a_failing_batch_costs_only_its_bad_request():
    policy = StandInPolicy()
    observations = [observation(30, "explode"), observation(31, "stack the blocks")]
    with PolicyServer(policy, host="127.0.0.1", port=0, batch_window_ms=1000) as server:
        policy.batch_sizes.clear()
        bad, good = _concurrently(server.port, observations)
        assert policy.batch_sizes == [2, 1, 1]                       # the batch, then each request alone
        assert isinstance(bad, ServerError) and "policy: ValueError: the stand-in refuses to explode" in str(bad)
        np.testing.assert_array_equal(good["actions"], stand_in_actions(observations[1]["images"],
                                                                       observations[1]["prompt"]))
        with PolicyClient("127.0.0.1", server.port, timeout=10) as client:   # and the server goes on
            np.testing.assert_array_equal(client.infer(observations[1])["actions"], good["actions"])


def test_stop_closes_connected_clients():
    server = PolicyServer(StandInPolicy(), host="127.0.0.1", port=0).start()
    client = PolicyClient("127.0.0.1", server.port, timeout=10)
    client.infer(observation(40))
    server.stop(timeout=15)
    with pytest.raises(Exception, match="1001|going away|closed"):
        client.infer(observation(40))
    with pytest.raises(OSError):
        PolicyClient("127.0.0.1", server.port, timeout=2)


def test_start_reports_what_stopped_the_server(served):
    server, _ = served
    with pytest.raises(RuntimeError, match="policy server failed to start: .*address already in use"):
        PolicyServer(StandInPolicy(), host="127.0.0.1", port=server.port).start(timeout=30)


_SERVE_STAND_IN = """
import logging, sys
sys.path.insert(0, {tests!r})
from test_serve import StandInPolicy
from defi_jax.serving import PolicyServer
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
PolicyServer(StandInPolicy(), host="127.0.0.1", port={port}).serve_forever()
print("returned", flush=True)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_the_server_gracefully(sig):
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    port = _free_port()
    script = _SERVE_STAND_IN.format(tests=str(ROOT / "tests"), port=port)
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        client = None
        for _ in range(120):                                         # bounded: at most ~60 s to start
            try:
                client = PolicyClient("127.0.0.1", port, timeout=10)
                break
            except OSError:
                assert proc.poll() is None, proc.communicate()[1]
                time.sleep(0.5)
        assert client is not None, "the server never listened"
        with client:
            obs = observation(50)
            np.testing.assert_array_equal(client.infer(obs)["actions"], stand_in_actions(obs["images"], obs["prompt"]))
            proc.send_signal(sig)
            out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert out.strip() == "returned"
    assert f"{signal.Signals(sig).name} received" in err and "defi_jax.serving: stopped" in err
    assert "connected (1 open)" in err and "disconnected after 1 request(s)" in err, err


def test_launch_serve_usage_error_is_one_line():
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-m", "launch.serve", "--port=8000"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [
        "python -m launch.serve: flags checkpoint=None, exported=None: Exactly one of (checkpoint, exported) "
        "must have a value other than None."]
