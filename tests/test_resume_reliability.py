"""Resume after what users do between runs: another worker count, a damaged newest checkpoint, a changed config,
a rerun of a finished run."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from configs import gidm as gidm_configs
from configs import toy
from defi_jax import checkpoint, sharding, trainer

FAST = {"xla_backend_optimization_level": 0}


def _toy(**train):
    c = toy.get_config("tiny")
    c.train.compiler_options = FAST
    c.train.progress_bar = False
    for k, v in train.items():
        c.train[k] = v
    return c


def _mesh():
    return sharding.make_mesh(toy.get_config("tiny").mesh, devices=jax.devices()[:1])


def _ids(batch) -> list[tuple[int, int]]:
    return sorted(zip(np.asarray(batch["dataset_id"]).tolist(), np.asarray(batch["item_id"]).tolist()))


@pytest.mark.parametrize("before,after", [(0, 2), (2, 0)])
def test_data_position_survives_a_change_of_worker_count(demo_data_dir, before, after):
    import data_pipelines

    def loader(workers):
        d = gidm_configs.get_config("tiny").data
        d.data_dir, d.mixture, d.resolution, d.num_workers = demo_data_dir, "demo_robot", 32, workers
        return data_pipelines.make_loader("gidm_pair", d, global_batch_size=4, seed=5)

    ref = loader(0)
    first = loader(before)
    for _ in range(3):
        next(first)
    state = first.get_state()
    first.close()
    ref_next = [next(ref) for _ in range(5)][3:]          # what an uninterrupted run reads next (batches 4, 5)
    resumed = loader(after)
    resumed.set_state(state)                               # a KeyError ('next_index') before the re-seek
    got = [next(resumed) for _ in range(2)]
    resumed.close()
    assert sorted(_ids(got[0]) + _ids(got[1])) == sorted(_ids(ref_next[0]) + _ids(ref_next[1]))


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    workdir = str(tmp_path / "run")
    trainer.Trainer(_toy(num_steps=4, save_every=2), mesh=_mesh()).fit(workdir)
    step4 = Path(workdir) / "checkpoints" / "4"
    for f in (step4 / "params").rglob("*"):               # damage every data file of step 4's parameters
        if f.is_file() and f.stat().st_size > 0 and f.suffix != ".json":
            f.write_bytes(b"\0" * 7)
    with caplog.at_level("WARNING"):
        result = trainer.Trainer(_toy(num_steps=6, save_every=2), mesh=_mesh()).fit(workdir)
    assert result.step == 6
    text = caplog.text
    assert "checkpoints/4" in text and "newest readable checkpoint, step 2" in text and "damaged_checkpoints" in text, text[-2000:]


def test_config_history_is_kept_and_config_json_never_overwritten(tmp_path):
    workdir = tmp_path / "run"
    trainer.Trainer(_toy(num_steps=2, lr=0.003), mesh=_mesh()).fit(str(workdir))
    first = (workdir / "config.json").read_text()
    trainer.Trainer(_toy(num_steps=4, lr=0.001), mesh=_mesh()).fit(str(workdir))
    assert (workdir / "config.json").read_text() == first      # the config the run started with
    hist = sorted(p.name for p in (workdir / "config_history").iterdir())
    assert hist == ["0000.json", "0001.diff", "0001.json"], hist
    diff = (workdir / "config_history" / "0001.diff").read_text()
    assert '"lr": 0.003' in diff and '"lr": 0.001' in diff and '"num_steps": 4' in diff
    assert json.loads((workdir / "config_history" / "0001.json").read_text())["train"]["lr"] == 0.001


def test_rerunning_a_finished_run_does_nothing_and_a_longer_one_extends_it(tmp_path, capsys):
    workdir = tmp_path / "run"
    c = _toy(num_steps=3, log_every=1)
    first = trainer.Trainer(c, mesh=_mesh()).fit(str(workdir))
    rows = (workdir / "metrics.jsonl").read_text().splitlines()
    again = trainer.Trainer(c, mesh=_mesh()).fit(str(workdir))
    assert "already finished at step 3" in capsys.readouterr().out
    assert (workdir / "metrics.jsonl").read_text().splitlines() == rows     # no duplicate evaluation row
    assert again.step == 3 and again.metrics == json.loads(json.dumps(first.metrics))
    longer = trainer.Trainer(_toy(num_steps=5, log_every=1), mesh=_mesh()).fit(str(workdir))
    assert longer.step == 5 and checkpoint.Checkpointer(str(workdir), read_only=True).latest_step() == 5
