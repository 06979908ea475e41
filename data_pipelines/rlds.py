"""RLDS (TFDS TFRecord) episodes -> standardized episodes, and a small RLDS writer.

Reading uses tensorflow-datasets (``builder_from_directory``) and is only needed once, by the converter
(``python -m launch.convert_rlds``) and by the tf.data baseline of the data benchmark; training reads the
converted ArrayRecord files without TensorFlow.

A standardized episode is a dict:
  dataset      str
  instruction  str
  views        {"primary": [encoded image bytes] * T, "wrist": [...] * T}   (wrist only where the dataset has one)
  actions      float32[T, 7] (3 EEF-delta position, 3 rotation, gripper 1 = open) or None
  control_hz   float
"""

from __future__ import annotations


import os
from collections.abc import Iterator

import numpy as np

from data_pipelines import oxe_table


def find_tfds_dir(path: str) -> str:
    """The TFDS version folder (the one holding dataset_info.json) at or below ``path`` (depth <= 2)."""
    import tensorflow as tf  # local: training never imports TensorFlow

    if not tf.io.gfile.isdir(path):
        raise FileNotFoundError(f"{path} does not exist (expected a TFDS dataset folder)")
    if tf.io.gfile.exists(os.path.join(path, "dataset_info.json")):
        return path
    for sub in sorted(tf.io.gfile.listdir(path), reverse=True):  # newest version first
        sub_path = os.path.join(path, sub.rstrip("/"))
        if tf.io.gfile.isdir(sub_path):
            if tf.io.gfile.exists(os.path.join(sub_path, "dataset_info.json")):
                return sub_path
            for sub2 in sorted(tf.io.gfile.listdir(sub_path), reverse=True):
                p = os.path.join(sub_path, sub2.rstrip("/"))
                if tf.io.gfile.exists(os.path.join(p, "dataset_info.json")):
                    return p
    raise FileNotFoundError(f"no TFDS dataset (dataset_info.json) found under {path}")


def _get(step: dict, path: str):
    node = step
    for part in path.split("/"):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(f"step has no key {path!r} (at {part!r}; available: {sorted(node) if isinstance(node, dict) else '-'})")
        node = node[part]
    return node


def _quat_to_euler(q_N4: np.ndarray) -> np.ndarray:
    x, y, z, w = (q_N4[..., i] for i in range(4))
    roll = np.arctan2(2 * (w * x + y * z), 1 - 2 * (x * x + y * y))
    pitch = np.arcsin(np.clip(2 * (w * y - z * x), -1.0, 1.0))
    yaw = np.arctan2(2 * (w * z + x * y), 1 - 2 * (y * y + z * z))
    return np.stack([roll, pitch, yaw], -1)


def standardize_action(row: oxe_table.RobotDataset, steps: list[dict]) -> np.ndarray:
    """The table's action recipe applied to every step -> float32[T, 7]."""
    cols = []
    T = len(steps)
    for part in row.action_parts:
        if part[0] == "zeros":
            cols.append(np.zeros((T, part[1]), np.float32))
        elif part[0] == "key":
            _, path, start, stop = part
            v = np.stack([np.asarray(_get(s, path), np.float32).reshape(-1) for s in steps])
            cols.append(v[:, start:stop])
        elif part[0] == "quat_to_euler":
            _, path, start = part
            v = np.stack([np.asarray(_get(s, path), np.float32).reshape(-1) for s in steps])
            cols.append(_quat_to_euler(v[:, start:start + 4]).astype(np.float32))
        else:
            raise ValueError(f"{row.name}: unknown action part {part!r}")
    a = np.concatenate(cols, -1).astype(np.float32)
    if a.shape[1] != 7:
        raise ValueError(f"{row.name}: action recipe gives {a.shape[1]} dims, expected 7")
    g = a[:, 6]
    if row.gripper == "open":
        g = np.clip(g, 0, 1)
    elif row.gripper == "closed":
        g = 1 - np.clip(g, 0, 1)
    elif row.gripper == "signed":
        g = (np.clip(g, -1, 1) + 1) / 2
    elif row.gripper == "signed_closed":
        g = (1 - np.clip(g, -1, 1)) / 2
    elif row.gripper == "none":
        g = np.zeros_like(g)
    else:
        raise ValueError(f"{row.name}: unknown gripper convention {row.gripper!r}")
    a[:, 6] = g
    return a


def _text(value, encoding: str) -> str:
    if encoding == "utf8_ints":
        codes = np.asarray(value).reshape(-1)
        return bytes(int(c) for c in codes if c != 0).decode("utf-8", "replace").strip()
    if isinstance(value, (bytes, np.bytes_)):
        return value.decode("utf-8", "replace").strip()
    return str(value).strip()


def standardize_episode(row: oxe_table.RobotDataset, steps: list[dict]) -> dict:
    """Raw RLDS steps (numpy, images still encoded) -> a standardized episode. Raises on bad input."""
    if not steps:
        raise ValueError("empty episode")
    views = {}
    for view, key in (("primary", row.primary), ("wrist", row.wrist)):
        if key is None:
            continue
        frames = [_get(s, key) for s in steps]
        for f in frames:
            if not isinstance(f, (bytes, np.bytes_)) or len(f) == 0:
                raise ValueError(f"{key}: expected encoded image bytes (decode with SkipDecoding)")
        views[view] = [bytes(f) for f in frames]
    instruction = _text(_get(steps[0], row.instruction), row.instruction_encoding)
    if not instruction:
        raise ValueError(f"empty instruction at {row.instruction!r}")
    actions = standardize_action(row, steps)
    if not np.all(np.isfinite(actions)):
        raise ValueError("non-finite action")
    return dict(dataset=row.name, instruction=instruction, views=views, actions=actions,
                control_hz=row.control_hz)


def _skip_decoders(builder, row: oxe_table.RobotDataset):
    import tensorflow_datasets as tfds

    dec: dict = {}
    for key in (row.primary, row.wrist):
        if key is None:
            continue
        node = dec.setdefault("steps", {})
        parts = key.split("/")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = tfds.decode.SkipDecoding()
    return dec


def read_rlds(path: str, dataset: str, split: str = "train") -> Iterator[tuple[str, dict | Exception]]:
    """Yields (episode id, standardized episode or the exception that made it unusable) from a TFDS dir.

    Shards are read one at a time, so a corrupt TFRecord file loses only the rest of that file (reported as
    one failure naming it), never the dataset.
    """
    import tensorflow_datasets as tfds

    row = oxe_table.ROBOT_DATASETS[oxe_table.resolve(dataset)]
    builder = tfds.builder_from_directory(find_tfds_dir(path))
    info = builder.info.splits[split]
    files = [str(f) for f in info.filepaths]
    for shard in range(info.num_shards):
        ds = builder.as_dataset(split=f"{split}[{shard}shard:{shard + 1}shard]", shuffle_files=False,
                                decoders=_skip_decoders(builder, row))
        it = iter(ds)
        i = 0
        while True:
            ep_id = f"{files[shard] if shard < len(files) else split}[{i}]"
            try:
                ep = next(it)
            except StopIteration:
                break
            except Exception as e:  # a corrupt record ends this file: report it, go on with the next file
                yield ep_id, e
                break
            try:
                yield ep_id, standardize_episode(row, list(tfds.as_numpy(ep["steps"])))
            except Exception as e:  # one bad episode is skipped and counted by the caller
                yield ep_id, e
            i += 1


def splits(path: str) -> list[str]:
    import tensorflow_datasets as tfds

    return list(tfds.builder_from_directory(find_tfds_dir(path)).info.splits)


# --------------------------------------------------------------------------------------------- writing
def _infer_feature(value):
    """Feature for one step value: uint8 HxWx3 -> JPEG Image, str -> Text, bool -> Scalar, else a Tensor."""
    import tensorflow_datasets as tfds

    if isinstance(value, dict):
        return tfds.features.FeaturesDict({k: _infer_feature(v) for k, v in value.items()})
    if isinstance(value, (str, bytes)):
        return tfds.features.Text()
    arr = np.asarray(value)
    if arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[-1] == 3:
        return tfds.features.Image(shape=arr.shape, dtype=np.uint8, encoding_format="jpeg")
    if arr.dtype == np.bool_:
        return tfds.features.Scalar(dtype=np.bool_) if arr.ndim == 0 else tfds.features.Tensor(
            shape=arr.shape, dtype=np.bool_)
    dtype = np.int32 if np.issubdtype(arr.dtype, np.integer) else np.float32
    return tfds.features.Tensor(shape=arr.shape, dtype=dtype)


def write_rlds(out_dir: str, name: str, episodes: dict[str, list[dict]], *, version: str = "1.0.0",
               description: str = "", num_shards: int | None = None) -> str:
    """Write a real TFDS RLDS dataset (TFRecord + dataset_info.json) to ``out_dir/name/version``.

    ``episodes``: split -> list of episodes; an episode is {"steps": [step dicts], "episode_metadata": {...}}.
    Steps may nest dicts (``{"observation": {...}, "action": {...} or array, "language_instruction": str}``);
    the feature of each leaf follows its value: uint8[H, W, 3] -> JPEG image, str -> text, arrays -> tensors.
    is_first / is_last / is_terminal / reward / discount are added. Returns the version folder.
    """
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
    first = next(ep for eps in episodes.values() for ep in eps)["steps"][0]
    step_features = {k: _infer_feature(v) for k, v in first.items()}
    step_features.update({
        "reward": tfds.features.Scalar(dtype=np.float32), "discount": tfds.features.Scalar(dtype=np.float32),
        "is_first": tfds.features.Scalar(dtype=np.bool_), "is_last": tfds.features.Scalar(dtype=np.bool_),
        "is_terminal": tfds.features.Scalar(dtype=np.bool_)})
    features = tfds.features.FeaturesDict({
        "steps": tfds.features.Dataset(step_features),
        "episode_metadata": tfds.features.FeaturesDict({"file_path": tfds.features.Text()}),
    })

    def gen(split_eps):
        for i, ep in enumerate(split_eps):
            T = len(ep["steps"])
            steps = [dict(s, reward=np.float32(s.get("reward", 0.0)), discount=np.float32(1.0), is_first=t == 0,
                          is_last=t == T - 1, is_terminal=t == T - 1) for t, s in enumerate(ep["steps"])]
            yield f"ep{i:06d}", {"steps": steps,
                                 "episode_metadata": {"file_path": ep.get("episode_metadata", {}).get(
                                     "file_path", f"episode_{i}")}}

    with tfds.core.registered.skip_registration():
        class _Builder(tfds.core.GeneratorBasedBuilder):
            VERSION = tfds.core.Version(version)
            code_path = None  # built at runtime: no module folder to look for checksums in

            def _info(self):
                return self.dataset_info_from_configs(features=features, description=description,
                                                      supervised_keys=None)

            def _split_generators(self, dl_manager):
                return {split: gen(eps) for split, eps in episodes.items()}

            def _generate_examples(self):  # unused: _split_generators returns generators directly
                raise NotImplementedError

        _Builder.name = name
    builder = _Builder(data_dir=out_dir, file_format="tfrecord")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        beam_runner=None, num_shards=num_shards, compute_stats=tfds.download.ComputeStatsMode.SKIP))
    return os.path.join(out_dir, name, version)


