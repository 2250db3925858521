"""Real Stable Diffusion (latent space): loading pipelines, fine-tuning/concept data, the SDWorld a run trains in,
and its evaluation."""
