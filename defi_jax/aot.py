"""Ahead-of-time compile of a config's train step for a Cloud TPU topology, from any machine.

With ``libtpu`` installed (``pip install -e '.[tpu]'``) the real TPU compiler runs on a CPU-only machine:
:func:`topology_devices` returns compile-only devices of a named topology, the mesh is built on them as on
the pod, and :func:`compile_report` compiles (never runs) the train step and reads XLA's per-device memory,
FLOPs and collectives from the result. Entry point: ``python -m launch.aot``.

Topology names (the mapping :func:`parse_topology` applies; checked against libtpu 0.0.42):

  ==============  =====================  ==================================================================
  given           libtpu topology_name   meaning
  ==============  =====================  ==================================================================
  ``v4-32``       ``v4:2x2x4``           v4 and v5p names count TensorCores: 2 per chip, so v4-32 = 16 chips;
  ``v5p-128``     ``v5p:4x4x4``          one JAX device per chip ("megacore"). 3-D torus, grown from
  ``v5p-16``      ``v5p:2x2x2``          2x2x1 by doubling the smallest side (4x4x8, 4x8x8, 8x8x8, ...).
  ``v5e-256``     ``v5e:16x16``          v5e (``v5litepod-N``) and v6e names count chips, one core each;
  ``v6e-64``      ``v6e:8x8``            2-D torus (2x2, 2x4, 4x4, 4x8, 8x8, 8x16, 16x16).
  ``v5p:2x2x2``   ``v5p:2x2x2``          the explicit chip grid, for shapes the doubling rule does not give.
  ==============  =====================  ==================================================================

Every host of a multi-host slice holds 2x2x1 chips (single-host v5e / v6e: up to 8). Sides of 16 (2-D) or a full cube of sides >= 4 (3-D) wrap around (torus).
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from defi_jax import metrics, sharding

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation: what a topology name means and what a chip can do."""

    name: str                 # as in the product name: v4, v5p, v5e, v6e
    peak_flops: float         # dense bf16 FLOP/s per chip
    hbm_bytes: int            # HBM per chip (= per JAX device: one device per chip on all four)
    cores_per_chip: int       # TensorCores the product name counts per chip (v4-8 is 4 chips)
    ndim: int                 # torus dimensions
    chip_config: str          # libtpu chip_config_name: "megacore" fuses a chip's two cores into one device


# Peak dense bf16 FLOP/s and HBM per chip from the Cloud TPU system-architecture pages
# (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e): v4 275 TF / 32 GiB, v5e 197 TF / 16 GiB,
# v5p 459 TF / 95 GiB, v6e (Trillium) 918 TF / 32 GiB.
CHIPS = {
    "v4": Chip("v4", 275e12, 32 * GiB, cores_per_chip=2, ndim=3, chip_config="megacore"),
    "v5p": Chip("v5p", 459e12, 95 * GiB, cores_per_chip=2, ndim=3, chip_config="megacore"),
    "v5e": Chip("v5e", 197e12, 16 * GiB, cores_per_chip=1, ndim=2, chip_config="default"),
    "v6e": Chip("v6e", 918e12, 32 * GiB, cores_per_chip=1, ndim=2, chip_config="default"),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v5": "v5p", "v6": "v6e"}

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


@dataclasses.dataclass(frozen=True)
class Topology:
    """A named slice (or ``num_slices`` identical slices) of one TPU generation."""

    name: str                 # as given, e.g. "v5p-128"
    chip: Chip
    grid: tuple[int, ...]     # chips along each torus side
    num_slices: int = 1

    @property
    def topology_name(self) -> str:
        """The string libtpu's ``get_topology_desc`` accepts, e.g. ``v5p:4x4x4``."""
        return f"{self.chip.name}:" + "x".join(map(str, self.grid))

    @property
    def chips_per_slice(self) -> int:
        return math.prod(self.grid)

    @property
    def chips_per_host(self) -> tuple[int, int, int]:
        grid = tuple(self.grid) + (1,) * (3 - len(self.grid))
        if self.chip.ndim == 2 and self.chips_per_slice <= 8:
            return grid  # single-host v5e / v6e machines hold up to 8 chips
        return tuple(min(g, b) for g, b in zip(grid, (2, 2, 1)))

    @property
    def hosts(self) -> int:
        """TPU VM workers (hosts) per slice: 16 for v5p-128, 1 for v5e-8."""
        return self.chips_per_slice // math.prod(self.chips_per_host)

    @property
    def wrap(self) -> tuple[bool, bool, bool]:
        if self.chip.ndim == 3:
            full = min(self.grid) >= 4
            return (full, full, full)
        return (self.grid[0] == 16, self.grid[1] == 16, False)


def _chip(family: str, name: str, flag: str) -> Chip:
    family = _ALIASES.get(family.lower(), family.lower())
    if family not in CHIPS:
        raise ValueError(f"{flag}={name!r}: unknown TPU generation {family!r}; "
                         f"choose one of {sorted(CHIPS)} (e.g. v5p-128, v6e-64, v5p:2x2x2)")
    return CHIPS[family]


def _grid_for(chip: Chip, chips: int, name: str, flag: str) -> tuple[int, ...]:
    if chips < 1 or chips & (chips - 1):
        example = f"{chip.name}:4x4x12" if chip.ndim == 3 else f"{chip.name}:8x8"
        raise ValueError(f"{flag}={name!r}: {chips} chips is not a power of two; give the chip grid "
                         f"explicitly, e.g. {example}")
    if chip.ndim == 3 and chips == 4:
        return (2, 2, 1)  # one host
    grid, n = [1] * chip.ndim, 1
    while n < chips:  # double the smallest side: 2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8, ...
        grid = sorted(grid)
        grid[0] *= 2
        n *= 2
    return tuple(sorted(grid))


def parse_topology(name: str, num_slices: int = 1, flag: str = "--topology") -> Topology:
    """``v5p-128`` (TensorCores for v4 / v5p, chips for v5e / v6e) or ``v5p:4x4x4`` (the chip grid).

    Errors name ``flag``, the command-line flag ``name`` came from.
    """
    m = re.fullmatch(r"([a-z0-9]+?)(?:-(\d+)|:(\d+(?:x\d+)+))", name.strip().lower())
    if not m:
        raise ValueError(f"{flag}={name!r}: expected GEN-N (v5p-128, v4-32, v5e-256, v6e-64) or GEN:AxBxC "
                         f"(v5p:2x2x2, v5e:4x4)")
    chip = _chip(m.group(1), name, flag)
    if m.group(2):
        cores = int(m.group(2))
        if cores % chip.cores_per_chip:
            raise ValueError(f"{flag}={name!r}: {chip.name} names count {chip.cores_per_chip} TensorCores "
                             f"per chip; {cores} is not a multiple")
        grid = _grid_for(chip, cores // chip.cores_per_chip, name, flag)
    else:
        grid = tuple(int(s) for s in m.group(3).split("x"))
        if len(grid) != chip.ndim:
            raise ValueError(f"{flag}={name!r}: {chip.name} is a {chip.ndim}-D torus; give {chip.ndim} sides")
    return Topology(name=name, chip=chip, grid=grid, num_slices=num_slices)


def topology_devices(topology: Topology) -> list[jax.Device]:
    """Compile-only devices of ``topology`` (needs libtpu; nothing is attached or allocated)."""
    from jax.experimental import topologies
    kwargs = dict(chip_config_name=topology.chip.chip_config, chips_per_host_bounds=topology.chips_per_host,
                  num_slices=topology.num_slices, wrap=topology.wrap)
    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=topology.topology_name, **kwargs)
    except Exception as e:  # libtpu missing, or a grid libtpu rejects
        raise RuntimeError(f"--topology={topology.name!r} ({topology.topology_name}, {kwargs}): libtpu could "
                           f"not describe it ({type(e).__name__}: {e}). Is libtpu installed "
                           f"(pip install -e '.[tpu]')?") from e
    return list(desc.devices)


def count_collectives(hlo_text: str) -> dict[str, int]:
    """How often each collective appears as an instruction in (optimized) HLO text.

    Async pairs count once (``all-gather-start`` counts, ``all-gather-done`` does not); collectives inside
    fusions or async wrappers count where their instruction is written.
    """
    counts = {}
    for op in COLLECTIVES:
        # An instruction reads `%name = shape op(...)`: the opcode follows a space and precedes "(".
        counts[op] = len(re.findall(rf"[\s)]{re.escape(op)}(?:-start)?\(", hlo_text))
    return counts


def ideal_step_times(flops_per_device: float, peak_flops: float) -> dict[str, float]:
    """The step time (s) at 100% and 50% MFU."""
    t = flops_per_device / peak_flops
    return {"mfu_100": t, "mfu_50": 2 * t}


def compile_report(config, devices: Sequence[jax.Device], *, chip: Chip | None = None,
                   step_time: float | None = None) -> dict:
    """Compiles ``config``'s train step on a mesh over ``devices`` and returns the numbers as a dict.

    ``chip`` (the TPU generation of ``devices``) adds HBM use and the ideal step times; ``step_time`` (s,
    measured or assumed) adds MFU. On fake CPU devices the memory is XLA:CPU's, not a TPU's.
    """
    from defi_jax import trainer  # the model zoo loads only when something is compiled
    mesh = sharding.make_mesh(config.mesh, devices=list(devices))
    t0 = time.perf_counter()
    compiled, memory = trainer.compile_train_step(config, mesh)
    compile_s = time.perf_counter() - t0
    report = _report(config, mesh, compile_s, memory, metrics.compiled_flops(compiled), compiled.as_text())
    return _add_chip(report, chip, step_time)


def _report(config, mesh, compile_s: float, memory: dict, flops: float | None, hlo_text: str) -> dict:
    devices = list(mesh.devices.flat)
    return {
        "platform": devices[0].platform,
        "device_kind": devices[0].device_kind,
        "num_devices": len(devices),
        "num_processes": len({d.process_index for d in devices}),
        "mesh": dict(mesh.shape),
        "batch_size": int(config.train.batch_size),
        "compile_seconds": compile_s,
        "memory": memory,
        "flops_per_step_per_device": flops,
        "flops_per_step": None if flops is None else flops * len(devices),
        "collectives": count_collectives(hlo_text),
    }


def _add_chip(report: dict, chip: Chip | None, step_time: float | None) -> dict:
    """``report`` plus HBM use, the ideal step times and the MFU at ``step_time`` on ``chip``."""
    memory, flops = report["memory"], report["flops_per_step_per_device"]
    if chip is not None:
        report["chip"] = chip.name
        report["peak_flops_per_device"] = chip.peak_flops
        report["hbm_bytes_per_device"] = chip.hbm_bytes
        if memory:
            report["hbm_fraction"] = memory["peak_estimate"] / chip.hbm_bytes
            report["fits_in_hbm"] = memory["peak_estimate"] <= chip.hbm_bytes
        if flops is not None:
            report["ideal_step_time_s"] = ideal_step_times(flops, chip.peak_flops)
            if step_time is not None:
                report["step_time_s"] = step_time
                report["mfu"] = flops / (step_time * chip.peak_flops)
    return report


# ---- per-block compile: the train step composed from its remat units ----------------------------------
@dataclasses.dataclass
class _Unit:
    """One distinct remat unit of the UNet (a res-block or a spatio-temporal transformer) at per-device shapes."""

    name: str
    graphdef: Any
    state: Any                # abstract params (compute dtype), whole (an FSDP step gathers them per unit)
    args: tuple               # abstract activations, the batch split over the mesh's batch axes
    out: Any
    static: dict
    remat: bool
    count: int = 0


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


class _UnitRecorder:
    """The :func:`defi_jax.models.svd_unet.unit_hook`: records each unit and stands in for it.

    The stand-in (a squared sum of the unit's params and inputs, broadcast to its output, under the same
    remat) keeps what the step holds around a unit: its inputs saved for the backward pass, its output, the
    gradients of its params and inputs; it drops what runs inside the unit.
    """

    def __init__(self, batch_shards: int):
        self.batch_shards = batch_shards
        self.units: dict[str, _Unit] = {}

    def _local(self, x):
        if x.shape[0] % self.batch_shards:
            raise ValueError(f"--per_block: a UNet activation {x.shape} does not split its leading dim over the "
                             f"{self.batch_shards} batch shards of config.mesh")
        return jax.ShapeDtypeStruct((x.shape[0] // self.batch_shards, *x.shape[1:]), x.dtype)

    def __call__(self, layer, remat: bool, args: tuple, static: dict):
        from flax import nnx
        graphdef, state = nnx.split(layer)
        state_abs, args_abs = _abstract(state), _abstract(args)
        out = jax.eval_shape(lambda st, *a: nnx.merge(graphdef, st)(*a, **static), state_abs, *args_abs)
        shapes = ", ".join("x".join(map(str, a.shape)) for a in jax.tree.leaves(args_abs))
        params = sum(math.prod(x.shape) for x in jax.tree.leaves(state_abs))
        name = f"{type(layer).__name__}({shapes}; {params} params)"
        key = f"{name} {static} {remat} {jax.tree.structure(state_abs)} {_abstract(jax.tree.leaves(state_abs))}"
        unit = self.units.get(key)
        if unit is None:
            unit = self.units[key] = _Unit(name, graphdef, state_abs, jax.tree.map(self._local, args_abs),
                                           jax.tree.map(self._local, out), dict(static), remat)
        unit.count += 1

        def stand_in(m, *a):
            leaves = [x for x in jax.tree.leaves((nnx.state(m, nnx.Param), a))
                      if jnp.issubdtype(x.dtype, jnp.floating)]
            total = sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves)
            return jax.tree.map(lambda o: jnp.broadcast_to(total.astype(o.dtype), o.shape), out)

        return nnx.remat(stand_in)(layer, *args) if remat else stand_in(layer, *args)


def _compile_unit(unit: _Unit, device: jax.Device, jit_kwargs: dict, backward: bool = True):
    """The unit's forward pass and its backward pass (recomputed forward first, under its remat) on one device;
    the forward pass only with ``backward=False`` (a frozen UNet: the policy's features)."""
    from flax import nnx

    def call(st, *a):
        return nnx.merge(unit.graphdef, st)(*a, **unit.static)

    def fwd_bwd(state, args, cotangent):
        if not backward:
            return call(state, *args)
        out, vjp = jax.vjp(jax.checkpoint(call) if unit.remat else call, state, *args)
        return out, vjp(cotangent)  # the forward pass, then (recomputed) forward + backward, as in the step

    on = jax.sharding.SingleDeviceSharding(device)
    put = lambda t: jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=on), t)  # noqa: E731
    return jax.jit(fwd_bwd, **jit_kwargs).lower(put(unit.state), put(unit.args), put(unit.out)).compile()


def _unit_backward(config) -> bool:
    """Whether the train step differentiates through the UNet (not for the policy's frozen GFDM)."""
    return config.stage != "policy" or config.policy.finetune == "all"


def _check_per_block(config):
    """Raises ValueError naming the config key when ``--per_block`` cannot compose ``config``'s step."""
    key = {"gfdm": "remat", "policy": "gfdm.remat"}.get(config.stage)
    model = config.model.get("gfdm", {}) if config.stage == "policy" else config.model
    if key is None or not model.get("remat", False):
        raise ValueError(f"--per_block composes the SVD UNet's remat units: needs config.stage='gfdm' with "
                         f"config.model.remat=True (or 'policy' with config.model.gfdm.remat=True); got "
                         f"stage={config.stage!r}" + (f", config.model.{key}=False" if key else "")
                         + "; compile the whole step instead")
    if config.train.grad_accum_steps != 1:
        raise ValueError(f"--per_block: config.train.grad_accum_steps={config.train.grad_accum_steps}; "
                         f"compose at grad_accum_steps=1 with the microbatch as config.train.batch_size")


def _stood_in_step(config, mesh):
    """``(compiled, memory, recorder)``: the train step with every UNet remat unit stood in (:class:`_UnitRecorder`)."""
    from defi_jax import trainer
    from defi_jax.models import svd_unet
    recorder = _UnitRecorder(mesh.shape["data"] * mesh.shape["fsdp"])
    with svd_unet.unit_hook(recorder):
        compiled, memory = trainer.compile_train_step(config, mesh)
    if not recorder.units:
        raise ValueError("--per_block: the train step called no UNet remat unit")
    return compiled, memory, recorder


def per_block_report(config, devices: Sequence[jax.Device], *, chip: Chip | None = None,
                     step_time: float | None = None, compare_whole: bool = False, log=None) -> dict:
    """:func:`compile_report` composed from pieces the compiler handles one at a time (the full GFDM).

    Two kinds of compile: (1) the whole train step on the mesh with every UNet remat unit (res-block,
    spatio-temporal transformer) replaced by a stand-in that keeps the unit's saved inputs, output and
    gradients (:class:`_UnitRecorder`): state, optimizer, gradients, activations kept across units, the VAE
    and text encoders, collectives; (2) each distinct unit's recomputed forward + backward on one device at
    the per-device batch (the forward only where the UNet is frozen: the policy unless policy.finetune=all). Peak = (1)'s peak + the largest unit temporaries; FLOPs = (1)'s + each unit's x
    its calls. Needs ``config.model.remat`` (the units are the remat boundaries) and
    ``config.train.grad_accum_steps == 1``. ``compare_whole`` also compiles the whole step (what the
    composition replaces: mid-size configs only) and reports the composition's relative error.

    Validated on the TPU compiler (v5p, one chip): FLOPs compose to within 0.2% of the whole step's; the peak
    comes out 21% (128 channels, 16 x 16 latents, 8 frames) to 49% (32 channels, 8 x 8) BELOW the whole
    step's, because with HBM to spare the compiler schedules the whole step for speed rather than memory.
    Read the composed peak as what the remat schedule needs, not as a bound on what an unconstrained
    compile reports. ``log``
    (e.g. ``print``) gets a line as each compile finishes.
    """
    log = log or (lambda _: None)
    from defi_jax import stage as stage_lib, trainer

    _check_per_block(config)
    mesh = sharding.make_mesh(config.mesh, devices=list(devices))
    t0 = time.perf_counter()
    outer, outer_memory, recorder = _stood_in_step(config, mesh)
    outer_s = time.perf_counter() - t0
    outer_flops = metrics.compiled_flops(outer)
    log(f"per-block: the step with {len(recorder.units)} distinct UNet units stood in compiled in {outer_s:.0f} s: "
        f"peak {_bytes(outer_memory.get('peak_estimate', 0))}, FLOPs {outer_flops or 0:.4g}")
    jit_kwargs = stage_lib.jit_kwargs(config)
    units = []
    for unit in recorder.units.values():
        t1 = time.perf_counter()
        compiled = _compile_unit(unit, devices[0], jit_kwargs, _unit_backward(config))
        units.append({"name": unit.name, "count": unit.count, "memory": trainer.memory_stats(compiled),
                      "flops": metrics.compiled_flops(compiled), "compile_seconds": time.perf_counter() - t1})
        log(f"per-block: unit {len(units)}/{len(recorder.units)} {unit.name}: temp "
            f"{_bytes(units[-1]['memory'].get('temp', 0))}, FLOPs {units[-1]['flops'] or 0:.4g} x {unit.count}, compiled "
            f"in {units[-1]['compile_seconds']:.0f} s")
    largest = max(units, key=lambda u: u["memory"].get("temp", 0))
    memory = dict(outer_memory)
    if outer_memory:
        memory["temp"] = outer_memory["temp"] + largest["memory"]["temp"]
        memory["peak_estimate"] = outer_memory["peak_estimate"] + largest["memory"]["temp"]
    flops = None
    if outer_flops is not None and all(u["flops"] is not None for u in units):
        flops = outer_flops + sum(u["count"] * u["flops"] for u in units)
    report = _report(config, mesh, time.perf_counter() - t0, memory, flops, outer.as_text())
    report["per_block"] = {"outer_memory": outer_memory, "outer_flops": outer_flops,
                           "outer_compile_seconds": outer_s, "largest_unit": largest["name"],
                           "largest_unit_index": units.index(largest), "units": units}
    if compare_whole:
        whole = compile_report(config, devices)
        report["whole"] = {k: whole[k] for k in ("memory", "flops_per_step_per_device", "compile_seconds")}
        pairs = {"peak": (memory.get("peak_estimate"), whole["memory"].get("peak_estimate")),
                 "flops": (flops, whole["flops_per_step_per_device"])}
        report["per_block"]["relative_error"] = {k: None if not (a and b) else (a - b) / b
                                                 for k, (a, b) in pairs.items()}
    return _add_chip(report, chip, step_time)


# ---- the largest batch that fits ------------------------------------------------------------------------
def search_max_batch(peak_at, batch: int, peak: float, limit: float, *, step: int = 1, max_probes: int = 4,
                     log=None) -> dict:
    """The largest batch (a multiple of ``step``) whose compiled peak ``peak_at(batch)`` is at most ``limit``.

    ``batch`` / ``peak`` is a point already compiled. Peak memory grows affinely with the batch (state and
    gradients fixed, activations per sample): each probe compiles the batch an affine fit through the two
    points nearest the limit predicts, until a fitting batch and one ``step`` above it that does not are both
    compiled (``proven``) or ``max_probes`` compiles are spent. Returns the probed ``points`` (batch, peak),
    ``max_batch`` (largest compiled batch that fits; 0 if none did) and ``first_over`` (smallest that did not).
    ``peak_at`` returns ``math.inf`` for a batch the compiler refuses (out of HBM); its peak is then ``None``.
    """
    log = log or (lambda _: None)
    points = {int(batch): float(peak)}

    def bracket():
        fits = [b for b, p in points.items() if p <= limit]
        over = [b for b, p in points.items() if p > limit]
        return max(fits, default=0), min(over, default=None)

    for _ in range(max_probes):
        lo, hi = bracket()
        if hi is not None and hi - lo <= step:
            break
        near = sorted((b for b in points if math.isfinite(points[b])), key=lambda b: abs(points[b] - limit))[:2]
        guess = None
        if len(near) == 2 and (hi is None or math.isfinite(points[hi])):  # affine, unless the compiler refused hi
            (b1, p1), (b2, p2) = sorted((b, points[b]) for b in near)
            slope = (p2 - p1) / (b2 - b1)
            guess = b2 + (limit - p2) / slope if slope > 0 else None
        if guess is None:   # double, or bisect the bracket
            guess = 2 * max(lo, step) if hi is None else (lo + hi) // 2
        guess = int(guess // step) * step
        guess = max(guess, lo + step)
        if hi is not None:
            guess = min(guess, hi - step)
        if guess in points or guess < step:
            break
        points[guess] = float(peak_at(guess))
        log(f"max batch: batch {guess}: peak {_peak(points[guess])} "
            f"({'fits' if points[guess] <= limit else 'over'} {_bytes(limit)})")
    lo, hi = bracket()
    return {"limit_bytes": limit, "step": step, "max_batch": lo,
            "points": [(b, p if math.isfinite(p) else None) for b, p in sorted(points.items())],
            "first_over": hi, "proven": hi is not None and hi - lo <= step}


def max_batch_report(config, devices: Sequence[jax.Device], report: dict, *, chip: Chip, headroom: float = 0.2,
                     max_probes: int = 4, log=None) -> dict:
    """:func:`search_max_batch` on ``chip``'s HBM less ``headroom``, starting from ``report`` (a
    :func:`compile_report` or :func:`per_block_report` of ``config``): probes compile the whole step at
    other batch sizes, or, for a per-block report, the stood-in step plus its largest unit (the one unit whose
    temporaries enter the peak), so a probe of the full GFDM costs two compiles, not nineteen.
    """
    from defi_jax import stage as stage_lib, trainer
    mesh = sharding.make_mesh(config.mesh, devices=list(devices))
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    per_block = report.get("per_block")

    def peak_at(batch: int) -> float:
        try:
            return _peak_at(batch)
        except jax.errors.JaxRuntimeError as e:  # the TPU compiler checks the program against the chip's HBM
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            return math.inf

    def _peak_at(batch: int) -> float:
        c = config.copy_and_resolve_references()
        c.train.batch_size = batch
        if per_block is None:
            _, memory = trainer.compile_train_step(c, mesh)
            return memory["peak_estimate"]
        _, memory, recorder = _stood_in_step(c, mesh)
        unit = list(recorder.units.values())[per_block["largest_unit_index"]]
        compiled = _compile_unit(unit, devices[0], stage_lib.jit_kwargs(c), _unit_backward(c))
        temp = trainer.memory_stats(compiled)["temp"]
        return memory["peak_estimate"] + temp

    result = search_max_batch(peak_at, report["batch_size"], report["memory"]["peak_estimate"],
                              (1 - headroom) * chip.hbm_bytes, step=shards, max_probes=max_probes, log=log)
    return result | {"headroom": headroom, "batch_shards": shards,
                     "max_batch_per_device": result["max_batch"] // shards}


def _bytes(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def _peak(n: float | None) -> str:
    return _bytes(n) if n is not None and math.isfinite(n) else "out of HBM (the compiler refused it)"


def _seconds(t: float) -> str:
    for unit, size in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if t >= size:
            return f"{t / size:.3g} {unit}"
    return f"{t / 1e-9:.3g} ns"


def format_report(report: dict) -> str:
    """The report as the lines ``launch.aot`` prints."""
    tpu = report["platform"] == "tpu"
    where = "TPU HBM" if tpu else "CPU memory of fake devices: XLA:CPU's numbers, not a TPU's"
    lines = [f"devices: {report['num_devices']} x {report['device_kind']} "
             f"({report['num_processes']} host{'s' if report['num_processes'] > 1 else ''}), "
             f"mesh " + " ".join(f"{k}={v}" for k, v in report["mesh"].items()),
             f"compiled in {report['compile_seconds']:.1f} s",
             f"per-device memory ({where}):"]
    for key in ("argument", "output", "alias", "temp", "generated_code", "peak_estimate"):
        if key in report["memory"]:
            lines.append(f"  {key}: {report['memory'][key]} B ({_bytes(report['memory'][key])})")
    if "hbm_fraction" in report:
        verdict = "fits" if report["fits_in_hbm"] else "DOES NOT FIT"
        lines.append(f"  peak vs HBM: {_bytes(report['memory']['peak_estimate'])} of "
                     f"{_bytes(report['hbm_bytes_per_device'])} ({100 * report['hbm_fraction']:.1f}%, {verdict})")
    flops = report["flops_per_step_per_device"]
    if flops is None:
        lines.append("FLOPs per step: not reported by this backend")
    else:
        lines.append(f"FLOPs per step: {flops:.4g} per device, {report['flops_per_step']:.4g} total")
    if "ideal_step_time_s" in report:
        ideal = report["ideal_step_time_s"]
        lines.append(f"ideal step time at {report['chip']} peak ({report['peak_flops_per_device'] / 1e12:.0f} "
                     f"TFLOP/s bf16): {_seconds(ideal['mfu_100'])} at 100% MFU, "
                     f"{_seconds(ideal['mfu_50'])} at 50% MFU")
    if "mfu" in report:
        lines.append(f"MFU at a step time of {_seconds(report['step_time_s'])}: {100 * report['mfu']:.3g}%")
    lines.append("collectives: " + ", ".join(f"{k}={v}" for k, v in report["collectives"].items()))
    if "per_block" in report:
        pb = report["per_block"]
        outer = pb["outer_memory"]
        lines.append(f"per-block: the step with its UNet units stood in: peak "
                     f"{_bytes(outer.get('peak_estimate', 0))} "
                     f"(argument {_bytes(outer.get('argument', 0))}, temp {_bytes(outer.get('temp', 0))}), compiled "
                     f"in {pb['outer_compile_seconds']:.1f} s; + the largest unit's temporaries:")
        for u in sorted(pb["units"], key=lambda u: -u["memory"].get("temp", 0)):
            flops = "?" if u["flops"] is None else f"{u['flops']:.3g}"
            lines.append(f"  {u['count']} x {u['name']}: temp {_bytes(u['memory'].get('temp', 0))}, "
                         f"FLOPs {flops} per call ({u['compile_seconds']:.1f} s)")
        if "whole" in report:
            w, err = report["whole"], pb["relative_error"]
            lines.append(f"whole step (compiled to check): peak {_bytes(w['memory'].get('peak_estimate', 0))}, "
                         f"FLOPs {w['flops_per_step_per_device'] or 0:.4g} per device; composed vs whole: "
                         + ", ".join(f"{k} {'?' if v is None else f'{100 * v:+.1f}%'}" for k, v in err.items()))
    return "\n".join(lines)


def format_max_batch(mb: dict) -> str:
    """The line ``launch.aot --max_batch`` prints for a :func:`max_batch_report`."""
    points = ", ".join(f"{b}: {_peak(p)}" for b, p in mb["points"])
    verdict = (f"{mb['first_over']} does not" if mb["proven"] else
               f"not bracketed after the probes ({mb['first_over'] or 'no batch'} over)")
    return (f"max batch with >= {100 * mb['headroom']:.4g}% HBM headroom (peak <= {_bytes(mb['limit_bytes'])}): "
            f"{mb['max_batch']} ({mb['max_batch_per_device']} per device) fits, {verdict}; peak by batch: {points}")
