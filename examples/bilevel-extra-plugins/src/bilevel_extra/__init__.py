"""Example third-party plugins for bilevel: the `uce` unlearner and the `random` channel pruner."""

__version__ = "0.1.0"
