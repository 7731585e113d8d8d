"""Model families: what the engine needs to know about one kind of diffusion model."""
