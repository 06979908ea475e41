"""defi_jax.paths on local folders and on gs:// (a local stand-in for the object store), and the writers on it."""

import json
import os

import numpy as np
import pytest

from defi_jax import paths


def test_abspath_and_join(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert paths.abspath("runs/a") == str(tmp_path / "runs" / "a")
    assert paths.abspath("gs://b/runs/a") == "gs://b/runs/a"
    assert paths.abspath("~/x") == os.path.join(os.path.expanduser("~"), "x")
    assert paths.join("gs://b/runs/", "a", "m.jsonl") == "gs://b/runs/a/m.jsonl"
    assert paths.join("/r", "a") == "/r/a"
    assert paths.is_remote("gs://b") and not paths.is_remote("/gs/b")


def test_local_atomic_write(tmp_path, monkeypatch):
    target = tmp_path / "new" / "config.json"
    paths.write_text(target, "{}")                        # creates the folder
    assert target.read_text() == "{}"
    paths.write_bytes(target, b'{"a": 1}')
    assert target.read_bytes() == b'{"a": 1}'

    def killed(src, dst):
        raise KeyboardInterrupt
    monkeypatch.setattr(os, "replace", killed)              # the run dies between write and rename
    with pytest.raises(KeyboardInterrupt):
        paths.write_text(target, "half")
    assert target.read_text() == '{"a": 1}'                 # the old file is intact,
    assert paths.listdir(target.parent) == ["config.json"]  # and no temporary file is left


def test_gs_roundtrip(gcs, tmp_path):
    root = "gs://bucket/run"
    assert not paths.exists(root)
    paths.makedirs(paths.join(root, "samples"))
    paths.write_text(paths.join(root, "config.json"), '{"x": 1}')
    with paths.open(paths.join(root, "samples", "a.bin"), "wb") as f:
        f.write(b"\x00\x01")
    local = tmp_path / "local.txt"
    local.write_text("copied")
    paths.copy(str(local), paths.join(root, "copied.txt"), chunk_bytes=4)   # streamed: two chunks
    assert paths.isdir(root) and paths.exists(paths.join(root, "config.json"))
    assert paths.listdir(root) == ["config.json", "copied.txt", "samples"]
    assert paths.read_text(paths.join(root, "copied.txt")) == "copied"
    assert paths.read_bytes(paths.join(root, "samples", "a.bin")) == b"\x00\x01"
    paths.remove(paths.join(root, "copied.txt"))
    assert paths.listdir(root) == ["config.json", "samples"]
    assert (tmp_path / "bucket" / "bucket" / "run" / "config.json").read_text() == '{"x": 1}'
    assert gcs.calls > 0


def test_staged_dir_local_replaces_whole_folders_and_keeps_the_old_one_on_failure(tmp_path, monkeypatch):
    final = tmp_path / "exported"
    final.mkdir()
    (final / "stale.txt").write_text("from the last export")
    with paths.staged_dir(final) as tmp:
        assert os.path.dirname(tmp) == str(tmp_path)                    # same file system: a rename, not a copy
        (tmp_path / "unrelated").mkdir()
        open(os.path.join(tmp, "manifest.json"), "w").write("new")
    assert sorted(os.listdir(final)) == ["manifest.json"]
    assert sorted(os.listdir(tmp_path)) == ["exported", "unrelated"]    # no staging or set-aside folder left

    with pytest.raises(RuntimeError, match="killed"):                   # a failed block changes nothing
        with paths.staged_dir(final) as tmp:
            open(os.path.join(tmp, "manifest.json"), "w").write("half")
            raise RuntimeError("killed")
    assert (final / "manifest.json").read_text() == "new" and not os.path.exists(tmp)

    real_replace, calls = os.replace, []

    def fail_on_second_rename(src, dst):                                # interrupted between the two renames
        calls.append((src, dst))
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", fail_on_second_rename)
    with pytest.raises(KeyboardInterrupt):
        with paths.staged_dir(final) as tmp:
            open(os.path.join(tmp, "manifest.json"), "w").write("newer")
    monkeypatch.undo()
    assert calls[0][0] == str(final) and calls[2] == (calls[0][1], str(final))  # set aside, then put back
    assert (final / "manifest.json").read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["exported", "unrelated"]


def test_staged_dir_on_gs_uploads_complete_folders_manifest_last(gcs, tmp_path, monkeypatch):
    final = "gs://bucket/exported"
    paths.write_text(paths.join(final, "stale.txt"), "from the last export")
    uploaded = []
    real_copy = paths.copy
    monkeypatch.setattr(paths, "copy", lambda src, dst: (uploaded.append(dst), real_copy(src, dst)))
    with paths.staged_dir(final) as tmp:
        assert not paths.is_remote(tmp) and os.path.isdir(tmp)
        os.makedirs(os.path.join(tmp, "nested"))
        for rel in ("manifest.json", "weights.npz", "nested/a.bin"):
            with open(os.path.join(tmp, rel), "w") as f:
                f.write(rel)
    assert not os.path.exists(tmp)                                          # the staging folder is removed
    assert paths.listdir(final) == ["manifest.json", "nested", "weights.npz"]   # the old folder replaced
    assert paths.read_text(paths.join(final, "nested", "a.bin")) == "nested/a.bin"
    assert uploaded[-1] == final + "/manifest.json" and len(uploaded) == 3  # a reader seeing it sees the rest

    with pytest.raises(RuntimeError, match="killed"):                       # a failed export changes nothing
        with paths.staged_dir(final) as tmp:
            open(os.path.join(tmp, "manifest.json"), "w").close()
            raise RuntimeError("killed")
    assert paths.read_text(paths.join(final, "manifest.json")) == "manifest.json" and not os.path.exists(tmp)

    paths.rmtree(final)
    assert not paths.exists(final)
    paths.rmtree(final, missing_ok=True)
    with pytest.raises(FileNotFoundError, match="exported: no such folder"):
        paths.rmtree(final)


def _rows(text):
    return [json.loads(line) for line in text.splitlines()]


def test_metric_writer_on_gs_uploads_and_resumes(gcs, tmp_path):
    from defi_jax import metrics
    workdir = "gs://bucket/run"
    w = metrics.MetricWriter(workdir, sync_every_s=3600.0)
    for step in (1, 2, 3):
        w.write(step, {"loss": 1.0 / step})
    assert not paths.exists(paths.join(workdir, "metrics.jsonl"))  # staged locally until the next sync
    w.close()
    assert [r["step"] for r in _rows(paths.read_text(paths.join(workdir, "metrics.jsonl")))] == [1, 2, 3]
    events = paths.listdir(paths.join(workdir, "tensorboard"))
    assert len(events) == 1 and events[0].startswith("events.out.tfevents")

    # A resumed run at step 2 drops row 3 (it is redone) and appends; with sync_every_s=0 each row is uploaded.
    w = metrics.MetricWriter(workdir, resume_step=2, sync_every_s=0.0)
    w.write(3, {"loss": 0.5})
    assert [r["step"] for r in _rows(paths.read_text(paths.join(workdir, "metrics.jsonl")))] == [1, 2, 3]
    assert _rows(paths.read_text(paths.join(workdir, "metrics.jsonl")))[-1]["loss"] == 0.5
    w.close()
    # The first run's TensorBoard event of step 3 is purged from its (uploaded) event file: each step once.
    tb = paths.join(workdir, "tensorboard")
    assert len(paths.listdir(tb)) == 2
    events = [e for name in paths.listdir(tb) for e in _loss_events(paths.read_bytes(paths.join(tb, name)))]
    assert sorted(events) == [(1, 1.0), (2, 0.5), (3, 0.5)]      # (the listing order of two files is arbitrary)


def _loss_events(data):
    """``[(step, loss)]`` of a TensorBoard event file's bytes (TFRecords: u64 length, u32 CRC, payload, u32 CRC)."""
    import struct

    from tensorboardX.proto import event_pb2
    out, at = [], 0
    while at < len(data):
        (n,) = struct.unpack("<Q", data[at:at + 8])
        event = event_pb2.Event.FromString(data[at + 12:at + 12 + n])
        out += [(event.step, v.simple_value) for v in event.summary.value if v.tag == "loss"]
        at += 16 + n
    return out


def test_metric_writer_local_resume_drops_a_cut_line(tmp_path):
    from defi_jax import metrics
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n{"step": 3, "lo')  # killed mid-line
    w = metrics.MetricWriter(str(tmp_path), resume_step=2)
    w.write(3, {"loss": 0.25})
    w.close()
    assert _rows(path.read_text()) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}, {"step": 3, "loss": 0.25}]


def test_sample_gif_on_gs_with_frame_duration(gcs, tmp_path):
    from PIL import Image

    from defi_jax.gfdm import evaluation
    rng = np.random.default_rng(0)
    real, fake = (rng.integers(0, 256, (3, 4, 8, 8, 3), dtype=np.uint8) for _ in range(2))
    path = "gs://bucket/run/samples/step_00000008.gif"
    assert evaluation.write_video_grid(path, [real, fake], fps=4.0) == path
    with paths.open(path, "rb") as f, Image.open(f) as gif:
        assert gif.n_frames == 4 and gif.size == (3 * 8, 2 * 8)   # clips side by side, (real ; sampled)
        assert gif.info["duration"] == 250 and gif.info["loop"] == 0


def test_precompute_latents_to_gs(gcs, tmp_path, demo_data_dir, monkeypatch):
    """launch.precompute_latents --out=gs://...: shards staged locally, uploaded complete, read back through the
    path layer; nothing lands in a local ``gs:`` folder (the fixture checks the working directory)."""
    from array_record.python import array_record_module
    from flax import nnx

    from configs.gfdm import get_config
    from defi_jax import records
    from defi_jax.gfdm import latents
    from defi_jax.models.svd_vae import AutoencoderKLTemporalDecoder, VAEConfig
    from launch.precompute_latents import encode_split

    staging = tmp_path / "staging"
    staging.mkdir()
    monkeypatch.setattr(records.tempfile, "tempdir", str(staging))   # where the local shard is written
    config = get_config("tiny")
    config.data.data_dir = demo_data_dir
    vae = AutoencoderKLTemporalDecoder(VAEConfig.from_dict(dict(config.model.vae)), rngs=nnx.Rngs(3))
    out = "gs://bucket/latents"
    meta = encode_split(config, vae, out, "train", num_clips=3, batch_per_device=1)
    assert meta["num_records"] == 3 and meta["latent_shape"] == [4, 16, 16, 4]
    assert paths.listdir(out) == ["train-00000-of-00001.array_record", "train-00000-of-00001.json"]
    assert latents.shard_paths(out, "train") == [out + "/train-00000-of-00001.array_record"]
    assert latents.read_meta(out, "train") == meta
    assert os.listdir(staging) == []                                 # the staging folder is removed
    with pytest.raises(FileNotFoundError, match="no eval-"):
        latents.shard_paths(out, "eval")

    # The uploaded shard is the whole ArrayRecord file: every record decodes to a clip of the meta's shape.
    local = tmp_path / "bucket" / "bucket" / "latents" / "train-00000-of-00001.array_record"
    reader = array_record_module.ArrayRecordReader(str(local))
    got = [latents.decode_record(r) for r in reader.read_all()]
    reader.close()
    assert len(got) == 3 and all(g["latents"].shape == (4, 16, 16, 4) for g in got)
    assert all(np.isfinite(g["latents"]).all() and g["instruction"] for g in got)
