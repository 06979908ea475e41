"""Look at what a dataset gives the pipeline: one JSON line per standardized sample + contact-sheet PNGs.

  python -m launch.inspect_data --dataset bridge --data_dir /data --num 4 --out /tmp/inspect
  python -m launch.inspect_data --dataset demo --num 2 --out /tmp/inspect        # the embedded demo data
  python -m launch.inspect_data --dataset my_robot --lerobot /data/my_robot --num 2   # a LeRobot dataset folder

NAME is a dataset of the standardization table (an OXE name, calvin, demo), a CALVIN released-layout task
(calvin_abc_d, ...: --data_dir = the task folder, e.g. .../task_ABC_D; one sample per annotated segment), ssv2,
ego4d, demo_human, or a LeRobot dataset (v2.1 / v3.0; one sample per episode): --lerobot PATH registers the
folder as NAME with ``register_lerobot``'s defaults (the first two cameras, the first 7 action components); one
registered in the same process before ``main`` runs is read where it was registered. --data_dir is the root
holding <NAME>/ (or that folder itself). Robot datasets are read from their converted ArrayRecord copy when there
is one, else straight from the RLDS TFRecords with tensorflow-datasets.
Each JSON line: dataset, source, instruction, the frame shape of each view, the action shape and first row.
"""

import argparse
import json
import os

import numpy as np


def _sheet(views: dict[str, np.ndarray], path: str, columns: int = 8, tile: int = 96) -> None:
    """Rows = views, columns = frames evenly spaced over the sample."""
    from PIL import Image

    rows = []
    for frames in views.values():
        pick = np.linspace(0, len(frames) - 1, min(columns, len(frames))).round().astype(int)
        row = [np.asarray(Image.fromarray(frames[i]).resize((tile, tile))) for i in pick]
        row += [np.zeros((tile, tile, 3), np.uint8)] * (columns - len(row))
        rows.append(np.concatenate(row, 1))
    Image.fromarray(np.concatenate(rows, 0)).save(path)


def _robot_samples(name, path, num, size):
    from data_pipelines import arrayrecord, video

    if arrayrecord.has_split(path, "train"):
        reader = arrayrecord.StepReader(path, "train")
        for e, ep in enumerate(reader.index["episodes"][:num]):
            steps = list(range(ep["start"], ep["start"] + ep["length"]))
            recs = reader.records(steps)
            views = {v: np.stack([video.decode_image(r[v], size) for r in recs]) for v in reader.index["views"]}
            yield (ep.get("source") or f"{path} episode {e}", ep["instruction"], views,
                   np.asarray(reader.actions[steps[0]:steps[-1] + 1]))
        return
    from data_pipelines import rlds

    for k, (ep_id, ep) in enumerate(rlds.read_rlds(path, name, "train")):
        if k >= num:
            return
        if isinstance(ep, Exception):
            print(json.dumps({"dataset": name, "source": ep_id, "error": f"{type(ep).__name__}: {ep}"}))
            continue
        views = {v: np.stack([video.decode_image(f, size) for f in frames]) for v, frames in ep["views"].items()}
        yield ep_id, ep["instruction"], views, ep["actions"]


def _calvin_samples(name, path, num, size):
    from data_pipelines import calvin, oxe_table

    task = calvin.task_dir(path, oxe_table.CALVIN_DATASETS[name].folder)
    return _episodes(calvin.FrameReader(task, "train", name), num, size)


def _lerobot_samples(name, path, num, size):
    from data_pipelines import lerobot, oxe_table

    return _episodes(lerobot.EpisodeReader(path, oxe_table.LEROBOT_DATASETS[name]), num, size)


def _episodes(reader, num, size):
    """The first ``num`` episodes of a reader whose records hold decoded frames (CALVIN, LeRobot)."""
    from data_pipelines import video

    for e, ep in enumerate(reader.index["episodes"][:num]):
        frames = list(range(ep["start"], ep["start"] + ep["length"]))
        recs = reader.records(frames)
        views = {v: np.stack([video.resize_crop(r[v], size) for r in recs]) for v in reader.index["views"]}
        yield reader.describe(e, 0), ep["instruction"], views, reader.actions[frames]


def _video_samples(name, path, num, size):
    from data_pipelines import oxe_table, video

    row = oxe_table.VIDEO_DATASETS[name]
    items = video.ssv2_items(path, "train") if row.layout == "ssv2" else video.ego4d_items(path)
    for item in items[:num]:
        try:
            if row.layout == "ego4d":
                lo = max(0.0, item["center_s"] - row.window_seconds / 2)
                times = lo + np.arange(int(row.window_seconds * row.fps)) / row.fps
            else:
                times = np.arange(int(video.probe_duration(item["path"]) * row.fps)) / row.fps
            frames = video.decode_at(item["path"], list(times[:256]), size)
        except Exception as e:  # noqa: BLE001 - report the bad file and keep going
            print(json.dumps({"dataset": name, "source": item["path"], "error": f"{type(e).__name__}: {e}"}))
            continue
        yield item["path"], item["instruction"], {"video": frames}, None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True)
    p.add_argument("--data_dir", default="", help="root holding <dataset>/ (default: the embedded demo data)")
    p.add_argument("--num", type=int, default=4)
    p.add_argument("--out", default="", help="folder for contact-sheet PNGs (none when empty)")
    p.add_argument("--size", type=int, default=128, help="frame size (short side resize + centre crop)")
    p.add_argument("--lerobot", default="", help="a LeRobot dataset folder, registered as --dataset")
    a = p.parse_args(argv)
    data_dir, out = (d if not d or d.startswith("gs://") else os.path.abspath(d) for d in (a.data_dir, a.out))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from data_pipelines import demo, lerobot, oxe_table

    if a.lerobot:
        try:
            lerobot.register_lerobot(a.dataset, os.path.abspath(a.lerobot))
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"inspect_data: --lerobot={a.lerobot}: {e}") from None
    name = oxe_table.resolve(a.dataset)
    if name not in oxe_table.known_datasets():
        raise SystemExit(f"inspect_data: --dataset={a.dataset!r} unknown; known: {oxe_table.known_datasets()}")
    if data_dir and not data_dir.startswith("gs://") and not os.path.isdir(data_dir):
        raise SystemExit(f"inspect_data: --data_dir={data_dir} does not exist")
    if name in oxe_table.LEROBOT_DATASETS:      # read where it was registered, unless --data_dir says otherwise
        path = data_dir or oxe_table.LEROBOT_DATASETS[name].path
    else:
        root = data_dir or demo.ensure_demo_data()
        path = os.path.join(root, name) if os.path.isdir(os.path.join(root, name)) else root
    if name in oxe_table.LEROBOT_DATASETS:
        sampler = _lerobot_samples
    elif name in oxe_table.ROBOT_DATASETS:
        sampler = _robot_samples
    elif name in oxe_table.CALVIN_DATASETS:
        sampler = _calvin_samples
    else:
        sampler = _video_samples
    gen = sampler(name, path, a.num, a.size)
    if out:
        os.makedirs(out, exist_ok=True)
    try:
        for k, (source, instruction, views, actions) in enumerate(gen):
            line = {"dataset": name, "source": source, "instruction": instruction,
                    "frames": {v: list(f.shape) for v, f in views.items()},
                    "actions": None if actions is None else list(actions.shape),
                    "first_action": None if actions is None else [round(float(x), 5) for x in actions[0]]}
            if out:
                line["contact_sheet"] = os.path.join(out, f"{name}_{k:04d}.png")
                _sheet(views, line["contact_sheet"])
            print(json.dumps(line), flush=True)
    except (FileNotFoundError, ValueError) as e:   # no dataset there: say so, not a TensorFlow traceback
        raise SystemExit(f"inspect_data: {name} at {path}: {e}") from None


if __name__ == "__main__":
    main()
