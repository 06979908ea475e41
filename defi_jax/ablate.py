"""The paper's ablations in miniature: train every variant on the demo data, evaluate it in Meta-World, tabulate.

A variant is a set of config overrides on ``configs/policy.py:demo`` (``make demo``'s policy) plus the
pretraining it fine-tunes from (:data:`VARIANTS`). Layout under the ablation's workdir::

    pretrain/<pretraining>/{gidm,gfdm}      configs/{gidm,gfdm}.py:tiny, trained once, shared by every variant
                                            and seed that uses them ("standard", "no_human_video"); with
                                            ``pretrained`` (e.g. make demo's workdir) the standard pretraining is
                                            that folder's finished ``gidm`` / ``gfdm`` (its VAE-trained GFDM too)
    <variant>/seed=<seed>/                  the fine-tuning run (configs/policy.py:demo + the variant's keys
                                            + the user's ``overrides``, i.e. ``launch.ablate --set=KEY=VALUE``)
    <variant>/seed=<seed>/eval_metaworld/   its closed-loop evaluation (summary.json / .csv; the same protocol
                                            for every variant)
    <variant>/features/                     with ``features``: the variant's GFDM features of the training windows
                                            (``launch.precompute_features``, shared by its seeds), on which its
                                            fine-tunings train (``data.source=features``, centred features)
    ablation.md, ablation.csv               Tables 4, 8 and 9 (paper shapes), per task, with the paper's numbers

Training goes through :mod:`defi_jax.sweep` (each run ``python -m launch.train`` in its own process, finished runs
skipped through their ``sweep_result.json`` when they ran the same command (another command in the same folder
is refused, ``--set`` overrides included: they are ``--config.KEY=VALUE`` arguments of the command), a stopped
run resumes from its checkpoints). An evaluation is
skipped when its ``summary.json`` holds the same protocol for the same checkpoint step. Entry point:
``python -m launch.ablate``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence

from defi_jax import config_validation, paths, sweep

POLICY_CONFIG = "configs/policy.py:demo"   # make demo's policy: the tiny model, trained to act closed-loop
PRETRAIN_CONFIGS = {"gidm": "configs/gidm.py:tiny", "gfdm": "configs/gfdm.py:tiny"}
EVAL_DIR = "eval_metaworld"


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    overrides: tuple[tuple[str, str], ...] = ()   # on POLICY_CONFIG (command-line text)
    pretraining: str = "standard"                  # key of PRETRAININGS: the GIDM / GFDM workdirs it starts from
    gidm: bool = True                              # fine-tunes from a pretrained GIDM workdir
    gfdm: bool = True                              # ... and reads a pretrained GFDM workdir


# Overrides of both pretraining stages (configs/gidm.py:tiny and configs/gfdm.py:tiny).
PRETRAININGS = {"standard": (), "no_human_video": (("data.human_video_fraction", "0"),)}

VARIANTS = {v.name: v for v in (
    Variant("defi"),
    Variant("no_gidm_pretrain", (("policy.gidm_init", "random"),), gidm=False),
    # A random UNet with the pretrained GFDM's frozen VAE / text tower, which its pretraining never changed (the
    # paper's variant keeps SVD's): defi_jax.policy.stage.resolve_init.
    Variant("no_gfdm_pretrain", (("policy.gfdm_init", "initial"),)),
    Variant("no_human_video", pretraining="no_human_video"),
    Variant("adapter_only", (("policy.finetune", "adapter_only"),)),
    Variant("all_train", (("policy.finetune", "all"),)),
    Variant("gfdm_5_steps", (("model.gfdm_steps", "5"),)),
    Variant("continuous_latent", (("model.latent_action", "continuous"),)),
)}


@dataclasses.dataclass(frozen=True)
class Row:
    variant: str
    label: str
    paper: float | None       # the paper's number for this row (PAPER_METRIC), None where not available


@dataclasses.dataclass(frozen=True)
class Table:
    name: str
    title: str
    groups: tuple[tuple[Row, ...], ...]   # each group compares its rows with its first (the DeFI default)


PAPER_METRIC = "CALVIN ABC-D average length (0-5)"
PAPER_SOURCE = ("the DeFI paper's CALVIN ABC-D ablations as summarised in /work/shared/DESIGN.md (Stage 2: no GIDM "
                "pretraining 4.16, continuous latent 4.20; Stage 1: 1 step 4.51, 5 steps 4.45; Stage 3 / Table 9: "
                "adapter only 4.33, all train 4.40, GIDM + adapter 4.51; Data: no human video 3.92)")
PAPER_NOTES = ("The paper's numbers are CALVIN average task lengths, not Meta-World success rates: only the "
               "direction of each change is comparable. No number for 'w/o GFDM pretraining' was found in "
               "/work/shared. For 'w/o GIDM pretraining' /work/shared/seed/000_9e9c0900b2072e20.txt quotes both "
               "4.16 and, citing Table 4, 3.28; DESIGN.md's 4.16 is used (both are below 4.51).")
TABLES = (
    Table("table4", "Table 4: pretraining ablations", (
        (Row("defi", "Full DeFI", 4.51), Row("no_gidm_pretrain", "w/o GIDM pretraining", 4.16),
         Row("no_gfdm_pretrain", "w/o GFDM pretraining", None),
         Row("no_human_video", "w/o human video (GIDM + GFDM)", 3.92)),)),
    Table("table8", "Table 8: denoising steps and latent action", (
        (Row("defi", "1 denoising step (DeFI)", 4.51), Row("gfdm_5_steps", "5 denoising steps", 4.45)),
        (Row("defi", "VQ latent action (DeFI)", 4.51), Row("continuous_latent", "continuous latent action", 4.20)))),
    Table("table9", "Table 9: what is fine-tuned", (
        (Row("defi", "GIDM + adapter (DeFI)", 4.51), Row("adapter_only", "adapter only", 4.33),
         Row("all_train", "all train (GFDM too)", 4.40)),)),
)


def parse_variants(text: str | None) -> tuple[str, ...]:
    """``a,b`` -> the named variants, in :data:`VARIANTS` order; None or "" -> all."""
    if not text:
        return tuple(VARIANTS)
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"--variants: unknown {unknown}; variants: {','.join(VARIANTS)}")
    return tuple(n for n in VARIANTS if n in names)


def parse_overrides(items: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """``--set`` items ``KEY=VALUE`` -> ``((KEY, VALUE), ...)`` for :func:`plan` (VALUE is command-line text and may
    be empty; KEY is a dotted key of the policy config, without ``config.``)."""
    out = []
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"--set={item!r}: expected KEY=VALUE with a non-empty KEY "
                             "(e.g. --set=model.head.cross_attention=full)")
        out.append((key, value))
    return tuple(out)


_PLAN_KEYS = ("seed", "data.data_dir", "policy.pretrain_missing", "train.progress_bar")


def _check_overrides(overrides: Sequence[tuple[str, str]], variants: Sequence[str]) -> None:
    """Refuses malformed or repeated keys, keys that a variant sets itself (the user would erase the ablation) and,
    naming the key, keys that are not in the policy config or values it cannot take."""
    seen = set()
    for key, value in overrides:
        if not isinstance(key, str) or not key.strip() or not isinstance(value, str):
            raise ValueError(f"--set: {key!r}={value!r}: expected KEY=VALUE with a non-empty KEY")
        if key in seen:
            raise ValueError(f"--set: config.{key} given more than once")
        seen.add(key)
        if key in _PLAN_KEYS or key.startswith("init.sources."):
            raise ValueError(f"--set: config.{key} is set by the ablation plan for each run (seeds, data folder, "
                             "pretrained sources); use the matching launch.ablate flag instead")
    for name in variants:
        own = {k for k, _ in VARIANTS[name].overrides}
        clash = [k for k, _ in overrides if k in own]
        if clash:
            raise ValueError(f"--set: config.{clash[0]} is set by variant {name} itself "
                             f"({name}: {', '.join(f'{k}={v}' for k, v in VARIANTS[name].overrides)}); overriding it "
                             "would erase that ablation (leave the variant out with --variants, or drop the --set)")
    if not overrides:
        return
    config = config_validation.load_config(POLICY_CONFIG)
    try:
        config_validation.apply_overrides(config, list(overrides))
    except config_validation.ConfigError as e:
        raise config_validation.ConfigError(f"--set: {e}") from None


# ---- the plan --------------------------------------------------------------------------------------

@dataclasses.dataclass
class Plan:
    workdir: str
    pretrain: dict[str, dict[str, sweep.Run]]            # pretraining -> stage -> run
    runs: dict[tuple[str, int], sweep.Run]               # (variant, seed) -> fine-tuning run
    configs: dict[str, object]                           # run workdir -> its validated config
    features: dict[str, sweep.Run] = dataclasses.field(default_factory=dict)   # variant -> its features store


FEATURE_KEYS = (("data.source", "features"), ("model.center_features", "true"))


def _features_run(store: str, keys: Sequence[tuple[str, str]], train_windows: int, eval_windows: int) -> sweep.Run:
    """``python -m launch.precompute_features`` of one variant (its fine-tuning keys: same GFDM, data, tokenizers)
    as a :class:`sweep.Run` of no steps: done once its command finished, skipped when rerun with the same one."""
    path, colon, arg = POLICY_CONFIG.partition(":")
    argv = [sys.executable, "-m", "launch.precompute_features",
            f"--config={os.path.join(sweep.ROOT, path)}{colon}{arg}", f"--out={store}",
            f"--train_windows={train_windows}", f"--eval_windows={eval_windows}",
            *(f"--config.{k}={v}" for k, v in keys)]
    return sweep.Run(value="features", seed=0, workdir=store, argv=argv, num_steps=0)


def _centred(keys: Sequence[tuple[str, str]]) -> bool:
    """Whether the policy config with ``keys`` centres the GFDM features (``model.center_features``)."""
    config = config_validation.load_config(POLICY_CONFIG)
    config_validation.apply_overrides(config, list(keys))
    return bool(config.model.get("center_features", False))


def _steps_overrides(steps: int | None, config) -> list[tuple[str, str]]:
    if steps is None:
        return []
    return [("train.num_steps", str(steps)), ("train.save_every", str(min(int(config.train.save_every), steps)))]


def _run(spec: str, workdir: str, overrides: Sequence[tuple[str, str]], configs: dict) -> sweep.Run:
    """A :class:`sweep.Run` of ``python -m launch.train`` (the config is built and checked here)."""
    config = config_validation.load_config(spec)
    config_validation.apply_overrides(config, list(overrides))
    config_validation.resolve(config)
    config_validation.validate(config)
    path, colon, arg = spec.partition(":")
    full = os.path.join(sweep.ROOT, path) + colon + arg
    argv = [sys.executable, "-m", "launch.train", f"--config={full}", f"--workdir={workdir}",
            *(f"--config.{k}={v}" for k, v in overrides)]
    configs[workdir] = config
    return sweep.Run(value=os.path.basename(os.path.dirname(workdir)), seed=int(config.seed), workdir=workdir,
                     argv=argv, num_steps=int(config.train.num_steps))


REUSED = "reused"   # the status of a pretraining run taken from ``plan(pretrained=...)``: never trained here


def _reused(stage: str, folder: str) -> sweep.Run:
    """A finished pretraining workdir (``folder/stage``), reused as the standard pretraining."""
    from defi_jax import trainer

    workdir = os.path.join(os.path.abspath(folder), stage)
    done = os.path.join(workdir, trainer.FINISHED)
    if not os.path.exists(done):
        raise ValueError(f"--pretrained: {workdir} holds no finished {stage.upper()} run (no {trainer.FINISHED})")
    with open(done) as f:
        step = int(json.load(f)["step"])
    return sweep.Run(value="pretrained", seed=0, workdir=workdir, argv=[], num_steps=step, status=REUSED, step=step)


def _latent_scale(gfdm_workdir: str) -> list[tuple[str, str]]:
    """The VAE latent scale a finished GFDM was trained with (its ``config.json``), for the policy built on it."""
    with open(os.path.join(gfdm_workdir, "config.json")) as f:
        scale = json.load(f)["model"]["vae"]["scaling_factor"]
    return [("model.gfdm.vae.scaling_factor", repr(float(scale)))]


def plan(workdir: str, variants: Sequence[str], seeds: Sequence[int], *, data_dir: str, steps: int | None = None,
         pretrain_steps: int | None = None, pretrained: str | None = None,
         data_fraction: float | None = None, overrides: Sequence[tuple[str, str]] = (),
         features: int | None = None, feature_eval_windows: int = 512) -> Plan:
    """Every pretraining and fine-tuning run of ``variants`` x ``seeds``, each config built and validated.

    ``pretrained``: a folder with finished ``gidm`` and ``gfdm`` workdirs (``make demo``'s ``workdirs/demo``)
    used as the standard pretraining instead of training one under ``workdir/pretrain`` (the policies on it
    then take the latent scale that GFDM was trained with). ``data_fraction``: the fraction of the labelled robot
    episodes every fine-tuning keeps (``data.data_fraction``: evenly spaced, so every demo task keeps its share; the
    action-free pretraining keeps all of its data):
    the low-data regime in which pretraining on action-free video is meant to pay off. ``overrides``: ``(dotted key,
    command-line text)`` pairs (``launch.ablate --set=KEY=VALUE``, :func:`parse_overrides`) applied to every
    fine-tuning, after the variant's keys and ``steps`` / ``data_fraction`` (the pretrainings do not take them); a key
    that one of ``variants`` sets itself is refused, as is a key not in the policy config (naming it). A run that
    finished before in ``workdir`` with another command (other flags, ``overrides`` included) is refused
    (:func:`sweep.check_finished`). ``features``: every variant's GFDM features of that many training windows (and
    ``feature_eval_windows`` held-out ones) are computed once into ``<variant>/features`` and its fine-tunings train on
    them, centred (the recipe of BENCHMARKS.md's 800 x 64 policies; ``all_train`` trains the GFDM and is refused)."""
    user = tuple(overrides)
    _check_overrides(user, variants)
    if data_fraction is not None and not 0 < data_fraction <= 1:
        raise ValueError(f"--data_fraction={data_fraction!r} must be in (0, 1]")
    workdir = os.path.abspath(workdir)
    configs: dict[str, object] = {}
    base = {"train.progress_bar": "false", "data.data_dir": data_dir}
    pretrain: dict[str, dict[str, sweep.Run]] = {}
    for kind in dict.fromkeys(VARIANTS[v].pretraining for v in variants):
        pretrain[kind] = {}
        used = {s for v in variants if VARIANTS[v].pretraining == kind for s in ("gidm", "gfdm")
                if getattr(VARIANTS[v], s)}
        for stage, spec in PRETRAIN_CONFIGS.items():
            if stage not in used:
                continue
            if pretrained and kind == "standard":
                pretrain[kind][stage] = _reused(stage, pretrained)
                continue
            defaults = config_validation.load_config(spec)
            keys = [*base.items(), *PRETRAININGS[kind], *_steps_overrides(pretrain_steps, defaults)]
            pretrain[kind][stage] = _run(spec, os.path.join(workdir, "pretrain", kind, stage), keys, configs)
    defaults = config_validation.load_config(POLICY_CONFIG)
    scale = _latent_scale(_reused("gfdm", pretrained).workdir) if pretrained else []
    runs, stores = {}, {}
    if features is not None and features < 1:
        raise ValueError(f"--features={features!r} must be a positive number of windows")
    for name in variants:
        v = VARIANTS[name]
        # A stage the variant does not pretrain keeps the config's path: policy.gidm_init=random empties it,
        # gfdm_init=initial keeps only its frozen towers (config_validation.resolve: policy.stage.resolve_init).
        sources = {stage: pretrain[v.pretraining][stage].workdir for stage in ("gidm", "gfdm") if getattr(v, stage)}
        store = os.path.join(workdir, name, "features")
        cached = (*FEATURE_KEYS, ("data.features_dir", store)) if features else ()
        for seed in seeds:
            keys = [*base.items(), ("policy.pretrain_missing", "false"),
                    *((f"init.sources.{s}.path", p) for s, p in sources.items()), *v.overrides,
                    *(scale if v.pretraining == "standard" else ()), ("seed", str(seed)),
                    *_steps_overrides(steps, defaults),
                    *((("data.data_fraction", repr(float(data_fraction))),) if data_fraction is not None else ()),
                    *cached, *user]
            if not features and _centred(keys):   # on frames: the variant's own GFDM's statistics, computed once
                keys.insert(len(keys) - len(user), ("init.sources.feature_stats.path",
                                                    os.path.join(workdir, name, "feature_stats")))
            runs[name, seed] = _run(POLICY_CONFIG, os.path.join(workdir, name, f"seed={seed}"), keys, configs)
            if features and name not in stores:   # the first seed's keys: the windows are drawn with its seed
                stores[name] = _features_run(store, keys, features, feature_eval_windows)
    sweep.check_finished([*(r for stages in pretrain.values() for r in stages.values()), *stores.values(),
                          *runs.values()])
    return Plan(workdir, pretrain, runs, configs, stores)


def train(p: Plan, *, log: Callable[[str], None] = print) -> bool:
    """Pretraining first, then every fine-tuning run whose pretraining finished (the others are ``blocked``).
    Returns False when SIGTERM / Ctrl-C stopped it (the running training saved; rerun to resume)."""
    pre = [r for stages in p.pretrain.values() for r in stages.values() if r.status != REUSED]
    log(f"== pretraining: {len(pre)} run(s) under {os.path.join(p.workdir, 'pretrain')}")
    sweep.execute(pre, log=log)
    if any(r.status == "stopped" for r in pre):
        for run in p.runs.values():
            run.status = "stopped"
        return False
    def pretrained(name):
        v = VARIANTS[name]
        needed = [p.pretrain[v.pretraining][s] for s, use in (("gidm", v.gidm), ("gfdm", v.gfdm)) if use]
        return all(r.status in ("done", "skipped", REUSED) for r in needed)

    if p.features:
        stores = [run for name, run in p.features.items() if pretrained(name)]
        log(f"== GFDM features: {len(stores)} store(s)")
        sweep.execute(stores, log=log, doing="computing GFDM features into")
        if any(r.status == "stopped" for r in stores):
            for run in p.runs.values():
                run.status = "stopped"
            return False
    ready, blocked = [], []
    for (name, _), run in p.runs.items():
        store = p.features.get(name)
        if not pretrained(name):
            run.status = "blocked (its pretraining did not finish)"
        elif store is not None and store.status not in ("done", "skipped"):
            run.status = f"blocked (its features store: {store.status})"
        else:
            ready.append(run)
            continue
        blocked.append(run)
        log(f"{run.workdir}: not trained, {run.status[len('blocked ('):-1]}")
    log(f"== fine-tuning: {len(ready)} run(s)")
    sweep.execute(ready, log=log)
    return not any(r.status == "stopped" for r in ready)


# ---- evaluation ------------------------------------------------------------------------------------

RESUME_KEYS = ("tasks", "episodes_per_task", "horizon", "steps_per_chunk", "seed", "resolution", "workers")


def _finished_eval(out: str, protocol_json: Mapping, step: int | None) -> dict | None:
    """The saved summary when ``out`` holds one of the same protocol for the same checkpoint step."""
    path = os.path.join(out, "summary.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            saved = json.load(f)
    except json.JSONDecodeError:   # cut by a kill: evaluate again
        return None
    same = all(saved["protocol"].get(k) == protocol_json[k] for k in RESUME_KEYS)
    return saved if same and saved.get("policy", {}).get("step") == step else None


def protocol_fields(protocol) -> dict:
    """The :data:`RESUME_KEYS` of ``protocol`` as ``summary.json`` records them."""
    return {"tasks": list(protocol.tasks), "episodes_per_task": protocol.episodes, "horizon": protocol.horizon,
            "steps_per_chunk": protocol.steps_per_chunk, "seed": protocol.seed, "resolution": protocol.resolution,
            "workers": protocol.workers}


def evaluate(p: Plan, protocol, *, log: Callable[[str], None] = print,
             policy_factory: Callable[[str, int], object] | None = None) -> dict[tuple[str, int], dict]:
    """Closed-loop Meta-World evaluation of every trained run (``protocol``, the same for all); returns the
    summaries by (variant, seed). Evaluations finished before with the same protocol and step are reused.
    ``policy_factory(workdir, seed)`` defaults to ``DeFIPolicy.from_checkpoint(workdir, seed=seed)``."""
    from defi_jax.evaluation import metaworld

    if policy_factory is None:
        from defi_jax.inference import DeFIPolicy

        def policy_factory(workdir, seed):
            return DeFIPolicy.from_checkpoint(workdir, seed=seed)

    want = protocol_fields(protocol)
    results = {}
    for (name, seed), run in p.runs.items():
        if run.status not in ("done", "skipped"):
            continue
        out = os.path.join(run.workdir, EVAL_DIR)
        saved = _finished_eval(out, want, run.step)
        if saved is not None:
            log(f"{name} seed={seed}: evaluated before (step {run.step}), skipped")
            results[name, seed] = saved
            continue
        log(f"== evaluate {name} seed={seed} (step {run.step}): {len(protocol.tasks)} task(s) x "
            f"{protocol.episodes} episode(s)")
        info = {"checkpoint": run.workdir, "step": run.step, "variant": name, "seed": seed}
        results[name, seed] = metaworld.evaluate(policy_factory(run.workdir, seed), protocol, out,
                                                 policy_info=info, progress=None)
    return results


# ---- tables ----------------------------------------------------------------------------------------

@dataclasses.dataclass
class Cell:
    successes: int
    episodes: int

    @property
    def rate(self) -> float:
        return self.successes / self.episodes if self.episodes else float("nan")

    def interval(self) -> tuple[float, float]:
        from defi_jax.evaluation.metaworld import wilson_interval
        return wilson_interval(self.successes, self.episodes)

    def __str__(self) -> str:
        if not self.episodes:
            return "n/a"
        lo, hi = self.interval()
        return f"{self.rate:.2f} ({self.successes}/{self.episodes}) [{lo:.2f}, {hi:.2f}]"


@dataclasses.dataclass
class Line:
    """One table row: a variant's results pooled over seeds, per task and overall."""
    row: Row
    seeds: list[int]
    tasks: dict[str, Cell]
    pooled: Cell
    per_seed: dict[int, float]        # mean success over tasks, per seed
    outcomes: dict[tuple[int, str, int], bool]   # (seed, task, episode) -> success, where the summaries list episodes

    @property
    def mean(self) -> float:
        return sum(self.per_seed.values()) / len(self.per_seed) if self.per_seed else float("nan")

    @property
    def seed_sd(self) -> float:
        v = list(self.per_seed.values())
        if len(v) < 2:
            return float("nan")
        m = sum(v) / len(v)
        return math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))


def line(row: Row, results: Mapping[tuple[str, int], Mapping], tasks: Sequence[str]) -> Line:
    seeds = sorted(s for (v, s) in results if v == row.variant)
    cells = {t: Cell(0, 0) for t in tasks}
    per_seed, outcomes = {}, {}
    for s in seeds:
        got = results[row.variant, s]["tasks"]
        for t in tasks:
            cells[t].successes += int(got[t]["successes"])
            cells[t].episodes += int(got[t]["episodes"])
        per_seed[s] = sum(got[t]["successes"] / got[t]["episodes"] for t in tasks) / len(tasks)
        outcomes.update({(s, e["task"], int(e["episode"])): bool(e["success"])
                         for e in results[row.variant, s].get("episodes", ()) if e["task"] in tasks})
    pooled = Cell(sum(c.successes for c in cells.values()), sum(c.episodes for c in cells.values()))
    return Line(row, seeds, cells, pooled, per_seed, outcomes)


def _paired(ref: Line, other: Line) -> str:
    """Episode by episode: the evaluator plays episode e of a task with the same env seed, goal and policy noise
    seeds for every variant (same training seed), so the pairs that differ say more than two intervals."""
    from defi_jax.evaluation.metaworld import discordant, mcnemar_exact

    pairs, only_ref, only_other = discordant(ref.outcomes, other.outcomes)
    if not pairs:
        return ""
    return (f"; paired over {pairs} episodes: only {ref.row.label} succeeded in {only_ref}, only "
            f"{other.row.label} in {only_other} (exact McNemar p = {mcnemar_exact(only_ref, only_other):.3g})")


def _verdict(ref: Line, other: Line) -> str:
    """Whether ``other`` moves from ``ref`` the way the paper's numbers do."""
    if not (ref.pooled.episodes and other.pooled.episodes):
        return "not evaluated"
    if other.row.paper is None or ref.row.paper is None:
        return f"no paper number; miniature {other.mean:.2f} vs {ref.mean:.2f}{_paired(ref, other)}"
    paper = "lower" if other.row.paper < ref.row.paper else "higher" if other.row.paper > ref.row.paper else "equal"
    diff = other.mean - ref.mean
    ours = "lower" if diff < 0 else "higher" if diff > 0 else "equal"
    (a, b), (c, d) = ref.pooled.interval(), other.pooled.interval()
    noise = " (within noise: the pooled 95% intervals overlap)" if a <= d and c <= b else ""
    word = "agrees" if ours == paper else "no difference" if ours == "equal" else "disagrees"
    return (f"{word}: paper {paper} than {ref.row.label} ({other.row.paper:.2f} vs {ref.row.paper:.2f}), "
            f"miniature {ours} ({other.mean:.2f} vs {ref.mean:.2f}){noise}{_paired(ref, other)}")


def _mean_text(ln: Line) -> str:
    if not ln.per_seed:
        return "n/a"
    sd = f" ± {ln.seed_sd:.2f}" if len(ln.per_seed) > 1 else ""
    return f"{ln.mean:.2f}{sd} ({', '.join(f'{s}: {v:.2f}' for s, v in ln.per_seed.items())})"


def render(results: Mapping[tuple[str, int], Mapping], tasks: Sequence[str], *, protocol: Mapping | None = None,
           command: str | None = None) -> tuple[str, str]:
    """(Markdown, CSV) of :data:`TABLES` from evaluation summaries keyed by (variant, seed)."""
    md = io.StringIO()
    rows_csv = io.StringIO()
    w = csv.writer(rows_csv)
    w.writerow(["table", "row", "variant", "task", "seeds", "successes", "episodes", "success", "ci95_low",
                "ci95_high", "mean_over_seeds", "per_seed", "paper", "paper_metric"])
    md.write("# DeFI ablations in miniature (Meta-World, demo data)\n\n")
    if command:
        md.write(f"Command: `{command}`\n\n")
    if protocol:
        md.write("Protocol (every variant): " + ", ".join(f"{k}={protocol[k]}" for k in RESUME_KEYS if k in protocol)
                 + ".\n\n")
    md.write("Cells: success rate pooled over seeds (successes/episodes) [95% Wilson interval]. 'mean' is the mean "
             "over seeds of each seed's mean success over tasks (± sd over seeds; each seed's value listed). "
             f"Column 'paper': {PAPER_METRIC}, from {PAPER_SOURCE}. {PAPER_NOTES}\n\n")
    findings = []
    for table in TABLES:
        md.write(f"## {table.title}\n\n")
        head = ["row", "seeds", *tasks, "mean", "pooled", f"paper ({PAPER_METRIC})"]
        md.write("| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n")
        for group in table.groups:
            lines = [line(r, results, tasks) for r in group]
            for ln in lines:
                r = ln.row
                paper = "n/a" if r.paper is None else f"{r.paper:.2f}"
                md.write("| " + " | ".join([f"{r.label} (`{r.variant}`)", ",".join(map(str, ln.seeds)) or "none",
                                            *(str(ln.tasks[t]) for t in tasks), _mean_text(ln), str(ln.pooled),
                                            paper]) + " |\n")
                for t, cell in [*ln.tasks.items(), ("mean", ln.pooled)]:
                    rate = [f"{x:.4f}" for x in (cell.rate, *cell.interval())] if cell.episodes else ["", "", ""]
                    seeds = ["", ""]
                    if t == "mean" and ln.per_seed:
                        seeds = [f"{ln.mean:.4f}", " ".join(f"{s}:{v:.4f}" for s, v in ln.per_seed.items())]
                    w.writerow([table.name, r.label, r.variant, t, " ".join(map(str, ln.seeds)), cell.successes,
                                cell.episodes, *rate, *seeds, "" if r.paper is None else r.paper, PAPER_METRIC])
            findings += [f"- {table.name}, {ln.row.label}: {_verdict(lines[0], ln)}" for ln in lines[1:]]
        md.write("\n")
    md.write("## Agreement with the paper\n\nWhere the evaluation summaries list their episodes, a comparison also "
             "counts the paired episodes (same training seed, task and episode: the same env seed and goal, and the "
             "same policy noise seeds where `protocol.policy_noise` in the summaries says 'per row') that only one of "
             "the two variants solved, with the exact McNemar p-value.\n\n"
             + "\n".join(findings) + "\n")
    return md.getvalue(), rows_csv.getvalue()


def write_tables(workdir: str, markdown: str, table_csv: str) -> tuple[str, str]:
    md_path, csv_path = os.path.join(workdir, "ablation.md"), os.path.join(workdir, "ablation.csv")
    paths.write_text(md_path, markdown)
    paths.write_text(csv_path, table_csv)
    return md_path, csv_path


# ---- dry run ---------------------------------------------------------------------------------------

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _program_key(config) -> str:
    """What the compiled init and train step depend on: the config without its data, weights sources, seed and
    the ``policy.*_init`` switches (which only choose where initial weights come from)."""
    c = config.copy_and_resolve_references()
    for key in ("data", "init", "seed"):
        if key in c:
            del c[key]
    if "policy" in c:
        with c.unlocked():
            c.policy.gidm_init = c.policy.gfdm_init = ""
    return c.to_json_best_effort(sort_keys=True)


def dry_run(p: Plan, *, run_steps: bool = True, batch_size: int = 2,
            log: Callable[[str], None] = print) -> dict[str, dict]:
    """One train step of every config of the plan (one seed per variant), in this process, on one device, with
    fast compiles and random initial weights (the pretraining is not run; a features config steps on zero features
    of its windows, its store not computed). Each config's step is traced and
    lowered for a batch of its own data; with ``run_steps`` it is also compiled and run once from a fresh state.
    Configs whose program is the same share one :class:`trainer.Trainer` (one compile). Returns by run name the
    metrics of the step (``run_steps``) or their shapes and dtypes (lowered only)."""
    import jax
    import numpy as np

    from defi_jax import sharding, stage as stage_lib, trainer

    first_seed = {}
    for (name, _), run in p.runs.items():
        first_seed.setdefault(name, run)
    todo = {f"pretrain/{k}/{s}": r for k, stages in p.pretrain.items() for s, r in stages.items()
            if r.status != REUSED} | first_seed
    trainers: dict[str, trainer.Trainer] = {}
    lowered_for: dict[str, tuple] = {}
    out = {}
    for name, run in todo.items():
        config = p.configs[run.workdir].copy_and_resolve_references()
        with config.unlocked():
            for source in config.init.sources.values():
                source.path = ""
            config.init.allow_random = True
            if "policy" in config:
                config.policy.pretrain_missing = False
            config.train.batch_size = batch_size
            config.train.compiler_options = dict(FAST_COMPILE)
        key = _program_key(config)
        shared = key in trainers
        if shared:
            config_validation.validate(config, num_devices=1)
        else:
            trainers[key] = trainer.Trainer(config, mesh=sharding.make_mesh(config.mesh, devices=jax.devices()[:1]))
        tr = trainers[key]
        cached = config.data.get("source", "frames") == "features"   # no store yet: zero features, real windows
        frames_config = config.copy_and_resolve_references()
        if cached:
            frames_config.data.source = "frames"
        data = stage_lib.get(config.stage).make_data(frames_config, 0, 1, "train")
        try:
            batch = next(data)
        finally:
            if callable(getattr(data, "close", None)):
                data.close()
        if cached:
            from defi_jax.policy.stage import feature_shape
            frames = batch.pop("frames")
            batch = {"feats": np.zeros((len(frames), *feature_shape(config)), np.float32)} | batch
        batch = tr.global_batch(batch)
        if run_steps:
            _, metrics = tr.step(tr.init_state(), batch)
            out[name] = metrics = {k: float(v) for k, v in metrics.items()}
            if not np.isfinite(metrics["loss"]):
                raise FloatingPointError(f"{name}: non-finite loss after one step ({run.workdir})")
            done = f"one step, loss {metrics['loss']:.4g}"
        elif shared:   # the same program: its own data must give the batch the lowered step was traced for
            first_batch, out[name] = lowered_for[key]
            if jax.tree.map(np.shape, batch) != jax.tree.map(np.shape, first_batch):
                raise ValueError(f"{name}: its batch {jax.tree.map(np.shape, batch)} does not fit the step lowered "
                                 f"for {jax.tree.map(np.shape, first_batch)} ({run.workdir})")
            done = "batch of its own data fits the lowered train step"
        else:
            with sharding.use_rules(tr.mesh, tr.rules):
                lowered = tr.jit_step(batch).lower(tr.abstract_state(), batch)
            lowered_for[key] = batch, lowered.out_info[1]
            out[name] = lowered.out_info[1]
            done = "train step traced and lowered"
        log(f"{name}: {done}" + (" (same program as an earlier config)" if shared else ""))
    return out
