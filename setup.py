from setuptools import find_packages, setup

setup(
    name="defi-jax",
    version="0.1.0",
    description="DeFI (separate forward and inverse dynamics pretraining) in JAX / Flax NNX, at TPU-pod scale",
    packages=find_packages(include=["defi_jax*", "data_pipelines*", "launch*", "configs*", "defi_jax_torch*"]),
    package_data={"defi_jax": ["assets/*", "assets/**/*"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10,<0.11",
        "flax>=0.12,<0.13",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.12",
        "tensorflow-datasets>=4.9.9",
        "ml-collections>=1.0",
        "einops>=0.8",
        "chex>=0.1.90",
        "array-record>=0.7",
        "safetensors>=0.4",
        "av>=14",
        "pyarrow>=14",                 # data_pipelines.lerobot: LeRobot datasets' parquet files
        "absl-py>=2.1",
        "tqdm>=4.66",
        "tensorboardX>=2.6",
        "numpy>=1.26",
        "pillow>=10",
        "websockets>=13",              # launch.serve: openpi's websocket + msgpack policy protocol
        "msgpack>=1.0",
    ],
    extras_require={
        # Parity tests use the real reference libraries on random weights; TFRecord RLDS needs TensorFlow.
        "dev": ["pytest>=8", "pytest-xdist>=3.5", "torch==2.13.0", "diffusers>=0.35", "transformers>=4.50", "sentencepiece",
                "tensorflow-cpu>=2.18"],
        "torch": ["torch>=2.4", "safetensors>=0.4", "diffusers>=0.35", "transformers>=4.50"],   # defi_jax_torch
        "sim": ["metaworld>=3.0", "mujoco>=3.2"],
        "tensorboard": ["tensorboard>=2.16"],   # the viewer for WORKDIR/tensorboard (the trainer writes with tensorboardX)
        "tpu": ["jax[tpu]>=0.10,<0.11"],  # libtpu at the version jax pins (TPU VMs; launch.aot --topology)
    },
)
