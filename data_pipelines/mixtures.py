"""Named dataset mixtures (DeFI's tables) and the knobs that reshape them.

A mixture is a dict dataset name -> weight (weights need not sum to 1; they are normalized when mixed).
"""

from __future__ import annotations

from collections.abc import Mapping

from data_pipelines import oxe_table

# GFDM pretraining mix, paper Table 11.
GFDM_PAPER = {"fractal20220817_data": 0.30, "bridge": 0.10, "calvin": 0.30, "ssv2": 0.15, "ego4d": 0.15}
# GFDM mix of the released training code: SSv2 / Bridge / RT-1 / CALVIN.
GFDM_RELEASED = {"ssv2": 0.4, "bridge": 0.2, "fractal20220817_data": 0.2, "calvin": 0.2}
# GIDM pretraining mix, paper Table 12 (percent).
GIDM_PAPER = {
    "fractal20220817_data": 16.3, "kuka": 7.4, "bridge": 8.0, "taco_play": 4.1, "jaco_play": 0.7,
    "berkeley_cable_routing": 0.4, "roboturk": 3.3, "viola": 1.3, "berkeley_autolab_ur5": 1.6, "toto": 2.8,
    "language_table": 6.1, "stanford_hydra_dataset_converted_externally_to_rlds": 6.2,
    "austin_buds_dataset_converted_externally_to_rlds": 0.4,
    "nyu_franka_play_dataset_converted_externally_to_rlds": 1.2,
    "furniture_bench_dataset_converted_externally_to_rlds": 3.4,
    "ucsd_kitchen_dataset_converted_externally_to_rlds": 0.1,
    "austin_sailor_dataset_converted_externally_to_rlds": 3.0,
    "austin_sirius_dataset_converted_externally_to_rlds": 2.3,
    "dlr_edan_shared_control_converted_externally_to_rlds": 0.1,
    "iamlab_cmu_pickup_insert_converted_externally_to_rlds": 1.3,
    "utaustin_mutex": 3.0, "berkeley_fanuc_manipulation": 1.1, "cmu_stretch": 0.2, "bc_z": 10.3, "fmb": 9.8,
    "dobbe": 2.0, "ego4d": 3.5,
}
# The embedded demo data: Meta-World robot RLDS + its human-video stand-in (SSv2 layout).
DEMO = {"demo": 0.7, "demo_human": 0.3}

PRESETS: dict[str, dict[str, float]] = {
    "gfdm_paper": GFDM_PAPER, "gfdm_released": GFDM_RELEASED, "gidm_paper": GIDM_PAPER, "demo": DEMO,
    "demo_robot": {"demo": 1.0},
}


def known_datasets() -> list[str]:
    return oxe_table.known_datasets()


def resolve(mixture, key: str = "data.mixture") -> dict[str, float]:
    """A preset name, a "name:weight,name:weight" string or a mapping -> validated dict name -> weight."""
    if isinstance(mixture, str):
        if mixture in PRESETS:
            mixture = PRESETS[mixture]
        elif ":" in mixture or "," in mixture or oxe_table.resolve(mixture) in oxe_table.known_datasets():
            parts = [p for p in mixture.split(",") if p]
            mixture = {p.split(":")[0]: float(p.split(":")[1]) if ":" in p else 1.0 for p in parts}
        else:
            raise ValueError(f"{key}={mixture!r} is neither a preset ({sorted(PRESETS)}) nor a known dataset")
    if not isinstance(mixture, Mapping) or not mixture:
        raise ValueError(f"{key} must be a preset name or a non-empty mapping dataset -> weight, got {mixture!r}")
    out = {}
    for name, weight in dict(mixture).items():
        canonical = oxe_table.resolve(name)
        if canonical not in oxe_table.known_datasets():
            raise ValueError(f"{key}: unknown dataset {name!r}; known: {oxe_table.known_datasets()}")
        if not float(weight) >= 0:
            raise ValueError(f"{key}[{name!r}] = {weight!r}: weights must be >= 0")
        out[canonical] = out.get(canonical, 0.0) + float(weight)
    if sum(out.values()) <= 0:
        raise ValueError(f"{key}: all weights are zero")
    return out


def apply_human_video_fraction(weights: Mapping[str, float], fraction: float | None) -> dict[str, float]:
    """Rescale so that human-video datasets make up ``fraction`` of the total weight.

    Relative weights within the human group and within the robot group are kept. ``None`` keeps the table's
    own share; 0 drops every human-video dataset, 1 keeps only them. Returns normalized weights (sum 1) with
    zero-weight datasets removed.
    """
    total = sum(weights.values())
    norm = {k: v / total for k, v in weights.items() if v > 0}
    if fraction is None:
        return norm
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"data.human_video_fraction={fraction!r} must be in [0, 1] (or None)")
    human = {k: v for k, v in norm.items() if oxe_table.is_human_video(k)}
    robot = {k: v for k, v in norm.items() if not oxe_table.is_human_video(k)}
    if fraction > 0 and not human:
        raise ValueError(f"data.human_video_fraction={fraction} but the mixture has no human-video dataset")
    if fraction < 1 and not robot:
        raise ValueError(f"data.human_video_fraction={fraction} but the mixture has no robot dataset")
    out = {}
    if fraction > 0:
        h = sum(human.values())
        out.update({k: fraction * v / h for k, v in human.items()})
    if fraction < 1:
        r = sum(robot.values())
        out.update({k: (1 - fraction) * v / r for k, v in robot.items()})
    return out
