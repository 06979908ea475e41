"""A policy behind a websocket, speaking openpi's protocol, with concurrent robots batched.

    from defi_jax.inference import DeFIPolicy
    from defi_jax.serving import PolicyClient, PolicyServer
    PolicyServer(DeFIPolicy.from_checkpoint("/tmp/policy"), port=8000).serve_forever()   # or: python -m launch.serve

    client = PolicyClient("localhost", 8000)              # on the robot: numpy, msgpack, websockets
    client.metadata                                       # {"views": [...], "resolution": 256, "horizon": 10, ...}
    reply = client.infer({"images": {"primary": rgb_HW3, "wrist": wrist_HW3}, "prompt": "open the drawer"})
    reply["actions"]                                      # float32 [horizon, action_dim]

Wire protocol (openpi's ``openpi_client.msgpack_numpy`` + ``WebsocketPolicyServer``, so openpi's
``WebsocketClientPolicy`` talks to this server unchanged): every frame is binary msgpack; a numpy array travels as
the map ``{b"__ndarray__": True, b"data": raw bytes, b"dtype": dtype.str, b"shape": shape}``, a numpy scalar as
``{b"__npgeneric__": True, b"data": item, b"dtype": dtype.str}``.

- On connect the server sends its metadata first: ``policy`` (what it serves), ``views``, ``resolution``,
  ``horizon``, ``action_dim``, ``max_batch``, ``batch_window_ms`` and whatever the launcher adds.
- Each client frame is one observation: ``{"images": {view: uint8[H, W, 3]}, "prompt": str}`` (openpi's
  convention). Also accepted: ``"instruction"`` for the text, each view as a top-level key instead of under
  ``"images"``, channels-first ``uint8[3, H, W]`` images (openpi's ALOHA clients send those). Other keys
  (``"state"``, ...) are ignored. Images of another size are resized to ``resolution`` by the policy. Clients that
  name their cameras otherwise are served with ``image_keys`` (``launch.serve --image_keys``): openpi's LIBERO
  client (``examples/libero/main.py``) sends ``"observation/image"``, ``"observation/wrist_image"``,
  ``"observation/state"`` and ``"prompt"`` and reads ``"actions"``, so it needs
  ``image_keys={"observation/image": "primary", "observation/wrist_image": "wrist"}``.
- A control frame ``{"__ctrl__": "episode_start" | "episode_end", ...}`` (openpi client's ``episode_start()`` /
  ``episode_end()``) is answered ``{"__ack__": "episode_start" | "episode_end"}`` (``"ignored"`` for another
  value), as openpi's server does; the policy keeps no per-episode state, so nothing else happens.
- The reply is ``{"actions": float32[horizon, action_dim], "server_timing": {"infer_ms", "batch_size",
  "queue_ms"}}``, or ``{"error": "<message naming the field>"}`` for a request the server cannot act on (not
  msgpack, not a map, a missing view, an image of the wrong dtype or shape, an empty prompt); the connection
  stays open and the next request is served. ``GET /healthz`` answers ``200 OK`` once the server listens (and
  ``GET /health`` ``{"status": "ok"}``, vla-eval's probe).

The same server speaks allenai's vla-evaluation-harness protocol through :mod:`defi_jax.evaluation.vla_eval`.

Inference runs in one worker thread, off the event loop. Requests that arrive within ``batch_window_ms`` of the
first waiting one (at most ``max_batch``) go through one ``policy.act_batch`` call; the batch is padded (with
copies of its first row) to the next power of two so a compiled policy sees at most log2(max_batch) + 1 shapes.
A batch that fails is retried one request at a time, so one robot's bad input never costs another its answer.

The policy is any object with ``views`` (names), ``resolution`` (int) and ``act_batch(observations,
instructions) -> float32[B, horizon, action_dim]``: :class:`defi_jax.inference.DeFIPolicy`, the exported
policy of :func:`defi_jax.inference.load_exported`, or a stand-in.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import http
import logging
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import msgpack
import numpy as np

_log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 2**20   # a few full-resolution camera views fit; a runaway client does not
CONTROLS = ("episode_start", "episode_end")   # openpi client's {"__ctrl__": ...} frames, acknowledged


# ---------------------------------------------------------------------------------------------------------
# msgpack-numpy, byte-compatible with openpi_client.msgpack_numpy
# ---------------------------------------------------------------------------------------------------------

def _pack_numpy(obj):
    if isinstance(obj, (np.ndarray, np.generic)) and obj.dtype.kind in "VOc":
        raise ValueError(f"cannot send numpy dtype {obj.dtype} (object, void and complex are not supported)")
    if isinstance(obj, np.ndarray):
        obj = np.ascontiguousarray(obj)
        return {b"__ndarray__": True, b"data": obj.tobytes(), b"dtype": obj.dtype.str, b"shape": obj.shape}
    if isinstance(obj, np.generic):
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    return obj


def _unpack_numpy(obj: dict):
    if b"__ndarray__" in obj:
        dtype = np.dtype(obj[b"dtype"])
        if dtype.kind in "VOc":
            raise ValueError(f"numpy dtype {dtype} is not accepted")
        return np.ndarray(buffer=obj[b"data"], dtype=dtype, shape=tuple(obj[b"shape"]))
    if b"__npgeneric__" in obj:
        return np.dtype(obj[b"dtype"]).type(obj[b"data"])
    return obj


def packb(obj: Any) -> bytes:
    """msgpack bytes of ``obj`` (nested maps, lists, str, numbers, numpy arrays and scalars)."""
    return msgpack.packb(obj, default=_pack_numpy)


def unpackb(data: bytes) -> Any:
    """The inverse of :func:`packb`; arrays come back as read-only views of ``data``."""
    return msgpack.unpackb(data, object_hook=_unpack_numpy)


# ---------------------------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------------------------

class RequestError(ValueError):
    """A request the server cannot act on; the message names the field."""


def parse_observation(obs: Any, views: Sequence[str],
                      image_keys: Mapping[str, str] | None = None) -> tuple[dict[str, np.ndarray], str]:
    """``({view: uint8[H, W, 3]}, prompt)`` from one decoded request; raises :class:`RequestError` naming the field.

    ``image_keys`` maps request keys to views for clients that name their cameras otherwise (openpi's LIBERO
    client: ``{"observation/image": "primary", "observation/wrist_image": "wrist"}``); the keys are read at the
    top level of the request.
    """
    if not isinstance(obs, Mapping):
        raise RequestError(f"request: expected a map {{'images': {{view: uint8[H, W, 3]}}, 'prompt': str}}, "
                           f"got {type(obs).__name__}")
    key = "prompt" if "prompt" in obs else "instruction"
    if key not in obs:
        raise RequestError(f"prompt: missing; send the instruction as 'prompt' (or 'instruction'); the request "
                           f"has {sorted(map(str, obs))}")
    prompt = obs[key]
    if not isinstance(prompt, str) or not prompt.strip():
        raise RequestError(f"{key}: expected a non-empty string, got {prompt!r}")
    if image_keys:
        field_of = {view: request_key for request_key, view in image_keys.items()}
        source = {view: obs[k] for view, k in field_of.items() if k in obs}
        where = "request"
    elif "images" in obs:
        source, where = obs["images"], "images"
        if not isinstance(source, Mapping):
            raise RequestError(f"images: expected a map {{view: uint8[H, W, 3]}}, got {type(source).__name__}")
        field_of = {view: f"images.{view}" for view in views}
    else:
        source, where = obs, "request (no 'images' map)"
        field_of = {view: view for view in views}
    missing = [v for v in views if v not in source]
    if missing:
        have = sorted(map(str, obs if image_keys else source))
        raise RequestError(f"{field_of.get(missing[0], missing[0])}: missing view; {where} has {have}, the policy "
                           f"reads {list(views)}" + (f" through image_keys {dict(image_keys)}" if image_keys else ""))
    return {view: check_image(source[view], field_of[view]) for view in views}, prompt


def check_image(image: Any, field: str) -> np.ndarray:
    """``image`` as uint8 [H, W, 3] (a channels-first [3, H, W] one is transposed); :class:`RequestError` naming
    ``field`` otherwise."""
    if not isinstance(image, np.ndarray):
        raise RequestError(f"{field}: expected a numpy uint8 [H, W, 3] array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise RequestError(f"{field}: expected dtype uint8, got {image.dtype} {list(image.shape)}")
    if image.ndim == 3 and image.shape[0] == 3 and image.shape[-1] != 3:
        image = image.transpose(1, 2, 0)   # [3, H, W] -> [H, W, 3]
    if image.ndim != 3 or image.shape[-1] != 3 or 0 in image.shape:
        raise RequestError(f"{field}: expected shape [H, W, 3], got {list(image.shape)}")
    return image


def _bucket(n: int, max_batch: int) -> int:
    """The padded batch size: the next power of two, at most ``max_batch``."""
    return min(1 << (n - 1).bit_length(), max_batch)


@dataclasses.dataclass
class _Request:
    images: dict[str, np.ndarray]
    prompt: str
    arrived: float                  # loop.time()
    reply: asyncio.Future


# ---------------------------------------------------------------------------------------------------------
# Server
# ---------------------------------------------------------------------------------------------------------

class PolicyServer:
    """Serves ``policy`` over a websocket at ``ws://host:port`` (see the module doc for the protocol).

    ``serve_forever()`` blocks (SIGINT / SIGTERM stop it gracefully when called from the main thread);
    ``start()`` / ``stop()`` (or ``with server:``) run it in a background thread. ``port=0`` picks a free port,
    readable as ``server.port`` once started. ``warmup=True`` runs every padded batch size once before listening,
    so a compiled policy compiles before the first robot waits on it. ``metadata`` adds entries to the first frame.
    ``image_keys`` renames request keys to views (see :func:`parse_observation`).
    """

    def __init__(self, policy, *, host: str = "0.0.0.0", port: int = 8000, max_batch: int = 8,
                 batch_window_ms: float = 5.0, warmup: bool = False, description: str | None = None,
                 metadata: Mapping[str, Any] | None = None, image_keys: Mapping[str, str] | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch}: must be >= 1")
        if batch_window_ms < 0:
            raise ValueError(f"batch_window_ms={batch_window_ms}: must be >= 0")
        self.policy = policy
        self.views = tuple(policy.views)
        self.resolution = int(policy.resolution)
        self.host, self.port = host, port
        self.max_batch, self.batch_window_ms = int(max_batch), float(batch_window_ms)
        self.warmup = warmup
        self.image_keys = dict(image_keys or {})
        unknown = sorted(set(self.image_keys.values()) - set(self.views))
        if unknown:
            raise ValueError(f"image_keys {self.image_keys}: view(s) {unknown} are not the policy's "
                             f"{list(self.views)}")
        self.description = description or _describe(policy)
        self.metadata: dict[str, Any] = {}
        self._extra_metadata = dict(metadata or {})
        self.ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._startup_error: BaseException | None = None
        self._queue: asyncio.Queue | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._clients = 0

    # ---- running --------------------------------------------------------------------------------
    def serve_forever(self) -> None:
        """Serves until :meth:`stop`, SIGINT or SIGTERM; lets a running batch finish, then returns."""
        try:
            asyncio.run(self._main())
        except BaseException as e:
            self._startup_error = self._startup_error or e
            raise
        finally:
            self.ready.set()   # wakes a start() waiting on a server that failed to start

    def start(self, timeout: float = 60.0) -> PolicyServer:
        """Serves from a background thread; returns once listening (raises what stopped it from starting)."""
        self._thread = threading.Thread(target=self._serve_quietly, name="policy-server", daemon=True)
        self._thread.start()
        if not self.ready.wait(timeout):
            raise TimeoutError(f"policy server not listening on {self.host}:{self.port} after {timeout} s")
        if self._startup_error is not None:
            raise RuntimeError(f"policy server failed to start: {self._startup_error}") from self._startup_error
        return self

    def _serve_quietly(self):
        try:
            self.serve_forever()
        except BaseException:   # reported by start()
            pass

    def stop(self, timeout: float = 30.0) -> None:
        """Stops serving (thread-safe): closes the listening socket and the connections, finishes the batch."""
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(stopping.set)
            except RuntimeError:   # the loop closed meanwhile
                pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError(f"policy server still running {timeout} s after stop()")

    def __enter__(self) -> PolicyServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    async def _main(self):
        from websockets.asyncio.server import serve

        loop = asyncio.get_running_loop()
        self._loop, self._stopping, self._queue = loop, asyncio.Event(), asyncio.Queue()
        # One worker: the policy (its compiled functions, its RNG counter) is used by one thread at a time.
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="policy")
        signals, batcher = [], None
        try:
            if threading.current_thread() is threading.main_thread():
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.add_signal_handler(sig, self._on_signal, sig)
                    signals.append(sig)
            self.metadata = await loop.run_in_executor(self._executor, self._prepare)
            if self._stopping.is_set():   # a signal during the warm-up (which cannot be interrupted)
                return
            batcher = asyncio.create_task(self._batcher())
            async with serve(self._handle, self.host, self.port, process_request=_healthz, compression=None,
                             max_size=MAX_MESSAGE_BYTES) as server:
                self.port = server.sockets[0].getsockname()[1]
                _log.info("serving %s on ws://%s:%d (views %s, max_batch %d, window %g ms)", self.description,
                          self.host, self.port, list(self.views), self.max_batch, self.batch_window_ms)
                self.ready.set()
                await self._stopping.wait()
                _log.info("stopping: closing %d connection(s)", self._clients)
        finally:
            if batcher is not None:
                batcher.cancel()
                await asyncio.gather(batcher, return_exceptions=True)
            for sig in signals:
                loop.remove_signal_handler(sig)
            self._executor.shutdown(wait=True)
        _log.info("stopped")

    def _on_signal(self, sig):
        _log.info("%s received", signal.Signals(sig).name)
        self._stopping.set()

    # ---- policy side (worker thread) ------------------------------------------------------------
    def _prepare(self) -> dict:
        """The first frame's metadata; runs the policy on blank frames to warm up or to learn its action shape."""
        shape = _action_shape(self.policy)
        sizes = sorted({_bucket(n, self.max_batch) for n in range(1, self.max_batch + 1)}) if self.warmup else []
        if shape is None and not sizes:
            sizes = [1]
        blank = {v: np.zeros((self.resolution, self.resolution, 3), np.uint8) for v in self.views}
        for size in sizes:
            t0 = time.perf_counter()
            out = np.asarray(self.policy.act_batch([blank] * size, ["warm up"] * size))
            if out.ndim != 3 or out.shape[0] != size:
                raise ValueError(f"{self.description}: act_batch of {size} observation(s) returned shape "
                                 f"{list(out.shape)}, expected [{size}, horizon, action_dim]")
            shape = shape or tuple(out.shape[1:])
            _log.info("batch %d ready in %.0f ms", size, 1e3 * (time.perf_counter() - t0))
        return {"policy": self.description, "views": list(self.views), "resolution": self.resolution,
                "horizon": int(shape[0]), "action_dim": int(shape[1]), "max_batch": self.max_batch,
                "batch_window_ms": self.batch_window_ms, **self._extra_metadata}

    def _infer(self, batch: Sequence[_Request]) -> list[dict]:
        """One ``act_batch`` for the batch padded to its bucket; on failure, each request alone."""
        n = len(batch)
        size = _bucket(n, self.max_batch)
        rows = [*batch, *[batch[0]] * (size - n)]
        t0 = time.perf_counter()
        try:
            actions = np.asarray(self.policy.act_batch([r.images for r in rows], [r.prompt for r in rows]),
                                 np.float32)
            if actions.ndim != 3 or actions.shape[0] != size:
                raise ValueError(f"act_batch returned shape {list(actions.shape)} for {size} observations")
        except Exception as e:
            if n > 1:
                return [self._infer([r])[0] for r in batch]
            _log.exception("policy failed on prompt %r", batch[0].prompt)
            return [{"error": f"policy: {type(e).__name__}: {e}"}]
        infer_ms = 1e3 * (time.perf_counter() - t0)
        return [{"actions": np.array(actions[i]), "server_timing": {"infer_ms": infer_ms, "batch_size": n}}
                for i in range(n)]

    # ---- event loop side ------------------------------------------------------------------------
    async def _batcher(self):
        loop = asyncio.get_running_loop()
        window = self.batch_window_ms / 1e3
        while True:
            batch = [await self._queue.get()]
            deadline = batch[0].arrived + window
            while len(batch) < self.max_batch:
                try:
                    remaining = deadline - loop.time()
                    batch.append(self._queue.get_nowait() if remaining <= 0
                                 else await asyncio.wait_for(self._queue.get(), remaining))
                except (asyncio.QueueEmpty, asyncio.TimeoutError):
                    break
            batch = [r for r in batch if not r.reply.done()]   # a client that left while queued
            if not batch:
                continue
            started = loop.time()
            try:
                replies = await loop.run_in_executor(self._executor, self._infer, batch)
            except Exception as e:   # not the policy's failure (_infer answers those): keep the robots answered
                _log.exception("batch of %d failed", len(batch))
                replies = [{"error": f"server: {type(e).__name__}: {e}"} for _ in batch]
            for request, reply in zip(batch, replies):
                if "server_timing" in reply:
                    reply["server_timing"]["queue_ms"] = 1e3 * (started - request.arrived)
                if not request.reply.done():
                    request.reply.set_result(reply)

    async def submit(self, images: dict[str, np.ndarray], prompt: str) -> dict:
        """Queues one observation for the next batch; ``{"actions", "server_timing"}`` or ``{"error"}``."""
        loop = asyncio.get_running_loop()
        request = _Request(images, prompt, loop.time(), loop.create_future())
        await self._queue.put(request)
        try:
            return await request.reply
        except asyncio.CancelledError:
            request.reply.cancel()
            raise

    async def _handle(self, websocket):
        from websockets.exceptions import ConnectionClosed

        peer = _peer(websocket)
        self._clients += 1
        _log.info("client %s connected (%d open)", peer, self._clients)
        served = 0
        try:
            await websocket.send(packb(self.metadata))
            async for message in websocket:
                try:
                    obs = self._unpack(message)
                    if isinstance(obs, Mapping) and "__ctrl__" in obs:   # openpi client's episode_start / _end
                        ctrl = obs["__ctrl__"]
                        await websocket.send(packb({"__ack__": ctrl if ctrl in CONTROLS else "ignored"}))
                        continue
                    images, prompt = parse_observation(obs, self.views, self.image_keys)
                except RequestError as e:
                    await websocket.send(packb({"error": str(e)}))
                    continue
                await websocket.send(packb(await self.submit(images, prompt)))
                served += 1
        except ConnectionClosed:
            pass
        finally:
            self._clients -= 1
            _log.info("client %s disconnected after %d request(s) (%d open)", peer, served, self._clients)

    @staticmethod
    def _unpack(message) -> Any:
        if isinstance(message, str):
            raise RequestError("request: expected a binary msgpack frame, got a text frame")
        try:
            return unpackb(message)
        except Exception as e:   # msgpack raises several types, the numpy hook ValueError / TypeError
            why = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            raise RequestError(f"request: not msgpack-numpy ({why})") from None


def _healthz(connection, request):
    """``process_request`` hook: ``GET /healthz`` -> 200 OK (openpi), ``GET /health`` -> 200 ``{"status": "ok"}``
    (vla-eval's readiness probe); anything else goes on to the websocket handshake."""
    if request.path == "/healthz":
        return connection.respond(http.HTTPStatus.OK, "OK\n")
    if request.path == "/health":
        response = connection.respond(http.HTTPStatus.OK, '{"status": "ok"}\n')
        del response.headers["Content-Type"]   # respond() sets text/plain
        response.headers["Content-Type"] = "application/json"
        return response
    return None


def _peer(websocket) -> str:
    address = websocket.remote_address
    return f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)


def _describe(policy) -> str:
    manifest = getattr(policy, "manifest", None)
    if isinstance(manifest, Mapping) and "what" in manifest:
        return f"{manifest['what']} (exported, {getattr(policy, 'path', '?')})"
    return type(policy).__name__


def _action_shape(policy) -> tuple[int, int] | None:
    """(horizon, action_dim) from the policy's config, export manifest or attributes; None if it has none."""
    config = getattr(policy, "config", None)
    try:
        return int(config.model.horizon), int(config.model.action_dim)
    except (AttributeError, KeyError, TypeError):
        pass
    manifest = getattr(policy, "manifest", None)
    if isinstance(manifest, Mapping) and "horizon" in manifest and "action_dim" in manifest:
        return int(manifest["horizon"]), int(manifest["action_dim"])
    if hasattr(policy, "horizon") and hasattr(policy, "action_dim"):
        return int(policy.horizon), int(policy.action_dim)
    return None


# ---------------------------------------------------------------------------------------------------------
# Client
# ---------------------------------------------------------------------------------------------------------

class ServerError(RuntimeError):
    """The server answered a request with an error (the message names the field)."""


class PolicyClient:
    """A synchronous client: ``PolicyClient(host, port).infer(observation)`` -> ``{"actions": ..., ...}``.

    Sends what openpi's ``WebsocketClientPolicy`` sends, so either client talks to either server. ``host`` may
    be a full ``ws://`` URI (then ``port`` is ignored). ``wait_s`` keeps retrying a refused connection that long
    (a server still compiling); ``timeout`` bounds each reply. An error reply raises :class:`ServerError`; the
    connection stays usable.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 8000, *, wait_s: float = 0.0,
                 timeout: float | None = None):
        from websockets.sync.client import connect

        self.uri = host if host.startswith(("ws://", "wss://")) else f"ws://{host}:{port}"
        self.timeout = timeout
        self._stack = contextlib.ExitStack()   # websockets >= 17 wants connect() entered as a context manager
        deadline = time.monotonic() + wait_s
        while True:
            try:
                self._ws = self._stack.enter_context(connect(self.uri, compression=None, max_size=None, proxy=None,
                                                             open_timeout=timeout or 10))
                break
            except OSError:   # refused, or the handshake timed out
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.5)
        self.metadata: dict = unpackb(self._ws.recv(timeout))

    def infer(self, obs: Mapping[str, Any]) -> dict:
        """Sends one observation, returns the server's reply (``actions``, ``server_timing``)."""
        self._ws.send(packb(obs))
        reply = self._ws.recv(self.timeout)
        if isinstance(reply, str):   # openpi's server sends a traceback as text
            raise ServerError(reply)
        reply = unpackb(reply)
        if isinstance(reply, Mapping) and "error" in reply:
            raise ServerError(reply["error"])
        return reply

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> PolicyClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

