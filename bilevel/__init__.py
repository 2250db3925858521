"""bilevel: prune a text-to-image diffusion UNet and keep unwanted concepts out of it in one training phase."""

__version__ = "0.1.0"
#: Plugins declare the API major version they were written for; a different major is refused.
PLUGIN_API_VERSION = 1
#: Saved run configs carry this; a config from a newer major version is refused.
CONFIG_VERSION = 1
