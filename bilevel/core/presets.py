"""Named run presets: RunConfig YAML files shipped in `bilevel/presets/`, the bottom layer of `bilevel run`'s config.

A preset is nothing but a RunConfig file, so it can also be copied and passed to `--config`. Its name is the file
stem; its one-line description and revision live in a leading comment header (`# description: ...`,
`# revision: N`), which keeps the file a plain RunConfig (extra keys are refused) while `bilevel presets` can list it.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from importlib import resources
from importlib.abc import Traversable
from typing import Any

import yaml

from bilevel.core.config import build_config
from bilevel.core.errors import BilevelError

#: Where the shipped presets live (package data; a module attribute so tests can point it elsewhere).
PRESET_ROOT: Traversable = resources.files("bilevel") / "presets"
SUFFIX = ".yaml"
PLUGIN_SECTIONS = ("pruner", "unlearner", "solver", "world")
_HEADER = re.compile(r"#\s*([a-z_-]+)\s*:\s*(.*\S)\s*$")


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    revision: int
    text: str

    def data(self) -> dict[str, Any]:
        """The RunConfig mapping (the comment header is YAML comments, so it is simply not part of it)."""
        try:
            data = yaml.safe_load(self.text) or {}
        except yaml.YAMLError as exc:
            raise BilevelError(f"preset {self.name!r} is not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise BilevelError(f"preset {self.name!r} must hold a mapping at the top level")
        return data


def read_header(text: str) -> dict[str, str]:
    """`# key: value` lines before the first non-comment line."""
    header: dict[str, str] = {}
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        match = _HEADER.match(line)
        if match:
            header[match.group(1)] = match.group(2)
    return header


def _parse(name: str, text: str) -> Preset:
    header = read_header(text)
    if "description" not in header:
        raise BilevelError(f"preset {name!r} has no '# description: ...' line in its header")
    try:
        revision = int(header.get("revision", "1"))
    except ValueError:
        raise BilevelError(f"preset {name!r}: revision must be an integer (got {header['revision']!r})") from None
    return Preset(name=name, description=header["description"], revision=revision, text=text)


def available() -> dict[str, Preset]:
    """Every shipped preset by name, sorted."""
    found = sorted(
        (entry for entry in PRESET_ROOT.iterdir() if entry.is_file() and entry.name.endswith(SUFFIX)),
        key=lambda entry: entry.name,
    )
    return {e.name.removesuffix(SUFFIX): _parse(e.name.removesuffix(SUFFIX), e.read_text()) for e in found}


def get_preset(name: str) -> Preset:
    presets = available()
    if name not in presets:
        raise BilevelError(f"unknown preset {name!r}; available: {', '.join(presets) or 'none'}")
    return presets[name]


def load_preset(name: str) -> dict[str, Any]:
    """The preset's RunConfig mapping, validated on its own so a broken preset is named as the culprit."""
    preset = get_preset(name)
    data = preset.data()
    try:
        build_config(copy.deepcopy(data))
    except BilevelError as exc:
        raise BilevelError(f"preset {name!r}: {exc}") from None
    return data


def layer(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """`top` over `base` (a new dict): sections merge key by key, anything else in `top` replaces. A plugin section
    (pruner, unlearner, solver, world) whose name `top` changes starts from `top` alone: the base's options belong to
    another plugin."""
    out = copy.deepcopy(base)
    for key in PLUGIN_SECTIONS:
        old, new = out.get(key), top.get(key)
        if isinstance(old, dict) and isinstance(new, dict) and new.get("name", old.get("name")) != old.get("name"):
            del out[key]
    return _merge(out, top)


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    for key, value in top.items():
        old = base.get(key)
        base[key] = _merge(old, value) if isinstance(old, dict) and isinstance(value, dict) else copy.deepcopy(value)
    return base
