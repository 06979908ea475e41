"""Per-dataset facts, kept as plain tables separate from the pipeline mechanics.

Every robot dataset is described by one :class:`RobotDataset` row: which observation keys hold the primary
(third-person) and wrist cameras, where the language instruction lives, how to assemble a 7-D action
(3 EEF-delta position, 3 EEF-delta rotation, 1 gripper with 1 = open, 0 = closed), and the control rate.
The facts follow the Open X-Embodiment dataset sheet and Octo's / OpenVLA's standardization tables; the code
is ours. CALVIN in its released layout (read in place, no conversion) has its own small table,
CALVIN_DATASETS; LeRobot datasets get rows in LEROBOT_DATASETS when registered (``lerobot.register_lerobot``).
DeFI pretraining reads only frames and instructions; the action recipes matter for policy fine-tuning and
the GIDM's action probe (the camera keys were cross-checked against OpenVLA's table; the action recipes and
gripper conventions of the smaller datasets are best-effort and worth a look with
``python -m launch.inspect_data`` before training on them).

Keys are paths inside one RLDS step, ``/``-separated (``observation/image``). An action is built from
``action_parts``, each one of
  ("key", path, start, stop)   a slice of a float vector (stop None = to the end)
  ("zeros", n)                 n zeros (a missing rotation, a missing gripper)
  ("quat_to_euler", path, start)  a quaternion (x, y, z, w) at [start:start+4] turned into roll/pitch/yaw
followed by ``gripper``, how the LAST component is mapped onto 1 = open / 0 = closed:
  "open"       already 1 = open (clipped to [0, 1])
  "closed"     1 = closed (becomes 1 - x)
  "signed"     -1 = closed, +1 = open (becomes (x + 1) / 2)
  "signed_closed"  +1 = closed, -1 = open
  "none"       the dataset has no gripper command; the component is 0 and stays 0.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class RobotDataset:
    name: str                       # TFDS builder name (folder name under the data root)
    primary: str | None             # observation key of the third-person camera
    wrist: str | None               # observation key of the wrist camera (None: the dataset has none)
    instruction: str                # step key of the instruction text ("observation/..." or "language_instruction")
    action_parts: tuple             # see the module docstring
    gripper: str                    # see the module docstring
    control_hz: float               # control rate (actions per second)
    instruction_encoding: str = "text"   # "text" | "utf8_ints" (Language-Table stores UTF-8 codes, 0-padded)


@dataclasses.dataclass(frozen=True)
class CalvinDataset:
    """CALVIN in its released layout, read in place (``data_pipelines.calvin``): no RLDS conversion."""

    name: str
    folder: str                     # the released task folder (its training/ and validation/ hold the frames)
    control_hz: float = 30.0


@dataclasses.dataclass(frozen=True)
class LeRobotDataset:
    """A LeRobot dataset folder (v2.1 / v3.0), read in place (``data_pipelines.lerobot``); rows are added at run
    time by ``lerobot.register_lerobot``, which fills them from the dataset's meta/info.json."""

    name: str
    path: str                       # the dataset folder (data.paths.<name> overrides it)
    image_keys: tuple               # ((view, feature key), ...), view "primary" | "wrist"
    action_key: str = "action"
    action_dims: tuple | None = None   # components of action_key making the 7-D action (None: first 7, padded)
    gripper: str = "open"           # convention of the 7th component (module docstring)
    control_hz: float = 30.0        # info.json's fps
    instruction: str | None = None  # a fixed instruction instead of each episode's task


GRIPPER_CONVENTIONS = ("open", "closed", "signed", "signed_closed", "none")


@dataclasses.dataclass(frozen=True)
class VideoDataset:
    name: str
    layout: str                     # "ssv2" | "ego4d"
    fps: float                      # frames are resampled to this rate before sampling
    window_seconds: float = 4.0     # Ego4D: a sample is a window of this length centred on a narration


def _std7(prefix: str = "action") -> tuple:
    """world_vector (3) + rotation_delta (3) + gripper (1): the RT-1 style action dict."""
    return (("key", f"{prefix}/world_vector", 0, None), ("key", f"{prefix}/rotation_delta", 0, None))


def _flat(n: int = 7) -> tuple:
    return (("key", "action", 0, n),)


_NL = "observation/natural_language_instruction"
_LI = "language_instruction"

ROBOT_DATASETS: dict[str, RobotDataset] = {d.name: d for d in [
    RobotDataset("fractal20220817_data", "observation/image", None, _NL,
                 _std7() + (("key", "action/gripper_closedness_action", 0, 1),), "signed_closed", 3.0),
    RobotDataset("kuka", "observation/image", None, _NL,
                 _std7() + (("key", "action/gripper_closedness_action", 0, 1),), "closed", 10.0),
    RobotDataset("bridge", "observation/image", None, _NL,
                 _std7() + (("key", "action/open_gripper", 0, 1),), "open", 5.0),
    RobotDataset("taco_play", "observation/rgb_static", "observation/rgb_gripper", _NL,
                 (("key", "action/rel_actions_world", 0, 7),), "signed", 15.0),
    RobotDataset("jaco_play", "observation/image", "observation/image_wrist", _NL,
                 (("key", "action/world_vector", 0, 3), ("zeros", 3),
                  ("key", "action/gripper_closedness_action", 0, 1)), "signed_closed", 10.0),
    RobotDataset("berkeley_cable_routing", "observation/image", "observation/wrist45_image", _NL,
                 _std7() + (("zeros", 1),), "none", 10.0),
    RobotDataset("roboturk", "observation/front_rgb", None, _NL,
                 _std7() + (("key", "action/gripper_closedness_action", 0, 1),), "signed_closed", 10.0),
    RobotDataset("viola", "observation/agentview_rgb", "observation/eye_in_hand_rgb", _NL,
                 _std7() + (("key", "action/gripper_closedness_action", 0, 1),), "signed_closed", 20.0),
    RobotDataset("berkeley_autolab_ur5", "observation/image", "observation/hand_image", _NL,
                 _std7() + (("key", "action/gripper_closedness_action", 0, 1),), "closed", 5.0),
    RobotDataset("toto", "observation/image", None, _NL,
                 _std7() + (("key", "action/open_gripper", 0, 1),), "open", 30.0),
    RobotDataset("language_table", "observation/rgb", None, "observation/instruction",
                 (("key", "action", 0, 2), ("zeros", 4), ("zeros", 1)), "none", 10.0,
                 instruction_encoding="utf8_ints"),
    RobotDataset("stanford_hydra_dataset_converted_externally_to_rlds", "observation/image",
                 "observation/wrist_image", _LI, _flat(), "open", 10.0),
    RobotDataset("austin_buds_dataset_converted_externally_to_rlds", "observation/image",
                 "observation/wrist_image", _LI, _flat(), "signed_closed", 20.0),
    RobotDataset("nyu_franka_play_dataset_converted_externally_to_rlds", "observation/image",
                 "observation/image_additional_view", _LI,
                 (("key", "action", 7, 13), ("key", "action", 13, 14)), "signed_closed", 3.0),
    RobotDataset("furniture_bench_dataset_converted_externally_to_rlds", "observation/image",
                 "observation/wrist_image", _LI,
                 (("key", "action", 0, 3), ("quat_to_euler", "action", 3), ("key", "action", 7, 8)),
                 "signed_closed", 10.0),
    RobotDataset("ucsd_kitchen_dataset_converted_externally_to_rlds", "observation/image", None, _LI,
                 (("key", "action", 0, 6), ("key", "action", 6, 7)), "closed", 2.0),
    RobotDataset("austin_sailor_dataset_converted_externally_to_rlds", "observation/image",
                 "observation/wrist_image", _LI, _flat(), "signed_closed", 20.0),
    RobotDataset("austin_sirius_dataset_converted_externally_to_rlds", "observation/image",
                 "observation/wrist_image", _LI, _flat(), "signed_closed", 20.0),
    RobotDataset("dlr_edan_shared_control_converted_externally_to_rlds", "observation/image", None, _LI,
                 _flat(), "closed", 5.0),
    RobotDataset("iamlab_cmu_pickup_insert_converted_externally_to_rlds", "observation/image",
                 "observation/wrist_image", _LI,
                 (("key", "action", 0, 3), ("quat_to_euler", "action", 3), ("key", "action", 7, 8)),
                 "open", 20.0),
    RobotDataset("utaustin_mutex", "observation/image", "observation/wrist_image", _LI, _flat(),
                 "signed_closed", 20.0),
    RobotDataset("berkeley_fanuc_manipulation", "observation/image", "observation/wrist_image", _LI,
                 (("key", "action", 0, 6), ("zeros", 1)), "none", 10.0),
    RobotDataset("cmu_stretch", "observation/image", None, _LI,
                 (("key", "action", 0, 3), ("zeros", 3), ("key", "action", 7, 8)), "open", 10.0),
    RobotDataset("bc_z", "observation/image", None, _NL,
                 (("key", "action/future/xyz_residual", 0, 3), ("key", "action/future/axis_angle_residual", 0, 3),
                  ("key", "action/future/target_close", 0, 1)), "closed", 10.0),
    RobotDataset("fmb", "observation/image_side_1", "observation/image_wrist_1", _LI, _flat(),
                 "closed", 10.0),
    RobotDataset("dobbe", "observation/wrist_image", None, _LI, _flat(), "open", 3.75),
    # CALVIN is not part of OXE; this row describes its common RLDS conversion (rel_actions: 6 deltas + gripper).
    RobotDataset("calvin", "observation/rgb_static", "observation/rgb_gripper", _LI,
                 (("key", "action", 0, 7),), "signed", 30.0),
    # The embedded Meta-World demo data (``python -m launch.make_demo_data``): the raw 4-D env action
    # (xyz delta, gripper effort +1 = close); Meta-World steps at 80 Hz (frame_skip 5 x 2.5 ms).
    RobotDataset("demo", "observation/image", "observation/wrist_image", _LI,
                 (("key", "action", 0, 3), ("zeros", 3), ("key", "action", 3, 4)), "signed_closed", 80.0),
]}

# data.paths[name] (or <data_dir>/<name>) points at the task folder, e.g. .../task_ABC_D.
CALVIN_DATASETS: dict[str, CalvinDataset] = {d.name: d for d in [
    CalvinDataset("calvin_abc_d", "task_ABC_D"),
    CalvinDataset("calvin_abcd_d", "task_ABCD_D"),
    CalvinDataset("calvin_d_d", "task_D_D"),
    CalvinDataset("calvin_debug", "calvin_debug_dataset"),
]}

VIDEO_DATASETS: dict[str, VideoDataset] = {d.name: d for d in [
    VideoDataset("ssv2", layout="ssv2", fps=12.0),
    VideoDataset("ego4d", layout="ego4d", fps=10.0, window_seconds=4.0),
    # The demo's human-video stand-in: action-free Meta-World videos in the SSv2 layout, at the robot rate.
    VideoDataset("demo_human", layout="ssv2", fps=80.0),
]}

# LeRobot datasets registered at run time (data_pipelines.lerobot.register_lerobot): name -> row.
LEROBOT_DATASETS: dict[str, LeRobotDataset] = {}

# GIDM frame pairs with data.pair_spacing = "reference" (Step2_GIDM/datasets/rlds/dataset.py l.39-50, 360-367): the
# first and last frame of a window of W steps (so n = W - 1 steps apart), W drawn from [lo, hi]; W = 10 elsewhere.
# The reference lists toto under both the 3-5 Hz and the 15-30 Hz datasets; its second check (15-20) wins, as here.
_LOW_RATE, _HIGH_RATE = (3, 5), (15, 20)
REFERENCE_PAIR_WINDOWS: dict[str, tuple[int, int]] = {
    "fractal20220817_data": _LOW_RATE, "berkeley_autolab_ur5": _LOW_RATE,
    "nyu_franka_play_dataset_converted_externally_to_rlds": _LOW_RATE,
    "ucsd_kitchen_dataset_converted_externally_to_rlds": _LOW_RATE,
    "dlr_edan_shared_control_converted_externally_to_rlds": _LOW_RATE, "dobbe": _LOW_RATE,
    "toto": _HIGH_RATE, "utaustin_mutex": _HIGH_RATE,
    "iamlab_cmu_pickup_insert_converted_externally_to_rlds": _HIGH_RATE,
    "austin_sailor_dataset_converted_externally_to_rlds": _HIGH_RATE, "viola": _HIGH_RATE, "droid": _HIGH_RATE,
    "ego4d": (2, 2),
}
DEFAULT_PAIR_WINDOW = (10, 10)

# Names in DeFI's tables -> dataset names above.
ALIASES = {
    "fractal": "fractal20220817_data", "rt1": "fractal20220817_data", "rt-1": "fractal20220817_data",
    "something_something_v2": "ssv2", "fmb_dataset": "fmb",
}


def known_datasets() -> list[str]:
    """Every dataset name a mixture may use (registered LeRobot datasets last: the built-ins keep their index,
    which is their dataset_id)."""
    return sorted(list(ROBOT_DATASETS) + list(CALVIN_DATASETS) + list(VIDEO_DATASETS)) + sorted(LEROBOT_DATASETS)


def resolve(name: str) -> str:
    return ALIASES.get(name, name)


def control_hz(name: str) -> float:
    name = resolve(name)
    if name in ROBOT_DATASETS:
        return ROBOT_DATASETS[name].control_hz
    if name in CALVIN_DATASETS:
        return CALVIN_DATASETS[name].control_hz
    if name in LEROBOT_DATASETS:
        return LEROBOT_DATASETS[name].control_hz
    return VIDEO_DATASETS[name].fps


def has_actions(name: str) -> bool:
    """Robot data (RLDS, CALVIN, LeRobot) carries actions; human video does not."""
    name = resolve(name)
    return name in ROBOT_DATASETS or name in CALVIN_DATASETS or name in LEROBOT_DATASETS


def reference_pair_window(name: str) -> tuple[int, int]:
    """(lo, hi) window length W of the reference's frame pairs for ``name`` (see REFERENCE_PAIR_WINDOWS)."""
    return REFERENCE_PAIR_WINDOWS.get(resolve(name), DEFAULT_PAIR_WINDOW)


def is_human_video(name: str) -> bool:
    return resolve(name) in VIDEO_DATASETS
