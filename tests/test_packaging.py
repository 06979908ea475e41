"""A built wheel holds every module, and the stages run from that install (not from the source tree).

The editable install of ``make test`` hides a package missing from the wheel (a folder without
``__init__.py`` is skipped by ``find_packages``); this test builds the wheel, installs it with ``--no-deps``
into a fresh virtual environment that sees the test venv's dependencies but not its editable finder, and
runs from a folder outside the checkout.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _source_modules() -> set[str]:
    out = set()
    for top in ("defi_jax", "defi_jax_torch", "data_pipelines", "launch", "configs"):
        for path in (REPO / top).rglob("*.py"):
            if "__pycache__" not in path.parts:
                out.add(path.relative_to(REPO).as_posix())
    return out


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    shutil.rmtree(REPO / "build", ignore_errors=True)   # setuptools' staging copy may hold deleted modules
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp / "dist"), str(REPO)], check=True, cwd=tmp)
    wheel = next((tmp / "dist").glob("defi_jax-*.whl"))
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)   # the test venv's
    py = venv / "bin" / "python"                                                               # pip installs
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    # The test venv's packages as a plain path entry: its .pth files (the editable finder) are not run.
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True)
    return wheel, py


def test_wheel_contains_every_module(wheel_venv):
    wheel, _ = wheel_venv
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(_source_modules() - names)
    assert not missing, f"modules missing from the wheel: {missing}"


def test_stages_run_from_the_installed_wheel(wheel_venv, tmp_path, demo_data_dir, subprocess_env):
    """Every library module imports from the wheel, and two stages train through it (the toy; the GIDM on the
    demo data): the trainer, data pipelines and checkpoints from the install, outside the checkout. (The GFDM's
    training, ~60 s of compiles, adds no file the GIDM's run does not load: the wheel carries no data files.)"""
    _, py = wheel_venv
    env = subprocess_env(devices=0)   # one CPU device, fast compiles
    env["PYTHONPATH"] = ""            # not this checkout: the installed wheel
    code = r"""
import os, sys
import configs, defi_jax, data_pipelines, launch
for mod in (configs, defi_jax, data_pipelines, launch):
    assert "site-packages" in mod.__file__, mod.__file__
import importlib, pkgutil
# Every library module imports from the install (launch/ entry points each define absl flags: one per process).
for pkg in (configs, defi_jax, data_pipelines):
    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        importlib.import_module(m.name)
from defi_jax import trainer
from configs import toy, gidm
c = toy.get_config("tiny"); c.train.num_steps = 2; c.train.progress_bar = False
assert trainer.train(c, os.path.abspath("toy")).step == 2
c = gidm.get_config("tiny"); c.train.num_steps = 2; c.train.batch_size = 4; c.train.progress_bar = False
c.data.data_dir = sys.argv[1]; c.data.mixture = "demo_robot"; c.eval.batches = 1
assert trainer.train(c, os.path.abspath("gidm")).step == 2
print("ok")
"""
    out = subprocess.run([str(py), "-c", code, demo_data_dir], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout[-2000:] + out.stderr[-4000:]
