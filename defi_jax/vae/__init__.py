"""The VAE stage: trains the GFDM's video autoencoder (diffusers' ``AutoencoderKLTemporalDecoder``) on clips."""
