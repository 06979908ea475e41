"""Test setup: 8 fake CPU devices (must be set before jax is imported), headless MuJoCo."""

import os

# (Unoptimized compiles for every test process were tried: the whole suite took the same time, BENCHMARKS.md.)
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("JAX_PLATFORMS", "cpu")   # libtpu may be installed (the tpu extra): never probe for a TPU here

# One XLA compilation cache for the whole run, shared by the xdist workers and every child process (they inherit
# this environment): tests build the same tiny models again and again (the tiny policy's init program alone
# compiles for ~40 s). It starts empty each run (a fresh temporary folder, removed at the end), so no test
# depends on an earlier run; a max size turns on the cache's file lock, so workers never read a half-written entry.
if "DEFI_JAX_TEST_XLA_CACHE" not in os.environ:
    import tempfile
    os.environ["DEFI_JAX_TEST_XLA_CACHE"] = tempfile.mkdtemp(prefix="defi_jax_test_xla_cache_")
    _OWN_XLA_CACHE = True   # this process made it (the xdist controller, or a run without xdist): it removes it
else:
    _OWN_XLA_CACHE = False
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ["DEFI_JAX_TEST_XLA_CACHE"])
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 * 2**30))


import gc  # noqa: E402

import pytest  # noqa: E402

# Tracing and lowering jax programs (most of this suite's CPU outside XLA) allocates millions of short-lived objects;
# Python's default thresholds then rescan every live object (jax's, flax's, torch's) in a full collection again and
# again (~15% of the ablation dry run's CPU). Collections stay, only rarer: a full one every ~40 M allocations.
gc.set_threshold(100_000, 20, 20)


class _LocalBucket:
    """Stands in for the object store: ``gs://B/P`` is ``ROOT/B/P``; counts the calls that reach it."""

    def __init__(self, root):
        self.root, self.calls = root, 0

    def _local(self, arg):
        if isinstance(arg, (str, os.PathLike)) and os.fspath(arg).startswith("gs://"):
            return os.path.join(self.root, os.fspath(arg)[len("gs://"):])
        return arg

    def __getattr__(self, name):
        from etils.epath import backend as epath_backend
        fn = getattr(epath_backend.os_backend, name)

        def call(*args, **kwargs):
            self.calls += 1
            return fn(*(self._local(a) for a in args), **kwargs)
        return call


@pytest.fixture
def gcs(tmp_path, monkeypatch):
    """gs:// backed by tmp_path/bucket; the working directory is an empty folder (nothing may land there)."""
    from etils.epath import gpath
    fake = _LocalBucket(str(tmp_path / "bucket"))
    real = gpath._GPath._backend
    monkeypatch.setattr(gpath._GPath, "_backend",
                        property(lambda self: fake if self._uri_scheme == "gs" else real.fget(self)))
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    yield fake
    assert os.listdir(tmp_path / "cwd") == [], "a gs:// path was written as a local path"


@pytest.fixture(scope="session")
def demo_data_dir(tmp_path_factory):
    """Small Meta-World demo data (3 robot tasks x 3 episodes + 1 human-video task x 3 videos, 64 px),
    generated once per test run: xdist's workers share one copy (~20 CPU-s), the first to ask generates it while
    the others wait on a lock. Use it as ``data_cfg.data_dir`` with ``data_cfg.mixture = "demo"`` (robot + human
    video) or ``"demo_robot"``; set ``data_cfg.resolution`` <= 64. Tests only read it."""
    import fcntl

    from data_pipelines import demo

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):   # xdist: each worker's basetemp is a folder of the run's own
        base = base.parent
    with open(base / "demo_data.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return demo.ensure_demo_data(str(base / "demo_data" / "demo"),
                                     tasks=("reach-v3", "push-v3", "button-press-v3"), human_tasks=("drawer-close-v3",),
                                     episodes=3, human_episodes=3, size=64)


import importlib  # noqa: E402

# Unoptimized CPU code compiles ~5x faster; tests compare runs compiled the same way, never timings.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
FAST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def fast_compile() -> dict:
    """``config.train.compiler_options`` (or ``.compile(...)`` options) for fast CPU compiles."""
    return dict(FAST_COMPILE)


@pytest.fixture(scope="session")
def subprocess_env():
    """``subprocess_env(devices=8, **extra)``: the environment of a Python child process: this checkout on
    ``PYTHONPATH``, CPU only, ``devices`` fake devices (0: XLA's default, one), fast compiles."""
    def make(devices: int = 8, **extra) -> dict:
        flags = (f"--xla_force_host_platform_device_count={devices} " if devices else "") + FAST_XLA_FLAGS
        return dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", XLA_FLAGS=flags, **extra)
    return make


@pytest.fixture(scope="session")
def tiny_config():
    """``tiny_config(stage="toy", fast=True, **train)``: ``configs/<stage>.py:tiny`` with no progress bar, the
    fast-compile options (``fast=False`` keeps the config's own) and ``config.train`` overrides."""
    def make(stage: str = "toy", *, fast: bool = True, **train):
        c = importlib.import_module(f"configs.{stage}").get_config("tiny")
        c.train.progress_bar = False
        if fast:
            c.train.compiler_options = dict(FAST_COMPILE)
        for k, v in train.items():
            c.train[k] = v
        return c
    return make


@pytest.fixture(scope="session")
def make_mesh():
    """``make_mesh((data, fsdp, tensor))``: a mesh over the first data x fsdp x tensor fake devices."""
    import jax
    import ml_collections
    import numpy as np

    from defi_jax import sharding

    def make(shape):
        n = int(np.prod(shape))
        return sharding.make_mesh(ml_collections.ConfigDict(dict(shape=tuple(shape))), devices=jax.devices()[:n])
    return make


@pytest.fixture(scope="session")
def one_device_mesh(make_mesh):
    return make_mesh((1, 1, 1))


@pytest.fixture(scope="session")
def eight_device_mesh(make_mesh):
    """fsdp over all 8 fake devices."""
    return make_mesh((1, 8, 1))


@pytest.fixture(scope="session")
def error_message():
    """``error_message(fn, *args, exc=Exception, **kwargs)``: the message of the ``exc`` that ``fn(*args,
    **kwargs)`` must raise (for assertions on several parts of one message)."""
    def message(fn, *args, exc=Exception, **kwargs) -> str:
        with pytest.raises(exc) as e:
            fn(*args, **kwargs)
        return str(e.value)
    return message


def pytest_unconfigure(config):
    if _OWN_XLA_CACHE:
        import shutil
        shutil.rmtree(os.environ["DEFI_JAX_TEST_XLA_CACHE"], ignore_errors=True)


@pytest.fixture
def count_compiles():
    """``with count_compiles() as n: ...``; ``n[0]`` is then the number of programs compiled inside: XLA backend
    compiles plus the run's compilation-cache hits (a program jax had to look up again: the same mistake)."""
    import contextlib

    import jax

    @contextlib.contextmanager
    def counting():
        n = [0]

        def on_duration(event: str, duration: float, **kwargs):
            if event == "/jax/core/compile/backend_compile_duration":
                n[0] += 1

        def on_event(event: str, **kwargs):
            if event == "/jax/compilation_cache/cache_hits":
                n[0] += 1

        jax.monitoring.register_event_duration_secs_listener(on_duration)
        jax.monitoring.register_event_listener(on_event)
        try:
            yield n
        finally:
            jax.monitoring.unregister_event_duration_listener(on_duration)
            jax.monitoring.unregister_event_listener(on_event)
    return counting


# ---------------------------------------------------------------------------------------------- scheduling
# The slowest tests of `make test`, with their seconds in a whole run (2 busy cores, fourteenth session): a whole
# file where the entry names one (its module fixtures are built once per worker that runs it).
SLOW = (
    ("tests/test_policy_stage.py", 340),                                # module fine-tune fixture + its users
    ("tests/test_gfdm_stage.py::test_tiny_training_run_learns_compiles_evaluation_once_and_writes_gif", 165),
    ("tests/test_policy_features.py", 110),                             # precompute subprocess + a short fit
    ("tests/test_gidm_stage.py::test_tiny_pretraining_on_demo_data", 86),
    ("tests/test_evaluate_metaworld.py::test_defi_policy_act_and_predict_acts_like_act_batch_and_decodes_the_features_step",
     77),
    ("tests/test_import_stages.py::test_policy_export_round_trip_is_bitwise", 69),
    ("tests/test_ablate.py::test_dry_run_one_step_of_every_variant", 43),
    ("tests/test_gfdm_quality.py::test_run_writes_json_csv_gif", 43),
    ("tests/test_export_torch.py", 42),                                 # module export fixture
    ("tests/test_packaging.py", 40),                                    # wheel + venv + two stages' steps
    ("tests/test_policy_import.py::test_import_writes_a_policy_workdir_that_serves_resumes_and_matches", 35),
    ("tests/test_import_stages.py::test_gfdm_from_a_diffusers_svd_folder_and_its_export_back", 28),
    ("tests/test_data_demo.py", 25),
    ("tests/test_sweep.py::test_two_value_sweep_writes_csv_and_png_and_resumes", 20),
    ("tests/test_gidm_stage.py::test_train_step_compiles_for_8_devices", 19),
)


def _slow_rank(nodeid: str) -> int:
    for rank, (prefix, _) in enumerate(SLOW):
        if nodeid == prefix or nodeid.startswith(prefix + "::") or nodeid.startswith(prefix + "["):
            return rank
    return len(SLOW)


def _first_chunks(slow: list[list], rest: list, workers: int, chunk: int) -> list:
    """xdist's ``--dist load`` hands worker k the k-th run of ``chunk`` tests first, then further tests in order
    as workers drain: the slow groups spread over those first chunks heaviest first, each to the chunk with the
    least work that has room (longest-processing-time scheduling), the rest filling up after them."""
    bins = [dict(items=[], work=0.0) for _ in range(workers)]
    left = []
    for rank, group in sorted(enumerate(slow), key=lambda rg: -SLOW[rg[0]][1]):
        if not group:
            continue
        fits = [b for b in bins if len(b["items"]) + len(group) <= chunk]
        if not fits:
            left.extend(group)
            continue
        b = min(fits, key=lambda b: b["work"])
        b["items"].extend(group)
        b["work"] += SLOW[rank][1]
    rest = left + rest
    out = []
    for b in bins:
        take = chunk - len(b["items"])
        out += b["items"] + rest[:take]
        rest = rest[take:]
    return out + rest


def pytest_collection_modifyitems(config, items):
    """Slow tests first, spread over the xdist workers' first chunks (a file's tests keep their order), so that
    the workers start them at once and finish together."""
    slow = [[] for _ in SLOW]
    rest = []
    for item in items:
        rank = _slow_rank(item.nodeid)
        (slow[rank] if rank < len(SLOW) else rest).append(item)
    workers = int(getattr(config, "workerinput", {}).get("workercount", 1))
    if workers > 1:   # xdist's LoadScheduling: first chunk = max(2, tests per worker // 4)
        items[:] = _first_chunks(slow, rest, workers, max(2, len(items) // workers // 4))
    else:
        items[:] = [i for group in slow for i in group] + rest
