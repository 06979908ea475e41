"""Checks an experiment config before anything is built or compiled; every error names the bad key.

Two layers: :func:`validate` checks a whole config (values that fit together: mesh, batch, dtypes, the
stage's own hook); :func:`parse_flags` is the absl flags parser of every entry point with a ``--config`` flag
and turns command-line mistakes into one line and exit code 2 (``app.run(main, flags_parser=parse_flags)``):
a missing config file or variant, an unknown key (with the closest known keys), a value of the wrong type.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence

import jax
import ml_collections
from absl import flags
from ml_collections.config_flags import config_flags, config_path, tuple_parser

from defi_jax import sharding, stage as stage_lib
from defi_jax.optim import SCHEDULES

DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full")  # or any name in jax.checkpoint_policies


class ConfigError(ValueError):
    """A bad config value; the message starts with the dotted key."""


def _fail(key: str, value, why: str):
    raise ConfigError(f"config.{key}={value!r}: {why}")


def data_parallel_size(config, num_devices: int) -> int:
    """Devices the global batch is split over: data * fsdp, within and across slices."""
    dcn = tuple(config.mesh.get("dcn_shape", None) or (1, 1, 1))
    ici = sharding.resolve_mesh_shape(config.mesh.shape, num_devices // math.prod(dcn), "config.mesh.shape")
    return ici[0] * ici[1] * dcn[0] * dcn[1]


def resolve(config) -> None:
    """Sets the keys of ``config`` that follow from others: the stage's ``resolve`` hook. Where configs are built
    (the trainer, launch.ablate), before :func:`validate` and before the config is recorded."""
    try:
        stage = stage_lib.get(config.stage)
    except (ValueError, ImportError):
        return   # validate names the bad stage
    if stage.resolve is not None:
        stage.resolve(config)


def validate(config, num_devices: int | None = None, process_count: int | None = None) -> None:
    """Raises :class:`ConfigError` naming the first bad key; calls the stage's own ``validate`` hook."""
    num_devices = jax.device_count() if num_devices is None else num_devices
    process_count = jax.process_count() if process_count is None else process_count
    t = config.train

    try:
        stage = stage_lib.get(config.stage)
    except ValueError:
        _fail("stage", config.stage, f"unknown stage; choose one of {stage_lib.names()}")
    except ImportError as e:
        _fail("stage", config.stage, f"the stage's module failed to import: {e}")

    for key in ("num_steps", "batch_size", "grad_accum_steps", "max_nonfinite_steps"):
        if not isinstance(t[key], int) or t[key] <= 0:
            _fail(f"train.{key}", t[key], "must be a positive integer")
    if not t.lr > 0:
        _fail("train.lr", t.lr, "learning rate must be positive")
    if t.schedule not in SCHEDULES:
        _fail("train.schedule", t.schedule, f"unknown schedule; choose one of {SCHEDULES}")
    if t.schedule == "tri_stage":
        fr = tuple(t.tri_stage)
        if len(fr) != 3 or any(f < 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
            _fail("train.tri_stage", fr, "must be three non-negative fractions summing to 1")
    if t.warmup_steps < 0:
        _fail("train.warmup_steps", t.warmup_steps, "must be >= 0")
    for key in ("param_dtype", "compute_dtype"):
        if t[key] not in DTYPES:
            _fail(f"train.{key}", t[key], f"unknown dtype; choose one of {DTYPES}")
    if t.remat_policy not in REMAT_POLICIES and not hasattr(jax.checkpoint_policies, str(t.remat_policy)):
        _fail("train.remat_policy", t.remat_policy,
              f"choose one of {REMAT_POLICIES} or a name in jax.checkpoint_policies")
    if not 0.0 <= t.ema_decay < 1.0:
        _fail("train.ema_decay", t.ema_decay, "must be in [0, 1) (0 turns EMA off)")
    if t.grad_clip < 0:
        _fail("train.grad_clip", t.grad_clip, "must be >= 0 (0 turns clipping off)")
    for pattern in t.frozen:
        try:
            re.compile(pattern)
        except re.error as e:
            _fail("train.frozen", pattern, f"not a valid regex: {e}")
    for key in ("log_every", "save_every", "keep_checkpoints"):
        if t[key] <= 0:
            _fail(f"train.{key}", t[key], "must be positive")

    shape = config.mesh.shape
    if not isinstance(shape, (tuple, list)) or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape):
        _fail("mesh.shape", shape, f"needs {len(sharding.MESH_AXES)} integers {sharding.MESH_AXES}, one may be -1, "
              "e.g. (1, -1, 1)")
    dcn = tuple(config.mesh.get("dcn_shape", None) or (1, 1, 1))
    if len(dcn) != len(sharding.MESH_AXES) or any(int(s) <= 0 for s in dcn):
        _fail("mesh.dcn_shape", dcn, f"needs {len(sharding.MESH_AXES)} positive entries")
    if num_devices % math.prod(dcn):
        _fail("mesh.dcn_shape", dcn, f"{num_devices} devices do not split into {math.prod(dcn)} slices")
    try:
        sharding.resolve_mesh_shape(config.mesh.shape, num_devices // math.prod(dcn), "config.mesh.shape")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    dp = data_parallel_size(config, num_devices)
    if t.batch_size % dp:
        _fail("train.batch_size", t.batch_size,
              f"not divisible by the data-parallel size {dp} (mesh data * fsdp over all slices)")
    if t.batch_size % t.grad_accum_steps:
        _fail("train.grad_accum_steps", t.grad_accum_steps,
              f"does not divide config.train.batch_size={t.batch_size}")
    if (t.batch_size // t.grad_accum_steps) % dp:
        _fail("train.grad_accum_steps", t.grad_accum_steps,
              f"the microbatch {t.batch_size // t.grad_accum_steps} is not divisible by the data-parallel "
              f"size {dp}")
    if t.batch_size % process_count:
        _fail("train.batch_size", t.batch_size, f"not divisible by the process count {process_count}")

    rules = dict(config.sharding.logical_axis_rules)
    for name, target in rules.items():
        axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
        for a in axes:
            if a not in sharding.MESH_AXES:
                _fail("sharding.logical_axis_rules", (name, target), f"unknown mesh axis {a!r}")

    _validate_datasets(config)
    if stage.validate is not None:
        try:
            stage.validate(config)
        except ConfigError:
            raise
        except (ValueError, KeyError) as e:
            raise ConfigError(str(e).strip("'\"")) from None


def _data_pipelines():
    """The input-side package, or None where it is absent (validation must not depend on it)."""
    try:
        import data_pipelines
    except ImportError:
        return None
    return data_pipelines


def _validate_datasets(config) -> None:
    """``config.data.mixture`` (preset, "name:w,..." or name -> weight) and ``config.data.dataset`` must be known.

    Uses ``data_pipelines.validate_data_config`` / ``known_datasets`` when that package is importable; without
    it only the mixture's weights are checked.
    """
    d = config.data
    dp = _data_pipelines()
    if "mixture" in d and d.mixture is not None:
        if dp is not None and hasattr(dp, "validate_data_config"):
            try:
                dp.validate_data_config(d, key="config.data")
            except ValueError as e:
                msg = str(e)
                raise ConfigError(msg if msg.startswith("config.") else f"config.data: {msg}") from None
        elif isinstance(d.mixture, Mapping):
            mix = dict(d.mixture)
            for name, w in mix.items():
                if not isinstance(w, (int, float)) or w < 0:
                    _fail(f"data.mixture.{name}", w, "weights must be non-negative numbers")
            if not sum(mix.values()) > 0:
                _fail("data.mixture", mix, "weights sum to zero")
    known = getattr(dp, "known_datasets", None) if dp is not None else None
    if "dataset" in d and d.dataset and callable(known):
        resolve = getattr(getattr(dp, "oxe_table", None), "resolve", lambda n: n)
        if resolve(d.dataset) not in known():
            _fail("data.dataset", d.dataset, f"unknown dataset; known: {sorted(known())}")


# ---------------------------------------------------------------------------------------------- command line
# The keys users override most, shown by --help (with the chosen config's values when --config is given).
COMMON_KEYS = (
    ("train.num_steps", "optimizer steps"),
    ("train.batch_size", "global batch size (all devices, all hosts)"),
    ("train.lr", "peak learning rate"),
    ("train.compute_dtype", "float32 | bfloat16 (mixed precision; master weights stay param_dtype)"),
    ("train.log_every", "steps between metrics rows"),
    ("train.eval_every", "steps between evaluations (0: at the end only)"),
    ("train.save_every", "steps between checkpoints"),
    ("train.progress_bar", "tqdm bar on a terminal"),
    ("mesh.shape", "(data, fsdp, tensor) within a slice; one entry may be -1"),
    ("data.data_dir", "root of the datasets (local or gs://; empty: the embedded demo data)"),
    ("data.mixture", "a preset (gfdm_paper, gfdm_released, gidm_paper, demo) or {name: weight}"),
    ("init.svd_path", "GFDM: a diffusers stable-video-diffusion folder"),
    ("init.clip_path", "GFDM: a transformers CLIP folder"),
    ("model.tokenizer_path", "GIDM: a transformers T5 folder"),
)
_HELP_ARGS = ("-h", "-help", "--help", "-?", "--helpshort", "--helpfull")


def _configs_dirs() -> list[str]:
    try:
        return list(importlib.import_module("configs").__path__)
    except ImportError:
        return []


def _load_module(path: str):
    name = "_defi_jax_config_" + re.sub(r"\W", "_", os.path.abspath(path))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def config_variants(module) -> tuple[str, ...]:
    """A config module's variants: its ``VARIANTS`` tuple, else the ``(a | b)`` list its ``get_config`` names
    when given an unknown variant (the convention of ``configs/*.py``)."""
    if hasattr(module, "VARIANTS"):
        return tuple(module.VARIANTS)
    try:
        module.get_config("?")
    except Exception as e:  # noqa: BLE001  (a probe: any config may fail its own way)
        m = re.search(r"\(([\w\s|]+)\)\s*$", str(e))
        if m:
            return tuple(v.strip() for v in m.group(1).split("|"))
    return ()


def known_configs() -> dict[str, tuple[str, ...]]:
    """``configs/NAME.py`` -> its variants, for every config module with a ``get_config``."""
    out = {}
    for folder in _configs_dirs():
        for fname in sorted(os.listdir(folder)):
            if not fname.endswith(".py") or fname.startswith("_") or fname == "base.py":
                continue
            try:
                module = importlib.import_module(f"configs.{fname[:-3]}")
            except Exception:  # noqa: BLE001  (a broken config must not break --help of the others)
                continue
            if callable(getattr(module, "get_config", None)):
                out[f"configs/{fname}"] = config_variants(module)
    return out


def load_config(spec: str) -> ml_collections.ConfigDict:
    """``FILE[:ARG]`` -> ``get_config(ARG)`` of that Python file, as ml_collections' ``--config`` loads it."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        known = ", ".join(f"{k}:{'|'.join(v)}" if v else k for k, v in known_configs().items())
        raise ConfigError(f"--config={spec}: no such file {path!r}" + (f"; configs: {known}" if known else ""))
    module = _load_module(path)
    if not callable(getattr(module, "get_config", None)):
        raise ConfigError(f"--config={spec}: {path} defines no get_config()")
    try:
        return module.get_config(arg) if arg else module.get_config()
    except ValueError as e:  # an unknown variant
        raise ConfigError(f"--config={spec}: {e}") from None


def _flatten(node, prefix: str = "") -> dict:
    """Dotted key -> value of every leaf (and sub-dict) under ``node``."""
    out = {}
    for k, v in (node.items() if isinstance(node, (Mapping, ml_collections.ConfigDict)) else ()):
        key = f"{prefix}{k}"
        out[key] = v
        if isinstance(v, (Mapping, ml_collections.ConfigDict)):
            out |= _flatten(v, key + ".")
    return out


def _unknown_key(config, key: str, known_prefix: str) -> ConfigError:
    keys = list(_flatten(config))
    parent, _, leaf = key.rpartition(".")
    siblings = [k for k in keys if k.rpartition(".")[0] == parent]
    by_leaf = {k.rpartition(".")[2]: k for k in siblings}
    close = [by_leaf[n] for n in difflib.get_close_matches(leaf, list(by_leaf), n=3, cutoff=0.6)]
    close += [k for k in keys if k.rpartition(".")[2] == leaf and k not in close]  # the same name elsewhere
    if close:
        hint = "did you mean " + " or ".join(f"config.{k}" for k in close[:3]) + "?"
    else:
        where = f"config.{known_prefix}" if known_prefix else "config"
        names = [k.rpartition(".")[2] for k in (siblings if parent == known_prefix else
                                                 [k for k in keys if k.rpartition(".")[0] == known_prefix])]
        hint = f"{where} has: {', '.join(names)}"
    return ConfigError(f"config.{key}: unknown key; {hint}")


def _resolve(config, key: str):
    """(holder, field) of dotted ``key`` in ``config``; ConfigError with suggestions where it is not there."""
    try:
        parts = config_path.split(key)
    except ValueError:
        raise ConfigError(f"config.{key}: not a key (use dots: --config.train.lr=1e-4)") from None
    node, done = config, []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, (Mapping, ml_collections.ConfigDict)) and part in node:
            if last:
                return node, part
            node, done = node[part], done + [str(part)]
        elif isinstance(node, (list, tuple)) and isinstance(part, int) and -len(node) <= part < len(node):
            if last:
                return node, part
            node, done = node[part], done + [str(part)]
        else:
            raise _unknown_key(config, key, ".".join(done))
    raise ConfigError(f"config.{key}: not a key")


def _type_name(value) -> str:
    if isinstance(value, tuple) and value:
        kinds = sorted({type(v).__name__ for v in value})
        return f"a tuple of {' / '.join(kinds)} like {value!r}"
    names = {bool: "a bool (true | false)", int: "an integer", float: "a number", str: "a string",
             tuple: "a tuple", ml_collections.ConfigDict: "a dict like {'key': value}"}
    return names.get(type(value), f"a Python literal ({type(value).__name__})")


def _parse_value(key: str, text: str, current):
    """``text`` from the command line -> a value of ``current``'s type (ml_collections' parsers)."""
    bad = lambda why="": ConfigError(f"config.{key}={text!r}: expected {_type_name(current)}{why}")
    if isinstance(current, bool):
        parser = flags.BooleanParser()
    elif isinstance(current, int):
        parser = flags.IntegerParser()
    elif isinstance(current, float):
        parser = flags.FloatParser()
    elif isinstance(current, str):
        return text
    elif isinstance(current, tuple):
        try:
            value = tuple_parser.TupleParser().parse(text)
        except ValueError:
            raise bad() from None
        kinds = {type(v) for v in current}
        if len(kinds) == 1 and value and kinds <= {int, float, str, bool, tuple}:
            ok = lambda v, k: (isinstance(v, k) and not (isinstance(v, bool) and k is not bool)) or (
                k is float and isinstance(v, int) and not isinstance(v, bool))
            if not all(ok(v, next(iter(kinds))) for v in value):
                raise bad()
        return value
    elif isinstance(current, (Mapping, ml_collections.ConfigDict)):
        try:
            value = ast.literal_eval(text)
        except (SyntaxError, ValueError):
            raise bad() from None
        if not isinstance(value, dict):
            raise bad()
        return value
    else:  # None or another literal: whatever Python literal it reads as, else the string
        try:
            return ast.literal_eval(text)
        except (SyntaxError, ValueError):
            return text
    try:
        return parser.parse(text)
    except (TypeError, ValueError):
        raise bad(f"; the config has {current!r}") from None


def apply_overrides(config, overrides: Sequence[tuple[str, str | None]]) -> None:
    """Sets each ``(dotted key, command-line text)`` in ``config``, parsed to the declared value's type.

    Text ``None`` is the bare boolean form (``--config.train.progress_bar``). Raises :class:`ConfigError`
    naming the key, the value and the expected type, or, for an unknown key, the closest known keys.
    """
    for key, text in overrides:
        holder, field = _resolve(config, key)
        current = holder[field]
        if text is None:
            if not isinstance(current, bool) and current is not None:
                raise ConfigError(f"config.{key}: needs a value, e.g. --config.{key}={current!r}")
            text = "true"
        value = _parse_value(key, text, current)
        try:
            holder[field] = value
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config.{key}={text!r}: expected {_type_name(current)} ({e})") from None


def _config_flag_names() -> list[str]:
    return [name for name in flags.FLAGS if config_flags.is_config_flag(flags.FLAGS[name])]


def _split_argv(argv: Sequence[str], name: str) -> tuple[str | None, list[tuple[str, str | None]]]:
    """The ``--NAME=FILE`` value and the ``--NAME.KEY[=VALUE]`` / ``--noNAME.KEY`` overrides in ``argv``."""
    spec, overrides = None, []
    args = list(argv[1:])
    for i, arg in enumerate(args):
        if arg == "--":
            break
        m = re.match(rf"^--?(no)?{re.escape(name)}(\.[^=]+)?(=.*)?$", arg)
        if not m:
            continue
        negated, key, value = m.group(1), m.group(2), m.group(3)
        if key is None:
            if not negated:
                spec = value[1:] if value else (args[i + 1] if i + 1 < len(args) else None)
            continue
        if value is not None:
            overrides.append((key[1:], value[1:]))
        elif negated:
            overrides.append((key[1:], "false"))
        elif i + 1 < len(args) and not args[i + 1].startswith("-"):
            overrides.append((key[1:], args[i + 1]))   # "--config.key value" (absl's form for non-bools)
        else:
            overrides.append((key[1:], None))
    return spec, overrides


def help_text(argv: Sequence[str]) -> str:
    """What ``--help`` prints: the entry point's doc and flags, the configs and their variants, the common keys
    (with the values of ``--config`` where given)."""
    main = sys.modules.get("__main__")
    parts = [(getattr(main, "__doc__", None) or "").strip(), "flags:\n" + flags.FLAGS.main_module_help().strip()]
    names = _config_flag_names()
    if names:
        configs = known_configs()
        if configs:
            width = max(map(len, configs))
            parts.append(f"configs (--{names[0]}=FILE:VARIANT):\n" + "\n".join(
                f"  {k.ljust(width)}  {' | '.join(v) or '(no variants)'}" for k, v in configs.items()))
        config = None
        spec, overrides = _split_argv(argv, names[0])
        if spec:
            try:
                config = load_config(spec)
                apply_overrides(config, overrides)
            except ConfigError as e:
                parts.append(f"({e})")
                config = None
        flat = _flatten(config) if config is not None else {}
        lines = []
        for key, what in COMMON_KEYS:
            if config is None or key in flat:
                now = f" = {flat[key]!r}" if key in flat else ""
                lines.append(f"  --{names[0]}.{key}{now}\n      {what}")
        parts.append(f"most used keys (--{names[0]}.KEY=VALUE sets any key of the config):\n" + "\n".join(lines))
        if config is not None:
            leaves = {k: v for k, v in flat.items() if not isinstance(v, (Mapping, ml_collections.ConfigDict))}
            parts.append(f"every key of {spec}:\n" + "\n".join(f"  {k} = {v!r}" for k, v in leaves.items()))
        else:
            parts.append(f"--help --{names[0]}=FILE:VARIANT lists every key of that config with its value.")
    return "\n\n".join(p for p in parts if p)


def parse_flags(argv: Sequence[str]) -> list[str]:
    """absl flags parser for entry points: ``app.run(main, flags_parser=config_validation.parse_flags)``.

    Before absl and ml_collections parse ``argv``, loads each ``--config`` file and applies its
    ``--config.KEY=VALUE`` overrides to a copy, so that a bad file, variant, key or value is reported as one
    line naming it (and an unknown key with the closest known keys), exit code 2, no traceback; so are absl's
    own usage errors (an unknown or missing flag). ``--help`` prints :func:`help_text` and exits 0.
    """
    prog = _prog(argv)
    try:
        argv = flags.FLAGS.read_flags_from_files(list(argv), force_gnu=False)
        if any(a in _HELP_ARGS for a in argv[1:]):
            print(help_text(argv))
            sys.exit(0)
        for name in _config_flag_names():
            spec, overrides = _split_argv(argv, name)
            if spec is not None:
                apply_overrides(load_config(spec), overrides)
        return flags.FLAGS(argv)
    except (ConfigError, flags.Error) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        sys.exit(2)


def _prog(argv: Sequence[str]) -> str:
    main = getattr(sys.modules.get("__main__"), "__spec__", None)
    if main is not None and main.name:
        return f"python -m {main.name}"
    return os.path.basename(argv[0]) if argv else "python"
