"""World implementations (the tiny world, Stable Diffusion), model loading and world resolution."""
