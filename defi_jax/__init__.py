"""defi-jax: DeFI (separate forward and inverse dynamics pretraining) in JAX / Flax NNX."""

try:
    import flax
except ImportError:   # an exported policy (defi_jax.inference.load_exported) runs with jax + numpy only
    flax = None
else:
    # Parameters carry logical axis names as metadata; the trainer turns them into shardings for the
    # configured mesh. Flax must not try to shard eagerly at construction (no mesh exists yet then).
    flax.config.update("flax_always_shard_variable", False)

__version__ = "0.1.0"
