"""GIDM (stage 2): the latent action model, its VQ bottleneck and its pretraining stage."""
