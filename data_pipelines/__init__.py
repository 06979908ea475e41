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
      "gidm_pair"      frames uint8[2, H, W, 3] = (o_t, o_{t+n}), n = round(pair_seconds x control rate);
                       actions float32[N, 7] (the n actions between them, zero-padded to N = the largest n of
                       the mixture; zeros for action-free video), num_actions int32, has_actions bool.
      "policy_window"  frames uint8[V, T_obs, H, W, 3] (V = data_cfg.views, e.g. primary + wrist; view_mask
                       bool[V] marks cameras the dataset has), actions float32[H=10, 7] normalized with the
                       dataset's cached statistics (``data_pipelines.actions``), action_mask bool[H] (False
                       past the episode end, where the last action is repeated).
    Every sample also has instruction (str), dataset (str), dataset_id int32 (index into known_datasets())
    and item_id int32 (the item's index within its dataset's split: a step of a robot episode, a video, or an
    Ego4D narration).

``default_data_config()``    the data ConfigDict every stage config starts from (keys documented there).
``known_datasets()``         every dataset name a mixture may name.
``mixtures``                 presets gfdm_paper / gfdm_released / gidm_paper / demo, ``resolve`` and
                             ``apply_human_video_fraction``.
``demo.ensure_demo_data(root=None) -> path``  the embedded Meta-World demo data, generated on first use.
``actions.normalize / actions.unnormalize``  the policy's action normalization with cached statistics;
``action_stats(dataset, data_cfg) -> dict``  those statistics (mean, std, q01, q99, ...) for one dataset.

Command-line tools: ``python -m launch.convert_rlds``, ``python -m launch.inspect_data``,
``python -m launch.make_demo_data``, ``python -m launch.benchmark data``.
"""

from data_pipelines import actions, mixtures, oxe_table
from data_pipelines.config import default_data_config
from data_pipelines.loader import SPECS, Loader, make_loader
from data_pipelines.oxe_table import known_datasets

__all__ = ["make_loader", "Loader", "SPECS", "default_data_config", "known_datasets", "mixtures", "oxe_table",
           "actions", "validate_data_config", "action_stats"]


def action_stats(dataset: str, data_cfg) -> dict:
    """The cached action statistics of a converted robot dataset (what policy_window normalizes with)."""
    from data_pipelines import arrayrecord, loader

    return arrayrecord.read_stats(loader.dataset_dir(oxe_table.resolve(dataset), data_cfg))


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
