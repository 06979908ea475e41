"""Test setup: 8 fake CPU devices (must be set before jax is imported), headless MuJoCo."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("JAX_PLATFORMS", "cpu")   # libtpu may be installed (the tpu extra): never probe for a TPU here


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def demo_data_dir(tmp_path_factory):
    """Small Meta-World demo data (3 robot tasks x 3 episodes + 1 human-video task x 3 videos, 64 px),
    generated once per test session. Use it as ``data_cfg.data_dir`` with ``data_cfg.mixture = "demo"``
    (robot + human video) or ``"demo_robot"``; set ``data_cfg.resolution`` <= 64."""
    from data_pipelines import demo

    root = tmp_path_factory.mktemp("demo_data") / "demo"
    return demo.ensure_demo_data(str(root), tasks=("reach-v3", "push-v3", "button-press-v3"),
                                 human_tasks=("drawer-close-v3",), episodes=3, human_episodes=3, size=64)
