"""Defaults every experiment starts from. Stage configs call ``get_base_config()`` and override."""

import ml_collections

from defi_jax import weights


def logical_axis_rules(strategy: str = "fsdp") -> tuple:
    """Logical axis -> mesh axes. ``fsdp`` shards weights over fsdp and tensor-parallel dims over tensor."""
    if strategy == "fsdp":
        return (
            ("batch", ("data", "fsdp")),
            ("embed", "fsdp"),
            ("mlp", "tensor"),
            ("heads", "tensor"),
            ("vocab", "tensor"),
            ("conv_in", "fsdp"),
            ("conv_out", "tensor"),
            ("norm", None),
            ("codebook", None),
        )
    if strategy == "replicated":
        return tuple((name, None) for name in
                     ("batch", "embed", "mlp", "heads", "vocab", "conv_in", "conv_out", "norm", "codebook"))
    raise ValueError(f"unknown sharding strategy {strategy!r}")


def get_base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.stage = ""
    c.seed = 0
    c.model = ml_collections.ConfigDict()
    c.data = ml_collections.ConfigDict()
    # Pretrained weights: config.init.sources.<name> = weights.source(target regex, kind, path, ...); see
    # defi_jax/weights.py. allow_random=True lets a frozen pretrained tower start random (tests, debugging).
    c.init = weights.init_config()

    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = (1, -1, 1)          # (data, fsdp, tensor) within a slice; one -1 is filled in
    c.mesh.dcn_shape = (1, 1, 1)       # across slices (multi-slice pods)
    c.sharding = ml_collections.ConfigDict()
    c.sharding.logical_axis_rules = logical_axis_rules("fsdp")

    t = c.train = ml_collections.ConfigDict()
    t.batch_size = 8                   # global
    t.num_steps = 100
    t.lr = 1e-4
    t.schedule = "warmup_cosine"       # warmup_cosine | tri_stage | constant
    t.warmup_steps = 10
    t.tri_stage = (0.02, 0.08, 0.90)   # warmup / hold / decay fractions
    t.tri_stage_init_scale = 0.01      # tri_stage: warmup starts at this x lr
    t.tri_stage_final_scale = 0.01     # tri_stage: cosine decay ends at this x lr
    t.end_lr_factor = 0.0
    t.b1 = 0.9
    t.b2 = 0.999
    t.eps = 1e-8                       # AdamW epsilon
    t.weight_decay = 0.0
    t.grad_clip = 1.0                  # global norm; 0 = off
    t.grad_accum_steps = 1
    t.param_dtype = "float32"          # master weights
    t.compute_dtype = "float32"        # bfloat16 for mixed precision
    t.remat_policy = "none"            # none | full | dots_saveable | ...
    t.ema_decay = 0.0                  # 0 = no EMA
    t.frozen = ()                      # regexes over parameter paths: no grads, no optimizer state
    t.max_nonfinite_steps = 10         # consecutive skipped updates before the run stops
    t.log_every = 10
    t.eval_every = 0                   # 0 = only at the end when the stage has an evaluator
    t.save_every = 100
    t.keep_checkpoints = 3
    t.progress_bar = True
    t.eval_ema = True                  # evaluate the EMA params when an EMA is kept
    t.async_checkpointing = True       # Orbax writes checkpoints in the background
    # XLA compiler options for every compile of the run, e.g. {"xla_backend_optimization_level": 0} (CPU tests).
    t.compiler_options = ml_collections.FieldReference(None, field_type=dict)
    return c
