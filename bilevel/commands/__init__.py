"""The commands: run, prune, unlearn, eval, ablate, export, attack (bilevel/cli.py parses, these do the work)."""
