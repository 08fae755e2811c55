"""What is cached: the latent cache (float and quantised) and prompt-cache files."""
