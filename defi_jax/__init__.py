"""defi-jax: DeFI (separate forward and inverse dynamics pretraining) in JAX / Flax NNX."""

import os as _os
import sys as _sys

# Parameters carry logical axis names as metadata; the trainer turns them into shardings for the configured mesh.
# Flax must not try to shard eagerly at construction (no mesh exists yet then). Set without importing flax: processes
# that never build a model (Meta-World workers, an exported policy with jax + numpy only) skip its import.
if "flax" in _sys.modules:
    _sys.modules["flax"].config.update("flax_always_shard_variable", False)
else:
    _os.environ["FLAX_ALWAYS_SHARD_VARIABLE"] = "false"   # flax reads it when first imported

__version__ = "0.1.0"
