"""Input pipeline throughput and memory: grain over ArrayRecord / video vs a plain tf.data RLDS loader.

    python -m launch.benchmark data                              # the embedded demo data (made on first use)
    python -m launch.benchmark data --data_dir=/data --robot=bridge --human=ssv2 --resolution=256

Per source (robot RLDS converted to ArrayRecord, human video) and for their mixture: samples/s and frames/s
of ``gfdm_clip`` batches (current + 16 future frames) in one process, and peak RSS over a long run, sampled
every batch (it must stay flat). In the same run a plain tf.data loader reads the same robot data from the
RLDS TFRecords (tensorflow-datasets ``builder_from_directory``, gather the same clips, shuffle buffer,
batch), in two variants: TFDS's default decoding of every step, and decoding only each clip's frames. Every measurement runs in its own fresh process so that memory is not shared.
Times are per batch over the second half of each run (the steady state, after warm-up buffers drain).
``ratio`` = our mean batch time / the stronger tf.data variant's on the same robot data (below 1 = faster);
``rss_ratio`` = our peak RSS / its peak RSS (whole process, workers included).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

_CHILD = r"""
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("_bench_data", sys.argv[1])
mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
print("RESULT " + json.dumps(mod._child(json.loads(sys.argv[2]))), flush=True)
"""


def _rss_mb() -> float:
    import psutil

    p = psutil.Process()
    rss = p.memory_info().rss
    for c in p.children(recursive=True):
        try:
            rss += c.memory_info().rss
        except psutil.Error:
            pass
    return rss / 2**20


def _grain_iter(a: dict):
    import data_pipelines as dp

    cfg = dp.default_data_config()
    cfg.data_dir = a["data_dir"]
    cfg.mixture = a["mixture"]
    cfg.resolution = a["resolution"]
    cfg.num_frames = a["num_frames"]
    cfg.frame_stride = a["frame_stride"]
    cfg.num_workers = a["workers"]
    cfg.read_threads = a["threads"]
    return dp.make_loader("gfdm_clip", cfg, global_batch_size=a["batch"], seed=0)


def _tf_iter(a: dict):
    """The plain tf.data RLDS loader: episodes -> clips of K+1 frames -> shuffle buffer -> batch.

    ``tf_decode="all"``: TFDS decodes every step's image (the default) and clips are gathered from the decoded
    trajectory (Octo's way). ``"needed"``: images stay encoded (SkipDecoding) and each clip decodes only its
    own frames (other cameras are never decoded), as our loader does: the stronger baseline.
    """
    import tensorflow as tf
    import tensorflow_datasets as tfds

    from data_pipelines import oxe_table, rlds

    tf.config.threading.set_inter_op_parallelism_threads(a["threads"])
    tf.config.threading.set_intra_op_parallelism_threads(a["threads"])
    row = oxe_table.ROBOT_DATASETS[a["robot"]]
    key = row.primary.split("/")[-1]
    builder = tfds.builder_from_directory(rlds.find_tfds_dir(os.path.join(a["data_dir"], a["robot"])))
    K, stride, size = a["num_frames"], a["frame_stride"], a["resolution"]
    skip = a["tf_decode"] == "needed"

    def clips(ep):
        frames = ep["steps"].map(lambda s: s["observation"][key]).batch(100_000).get_single_element()
        T = tf.shape(frames)[0]

        def one(t):
            idx = tf.minimum(t + tf.range(K + 1) * stride, T - 1)
            clip = tf.gather(frames, idx)
            if skip:
                clip = tf.map_fn(lambda x: tf.io.decode_image(x, channels=3, expand_animations=False), clip,
                                 fn_output_signature=tf.uint8)
            return tf.cast(tf.image.resize(clip, (size, size)), tf.uint8)
        return tf.data.Dataset.range(tf.cast(T, tf.int64)).map(lambda t: one(tf.cast(t, tf.int32)),
                                                               num_parallel_calls=tf.data.AUTOTUNE)

    obs = builder.info.features["steps"]["observation"]
    images = [k for k in obs.keys() if isinstance(obs[k], tfds.features.Image)]
    decoders = {"steps": {"observation": {k: tfds.decode.SkipDecoding() for k in images}}} if skip else None
    ds = builder.as_dataset(split="train", shuffle_files=True, decoders=decoders).repeat()
    ds = ds.interleave(clips, cycle_length=4, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.shuffle(a["tf_shuffle_buffer"], seed=0).batch(a["batch"], drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return iter(tfds.as_numpy(ds))


def _child(a: dict) -> dict:
    import numpy as np

    it = _tf_iter(a) if a["loader"] == "tfdata" else _grain_iter(a)
    for _ in range(a["warmup"]):
        next(it)
    times, rss = [], []
    for _ in range(a["batches"]):
        t = time.perf_counter()
        b = next(it)
        times.append(time.perf_counter() - t)
        rss.append(_rss_mb())
    frames = b if a["loader"] == "tfdata" else b["frames"]
    assert frames.shape[:2] == (a["batch"], a["num_frames"] + 1), frames.shape
    n = len(rss)
    # Throughput from the second half only: by then read-ahead / shuffle buffers filled during warm-up are
    # drained, so it is the steady state, not buffer contents.
    steady = times[n // 2:]
    return {"median_s": statistics.median(steady), "mean_s": float(np.mean(steady)),
            "rss_first_mb": float(np.mean(rss[: max(1, n // 10)])), "rss_last_mb": float(np.mean(rss[-max(1, n // 10):])),
            "rss_peak_mb": float(max(rss))}


def _measure(a: dict) -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _CHILD, os.path.abspath(__file__), json.dumps(a)],
                          env=env, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"benchmark child failed ({a['loader']} {a.get('mixture')}):\n{proc.stderr[-3000:]}")


def run(args: list[str]) -> list[dict]:
    p = argparse.ArgumentParser(prog="launch.benchmark data")
    p.add_argument("--data_dir", default="", help="root with <robot>/ and <human>/ (default: the demo data)")
    p.add_argument("--robot", default="demo")
    p.add_argument("--human", default="demo_human")
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--num_frames", type=int, default=16)
    p.add_argument("--frame_stride", type=int, default=1)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--batches", type=int, default=30, help="timed batches per source")
    p.add_argument("--long_batches", type=int, default=300, help="batches of the long memory run")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="reader threads (both loaders)")
    p.add_argument("--workers", type=int, default=0, help="grain worker processes")
    p.add_argument("--tf_shuffle_buffer", type=int, default=500, help="tf.data shuffle buffer (samples)")
    o = p.parse_args(args)
    if not o.data_dir:
        from data_pipelines import demo

        o.data_dir = demo.ensure_demo_data()
    base = dict(data_dir=o.data_dir, robot=o.robot, resolution=o.resolution, num_frames=o.num_frames,
                frame_stride=o.frame_stride, batch=o.batch, warmup=o.warmup, threads=o.threads, workers=o.workers, tf_shuffle_buffer=o.tf_shuffle_buffer)
    config = f"gfdm_clip {o.num_frames + 1}x{o.resolution}px batch {o.batch}, {o.threads} threads, {o.workers} workers"
    device = f"cpu x{os.cpu_count()}"
    frames_per_batch = o.batch * (o.num_frames + 1)
    rows = []

    def row(what, r, **extra):
        return {"case": "data", "what": what, "config": config, "device": device, "median_s": r["median_s"],
                "mean_s": r["mean_s"], "samples_per_s": o.batch / r["mean_s"], "frames_per_s": frames_per_batch / r["mean_s"],
                "rss_peak_mb": r["rss_peak_mb"], "rss_first_mb": r["rss_first_mb"], "rss_last_mb": r["rss_last_mb"],
                **extra}

    tf_long = _measure(base | dict(loader="tfdata", tf_decode="needed", batches=o.long_batches))
    # TFDS's default decoding is ~10x slower: a shorter run with a buffer it can drain.
    short = max(40, o.long_batches // 5)
    tf_plain = _measure(base | dict(loader="tfdata", tf_decode="all", batches=short,
                                    tf_shuffle_buffer=min(o.tf_shuffle_buffer, 8 * o.batch)))
    ours_robot = _measure(base | dict(loader="grain", mixture={o.robot: 1.0}, batches=o.long_batches))
    rows.append(row(f"grain {o.robot} (RLDS->ArrayRecord), long run ({o.long_batches} batches)", ours_robot,
                    ratio=ours_robot["mean_s"] / tf_long["mean_s"],
                    rss_ratio=ours_robot["rss_peak_mb"] / tf_long["rss_peak_mb"],
                    ratio_vs_tfds_default=ours_robot["mean_s"] / tf_plain["mean_s"]))
    ours_human = _measure(base | dict(loader="grain", mixture={o.human: 1.0}, batches=o.batches))
    rows.append(row(f"grain {o.human} (video)", ours_human))
    long = _measure(base | dict(loader="grain", mixture={o.robot: 0.7, o.human: 0.3}, batches=o.long_batches))
    rows.append(row(f"grain mixture {o.robot}:0.7 {o.human}:0.3, long run ({o.long_batches} batches)", long,
                    rss_ratio=long["rss_peak_mb"] / tf_long["rss_peak_mb"]))
    rows.append(row(f"tf.data RLDS {o.robot}, decode clip frames only, long run ({o.long_batches} batches)",
                    tf_long))
    rows.append(row(f"tf.data RLDS {o.robot}, TFDS decodes every step ({short} batches)", tf_plain))
    return rows
