"""Multi-host start-up: ``jax.distributed.initialize()`` on a pod or when coordinator variables are set.

Environment variables (for clusters where JAX cannot discover the topology by itself, e.g. several CPU or
GPU hosts; on Cloud TPU pods nothing needs to be set):

  JAX_COORDINATOR_ADDRESS   host:port of process 0's coordinator (e.g. 10.0.0.1:1234)
  JAX_NUM_PROCESSES         number of processes in the job
  JAX_PROCESS_ID            this process's index, 0 .. JAX_NUM_PROCESSES-1
  JAX_LOCAL_DEVICE_IDS      optional, comma-separated local device ids this process owns

Call :func:`initialize` before anything touches ``jax.devices()``.
"""

from __future__ import annotations

import logging
import os

import jax

_log = logging.getLogger(__name__)
_initialized = False


def _on_tpu_pod() -> bool:
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return len([h for h in hosts.split(",") if h]) > 1 or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ


def initialize() -> bool:
    """Initializes the JAX distributed runtime when running multi-process; returns whether it did."""
    global _initialized
    if _initialized:
        return True
    addr = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if addr:
        kwargs = dict(coordinator_address=addr, num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                      process_id=int(os.environ["JAX_PROCESS_ID"]))
        if os.environ.get("JAX_LOCAL_DEVICE_IDS"):
            kwargs["local_device_ids"] = [int(i) for i in os.environ["JAX_LOCAL_DEVICE_IDS"].split(",")]
        if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS") == "cpu":
            # Cross-process collectives on CPU need an explicit implementation.
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(**kwargs)
    elif _on_tpu_pod():
        jax.distributed.initialize()
    else:
        return False
    _initialized = True
    _log.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
              jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


def is_primary() -> bool:
    """Only process 0 writes logs, metrics and summaries."""
    return jax.process_index() == 0


def sync(name: str) -> None:
    """A barrier across processes (no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)
