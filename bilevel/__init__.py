"""bilevel: prune a text-to-image diffusion UNet and keep unwanted concepts out of it in one training phase."""

__version__ = "0.1.0"
#: Plugins declare the API major version they were written for; a different major is refused.
#: 2: Unlearner.draw/loss(ctx, batch) (was loss(ctx, batch_size, generator)), SolverConfig.coupling, PluginConfig,
#: api_version required on every plugin class.
PLUGIN_API_VERSION = 2
#: Saved run configs carry this; a config from a newer major version is refused.
CONFIG_VERSION = 1


def load_pipeline(folder, device: str = "cpu"):
    """Load a pipeline folder written by `bilevel export` (channel-pruned students included); see bilevel.export."""
    from .export import load_pipeline as _load

    return _load(folder, device)
