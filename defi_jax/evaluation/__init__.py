"""Closed-loop evaluation of a policy in simulation.

    from defi_jax.evaluation import metaworld
    summary = metaworld.evaluate(policy, metaworld.Protocol(tasks=("reach-v3",), episodes=50), "/tmp/eval")

``policy`` is anything with the interface of :class:`defi_jax.inference.DeFIPolicy` (``views``, ``resolution``,
``act_batch``): a checkpoint, an exported artifact, or a stand-in.
"""
