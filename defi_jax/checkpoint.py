"""Orbax checkpoints: train state, data-iterator state and config saved together in one step.

Layout: ``WORKDIR/checkpoints/<step>/{state, data, config}``. ``state`` is the train-state pytree (sharded
arrays, written by every process), ``data`` one JSON file per process with its iterator state, ``config``
the experiment config as JSON. Orbax writes each step into a temporary directory and renames it when
complete, so a save killed half-way never replaces (or is mistaken for) the last good checkpoint.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

_log = logging.getLogger(__name__)


class DataStateHandler(ocp.CheckpointHandler):
    """One JSON file per process holding its data iterator's ``get_state()`` (dict or bytes)."""

    def _file(self, directory: epath.Path) -> epath.Path:
        return directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"

    def save(self, directory: epath.Path, args: "DataStateSave"):
        state = args.state
        payload = ({"bytes": base64.b64encode(state).decode()} if isinstance(state, bytes)
                   else {"json": state})
        directory.mkdir(parents=True, exist_ok=True)
        self._file(directory).write_text(json.dumps(payload))

    def restore(self, directory: epath.Path, args: "DataStateRestore" = None):
        path = self._file(directory)
        if not path.exists():
            raise FileNotFoundError(
                f"{path}: no data-iterator state for this process; was the checkpoint written with a "
                f"different process count? (restore the model only, or keep the process count)")
        payload = json.loads(path.read_text())
        return base64.b64decode(payload["bytes"]) if "bytes" in payload else payload["json"]

    def metadata(self, directory):
        return None

    def structure(self, directory):
        return None

    def finalize(self, directory):
        pass

    def close(self):
        pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    state: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    pass


class Checkpointer:
    """Keep-N, asynchronous checkpoints of one run under ``workdir/checkpoints``."""

    def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
        self.directory = epath.Path(workdir) / "checkpoints"
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: Any, config_json: str) -> bool:
        """Starts saving; returns once arrays are copied off the devices (writing continues async)."""
        items = dict(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(json.loads(config_json)))
        if data_state is not None:
            items["data"] = DataStateSave(data_state)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, abstract_state: Any, *, data: bool = True) -> tuple[Any, Any]:
        """Restores ``state`` onto the shardings in ``abstract_state`` (any mesh / device count)."""
        items = dict(state=ocp.args.StandardRestore(abstract_state))
        has_data = (self.directory / str(step) / "data").exists()
        if data and has_data:
            items["data"] = DataStateRestore()
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        return out["state"], (out["data"] if data and has_data else None)

    def restore_config(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
