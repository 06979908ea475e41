"""Everything DeFI pretrains and fine-tunes on, streamed through grain.

Public API (stages code against these names):

``make_loader(spec, data_cfg, *, global_batch_size, process_index=0, process_count=1, seed=0, split="train",
transform=None) -> Loader``
    An iterator of host-local batches: dicts of numpy arrays with leading dim
    ``global_batch_size // process_count``. ``get_state()`` / ``set_state(state)`` checkpoint it exactly (a
    restored iterator yields the identical next batch); ``close()`` stops worker processes. Each process reads a
    disjoint shard of every dataset. ``transform`` is a picklable per-sample callable (runs in the grain
    workers) that turns strings into numbers (e.g. tokenization); after it every field must be numeric.
    Without it, string fields come back as numpy object arrays. Frames are channels-last uint8.
    Specs and per-sample fields:
      "gfdm_clip"      frames uint8[K+1, H, W, 3]: the current frame + K = data_cfg.num_frames future frames,
                       data_cfg.frame_stride apart, one camera view (random among data_cfg.views) per sample.
      "gidm_pair"      frames uint8[2, H, W, 3] = (o_t, o_{t+n}), n = round(pair_seconds x control rate), or the
                       reference's per-dataset window (data_cfg.pair_spacing = "reference");
                       actions float32[N, 7] (the n actions between them, zero-padded to N = the largest n of
                       the mixture; zeros for action-free video), num_actions int32, has_actions bool.
      "policy_window"  frames uint8[V, T_obs, H, W, 3] (V = data_cfg.views, e.g. primary + wrist; view_mask
                       bool[V] marks cameras the dataset has), actions float32[H=10, 7] normalized with the
                       dataset's statistics (``action_stats``; raw with data_cfg.normalize_actions=False),
                       action_mask bool[H] (False past the episode end, where the last action is repeated).
    Every sample also has instruction (str; lower-cased without punctuation with data_cfg.normalize_instructions),
    dataset (str), dataset_id int32 (index into known_datasets()) and item_id int32 (the item's index within its
    dataset's split: a step of a robot episode or CALVIN segment, a video, or an Ego4D narration).
    ``failures()`` lists this process's unusable samples by cause; ``skip_counts()`` -> {source: skipped}.
    Sources: converted RLDS (``launch.convert_rlds``), CALVIN in its released layout (calvin_abc_d, ...: set
    ``data.paths.<name>`` to the task folder; ``data_pipelines.calvin``), SSv2, Ego4D, the demo data.

``check_sources(data_cfg, spec, key="config.data")``  open both splits of every dataset up front; one error lists
                             every missing folder, unconverted dataset and empty split.

``default_data_config()``    the data ConfigDict every stage config starts from (keys documented there);
``calvin_data_config(task_dir)``  CALVIN fine-tuning as the reference reads it (raw rel_actions).
``known_datasets()``         every dataset name a mixture may name.
``mixtures``                 presets gfdm_paper / gfdm_released / gidm_paper / demo, ``resolve`` and
                             ``apply_human_video_fraction``.
``demo.ensure_demo_data(root=None) -> path``  the embedded Meta-World demo data, generated on first use.
``actions.normalize / actions.unnormalize``  the policy's action normalization with cached statistics;
``action_stats(dataset, data_cfg) -> dict``  those statistics (mean, std, q01, q99, ...) for one dataset;
``compute_action_stats(dataset, data_cfg)``  the same computed afresh from the actions alone (no frame decoded).
``normalize_instruction(text)``  the reference GIDM's instruction text (lower-case, no punctuation).

``register_lerobot(name, path, image_keys=..., action_key=..., action_dims=..., gripper=...)``  a LeRobot dataset
                             (v2.1 / v3.0, read in place: parquet + mp4) under ``name``, usable in any mixture.

Command-line tools: ``python -m launch.convert_rlds``, ``python -m launch.inspect_data``,
``python -m launch.make_demo_data``, ``python -m launch.benchmark data``.
"""

from data_pipelines import actions, mixtures, oxe_table
from data_pipelines.actions import action_stats, compute_action_stats
from data_pipelines.config import calvin_data_config, default_data_config
from data_pipelines.lerobot import register_lerobot
from data_pipelines.loader import SPECS, Loader, check_sources, make_loader, normalize_instruction
from data_pipelines.oxe_table import known_datasets

__all__ = ["make_loader", "Loader", "SPECS", "default_data_config", "calvin_data_config", "known_datasets",
           "mixtures", "oxe_table", "actions", "validate_data_config", "check_sources", "action_stats",
           "compute_action_stats", "normalize_instruction", "register_lerobot"]


def validate_data_config(data_cfg, key: str = "data") -> None:
    """Raise ValueError naming the key for an unknown dataset, bad weight or out-of-range knob."""
    weights = mixtures.resolve(data_cfg.mixture, key=f"{key}.mixture")
    for name in dict(data_cfg.get("paths") or {}):
        if oxe_table.resolve(name) not in known_datasets():
            raise ValueError(f"{key}.paths: unknown dataset {name!r}; known: {known_datasets()}")
    mixtures.apply_human_video_fraction(weights, data_cfg.get("human_video_fraction"))
    if not 0 < float(data_cfg.data_fraction) <= 1:
        raise ValueError(f"{key}.data_fraction={data_cfg.data_fraction!r} must be in (0, 1]")
    for k in ("resolution", "num_frames", "frame_stride", "obs_frames", "action_horizon"):
        if int(data_cfg[k]) < 1:
            raise ValueError(f"{key}.{k}={data_cfg[k]!r} must be >= 1")
    if not 0 <= float(data_cfg.max_failure_fraction) <= 1:
        raise ValueError(f"{key}.max_failure_fraction={data_cfg.max_failure_fraction!r} must be in [0, 1]")
    if data_cfg.get("pair_spacing", "seconds") not in ("seconds", "reference"):
        raise ValueError(f"{key}.pair_spacing={data_cfg.pair_spacing!r} must be 'seconds' or 'reference'")
    for k in ("normalize_actions", "normalize_instructions"):
        if not isinstance(data_cfg.get(k, False), bool):
            raise ValueError(f"{key}.{k}={data_cfg[k]!r} must be True or False")
