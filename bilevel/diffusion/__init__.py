"""Diffusion primitives: noise and targets, sampling, prompt banks and mappings, feature taps, the KD objective."""
