"""Serve a DeFI policy to robots over a websocket (openpi's protocol; see ``defi_jax/serving.py``).

    python -m launch.serve --checkpoint=workdirs/policy [--port=8000] [--host=0.0.0.0]
    python -m launch.serve --exported=/tmp/policy_exported      # a jax.export artifact: jax + numpy only
    python -m launch.serve --checkpoint=DIR --image_keys=observation/image=primary,observation/wrist_image=wrist
                                                                # openpi's LIBERO client (examples/libero/main.py)
    python -m launch.serve --checkpoint=DIR --protocol=vla-eval --benchmark=calvin [--calvin_ep_len=720]
                                                                # allenai's vla-evaluation-harness (vla-eval)

A robot sends ``{"images": {view: uint8[H, W, 3]}, "prompt": str}`` and gets back ``{"actions":
float32[horizon, action_dim], "server_timing": {...}}``; the first frame of every connection is the server's
metadata (views, resolution, horizon, action_dim). ``GET /healthz`` answers 200 once the server listens.
Concurrent robots are batched: requests within ``--batch_window_ms`` of each other, at most ``--max_batch``,
go through one policy call. Every padded batch size is compiled before listening (``--nowarmup`` skips that).
SIGINT / SIGTERM stop it after the running batch. Clients: ``defi_jax.serving.PolicyClient`` or openpi's
``WebsocketClientPolicy``.

``--protocol=vla-eval`` speaks the harness's protocol instead (``defi_jax/evaluation/vla_eval.py``): one action
per environment step out of the policy's chunk (``--steps_per_chunk`` of each chunk, default all), the
benchmark's cameras and action convention from ``--benchmark`` (calvin, simpler, libero).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import sys  # noqa: E402

from absl import app, flags  # noqa: E402

from defi_jax import config_validation, paths  # noqa: E402

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Policy workdir (local or gs://) to serve; a relative path "
                                  "is made absolute.")
_EXPORTED = flags.DEFINE_string("exported", None, "Folder written by DeFIPolicy.export to serve instead of a "
                                "checkpoint (no model code needed).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_EMA = flags.DEFINE_bool("ema", False, "Serve the checkpoint's EMA parameters.")
_HOST = flags.DEFINE_string("host", "0.0.0.0", "Address to listen on.")
_PORT = flags.DEFINE_integer("port", 8000, "Port to listen on (0: any free port).", lower_bound=0, upper_bound=65535)
_MAX_BATCH = flags.DEFINE_integer("max_batch", 8, "Most requests per policy call.", lower_bound=1)
_WINDOW = flags.DEFINE_float("batch_window_ms", 5.0, "How long the first waiting request waits for others.",
                             lower_bound=0.0)
_WARMUP = flags.DEFINE_bool("warmup", True, "Compile every padded batch size before listening.")
_PROTOCOL = flags.DEFINE_enum("protocol", "openpi", ["openpi", "vla-eval"], "Wire protocol: openpi's policy server "
                              "or allenai's vla-evaluation-harness model server.")
_BENCHMARK = flags.DEFINE_enum("benchmark", None, ["calvin", "simpler", "libero"], "--protocol=vla-eval: the "
                               "harness benchmark served (cameras, action convention, settings).")
_CALVIN_EP_LEN = flags.DEFINE_integer("calvin_ep_len", 360, "--benchmark=calvin: steps per subtask asked of the "
                                      "harness (360 is the official protocol; 720 is a labelled option).",
                                      lower_bound=1)
_STEPS_PER_CHUNK = flags.DEFINE_integer("steps_per_chunk", None, "--protocol=vla-eval: actions of each chunk "
                                        "executed before the policy is asked again (default: the whole chunk).",
                                        lower_bound=1)
_IMAGE_KEYS = flags.DEFINE_list("image_keys", [], "--protocol=openpi: request keys read as views, KEY=VIEW, e.g. "
                                "observation/image=primary,observation/wrist_image=wrist (openpi's LIBERO client).")
flags.mark_flags_as_mutual_exclusive(["checkpoint", "exported"], required=True)


@flags.multi_flags_validator(["protocol", "benchmark", "image_keys"],
                             message="--protocol=vla-eval needs --benchmark; --image_keys is for --protocol=openpi")
def _check_protocol(values):
    if values["protocol"] == "vla-eval":
        return values["benchmark"] is not None and not values["image_keys"]
    return values["benchmark"] is None


def _image_keys(pairs):
    out = {}
    for pair in pairs:
        key, sep, view = pair.rpartition("=")
        if not sep or not key or not view:
            raise ValueError(f"--image_keys: {pair!r} is not KEY=VIEW")
        out[key] = view
    return out


def main(argv):
    del argv
    import logging as py_logging
    py_logging.getLogger("absl").setLevel(py_logging.WARNING)        # Orbax logs every file it reads at INFO
    py_logging.getLogger("jax").setLevel(py_logging.WARNING)
    py_logging.getLogger("websockets").setLevel(py_logging.WARNING)  # the server logs connections itself
    py_logging.getLogger("defi_jax.serving").setLevel(py_logging.INFO)

    from defi_jax import inference, serving

    if _EXPORTED.value:
        source = paths.abspath(_EXPORTED.value)
        what = f"DeFI exported policy {source}"
    else:
        source = paths.abspath(_CHECKPOINT.value)
        what = f"DeFI policy checkpoint {source} (step {_STEP.value if _STEP.value is not None else 'latest'}" + (
            ", EMA)" if _EMA.value else ")")
    print(f"launch.serve: {what} -> ws://{_HOST.value}:{_PORT.value} (max_batch {_MAX_BATCH.value}, window "
          f"{_WINDOW.value:g} ms)", flush=True)
    try:
        if _EXPORTED.value:
            policy = inference.load_exported(source)
        else:
            policy = inference.DeFIPolicy.from_checkpoint(source, step=_STEP.value, ema=_EMA.value)
    except (FileNotFoundError, ValueError) as e:
        print(f"launch.serve: {e}", file=sys.stderr)
        return 2
    common = dict(host=_HOST.value, port=_PORT.value, max_batch=_MAX_BATCH.value, batch_window_ms=_WINDOW.value,
                  warmup=_WARMUP.value, description=what, metadata={"source": source})
    try:
        if _PROTOCOL.value == "vla-eval":
            from defi_jax.evaluation import vla_eval
            bench = vla_eval.benchmark(_BENCHMARK.value, calvin_ep_len=_CALVIN_EP_LEN.value)
            print(f"launch.serve: vla-eval protocol, {bench.protocol}; harness configs {list(bench.configs)}",
                  flush=True)
            server = vla_eval.VlaEvalServer(policy, bench, steps_per_chunk=_STEPS_PER_CHUNK.value, **common)
        else:
            server = serving.PolicyServer(policy, image_keys=_image_keys(_IMAGE_KEYS.value), **common)
    except ValueError as e:
        print(f"launch.serve: {e}", file=sys.stderr)
        return 2
    server.serve_forever()
    print("launch.serve: stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(app.run(main, flags_parser=config_validation.parse_flags))
