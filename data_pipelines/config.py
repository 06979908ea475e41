"""Data config defaults; stage configs call ``default_data_config()`` and override."""

import ml_collections

from data_pipelines import oxe_table


def default_data_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # A preset name (data_pipelines.mixtures.PRESETS), "name:weight,name:weight", or a dict {dataset: weight}.
    c.mixture = ml_collections.FieldReference("demo", field_type=object)
    c.data_dir = ""                    # root: <data_dir>/<dataset>/...; "" = the embedded demo data
    # dataset -> folder, overrides <data_dir>/<dataset> ("" = not set). Every known dataset has a key, so that
    # --config.data.paths.<dataset>=... works from the command line (CALVIN: the task folder, e.g. task_ABC_D).
    c.paths = ml_collections.ConfigDict({name: "" for name in oxe_table.known_datasets()})
    c.human_video_fraction = ml_collections.config_dict.placeholder(float)  # None = the table's own share
    c.data_fraction = 1.0              # keep X of each dataset's train episodes / videos, evenly spaced
    c.eval_fraction = 0.05             # held-out episodes (evenly spaced) where a dataset has no eval split
    c.resolution = 256                 # frames are resized (short side) + centre-cropped to this
    c.num_frames = 16                  # gfdm_clip: K future frames after the current one
    c.frame_stride = 1                 # gfdm_clip: steps between frames (at the control rate / video fps)
    c.views = ("primary", "wrist")     # gfdm_clip: one of these per sample; policy_window: all of them
    c.pair_seconds = 1.0               # gidm_pair: n = round(pair_seconds * control rate)
    # gidm_pair spacing: "seconds" (pair_seconds above) | "reference" (the reference GIDM's: first and last frame
    # of a window of W steps, W random 3-5 / 15-20 per sample for low / high control-rate datasets, else 10;
    # table: oxe_table.REFERENCE_PAIR_WINDOWS).
    c.pair_spacing = "seconds"
    c.normalize_instructions = False   # lower-case + strip all punctuation, as the reference GIDM's collator
    c.obs_frames = 1                   # policy_window: observation frames per view (ending at t)
    c.action_horizon = 10              # policy_window: action chunk length
    # policy_window: map actions to [-1, 1] with the dataset's statistics (data_pipelines.actions); False = the
    # actions as stored (CALVIN's rel_actions are already in [-1, 1]: the reference uses them raw).
    c.normalize_actions = True
    c.num_workers = 0                  # grain worker processes per host (0 = in-process)
    c.prefetch = 2                     # batches buffered per worker
    c.read_threads = 4                 # threads reading/decoding samples per process
    c.max_failure_fraction = 0.1       # stop (naming the files) when more samples than this are unusable
    c.min_failures_checked = 20        # ...once at least this many samples were attempted in a process
    return c


def calvin_data_config(task_dir: str = "", dataset: str = "calvin_abc_d") -> ml_collections.ConfigDict:
    """CALVIN fine-tuning data as the reference reads it: the released layout at ``task_dir`` (e.g.
    .../task_ABC_D), static + gripper views, one observation frame, 10 raw rel_actions."""
    c = default_data_config()
    c.mixture = dataset
    c.paths[dataset] = task_dir
    c.views = ("primary", "wrist")     # rgb_static, rgb_gripper
    c.obs_frames = 1
    c.action_horizon = 10
    c.normalize_actions = False
    return c
