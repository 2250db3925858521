"""Run configuration: pydantic models (extra fields forbidden), loaded from YAML/TOML, overridable from the CLI.

Plugin options stay a plain dict here and are validated against the chosen plugin's own `Config` when the
run resolves them, so third-party plugins bring their own options without touching this file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import tomllib
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .. import CONFIG_VERSION
from .errors import BilevelError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PluginChoice(Section):
    name: str
    options: dict[str, Any] = Field(default_factory=dict, description="validated by the plugin's own Config")


class PrunerChoice(PluginChoice):
    name: str = "bk-sdm"


class UnlearnerChoice(PluginChoice):
    name: str = "esd"


class SolverChoice(PluginChoice):
    name: str = "alternating"


class ModelConfig(Section):
    """Which teacher: 'tiny' (the shipped tiny-world teacher) or a local diffusers pipeline folder."""

    source: str = "tiny"
    trust_remote_code: bool = False
    device: str = "cpu"


class DataConfig(Section):
    seed: int = 0
    finetune_size: int = Field(4096, gt=0, description="clean (concept-free) images for the lower level")
    concept_size: int = Field(512, gt=0, description="concept images (used when an unlearner noises real images)")


class LossWeights(Section):
    """Lower-level KD loss weights (paper's released code: 1 / 2 / 0.1)."""

    task: float = Field(1.0, ge=0)
    output: float = Field(2.0, ge=0)
    feature: float = Field(0.1, ge=0)


class TrainingConfig(Section):
    steps: int = Field(600, gt=0)
    batch_size: int = Field(32, gt=0)
    upper_batch_size: int = Field(16, gt=0)
    lower_lr: float = Field(1e-3, gt=0)
    upper_lr: float = Field(
        5e-4, gt=0, description="tiny world: 0.5x the lower lr (the paper's 5x with k=10 erased every colour here)"
    )
    warmup: int = Field(25, ge=0)
    weights: LossWeights = Field(default_factory=LossWeights)
    seed: int = 0
    checkpoint_every: int = Field(0, ge=0, description="0 = only at the end")
    log_every: int = Field(50, gt=0)


class EvalConfig(Section):
    samples_per_prompt: int = Field(32, gt=0, description="samples per colour group")
    steps: int = Field(25, gt=0, description="DDIM steps")
    guidance: float = Field(2.0, ge=0)
    seed: int = 1234
    latency_repeats: int = Field(10, gt=0)


Arm = Literal["teacher", "pruned", "ddpm", "kd", "bilevel", "two-stage"]


class OutputConfig(Section):
    dir: Path | None = None
    overwrite: bool = False


class RunConfig(Section):
    """Everything one `bilevel run` needs; saved as config.json in the output folder."""

    version: int = CONFIG_VERSION
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    concepts: list[str] = Field(default_factory=lambda: ["purple"])
    pruner: PrunerChoice = Field(default_factory=PrunerChoice)
    unlearner: UnlearnerChoice = Field(default_factory=UnlearnerChoice)
    solver: SolverChoice = Field(default_factory=SolverChoice)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    evaluation: EvalConfig = Field(default_factory=EvalConfig)
    arms: list[Arm] = Field(default_factory=lambda: ["teacher", "pruned", "ddpm", "kd", "bilevel"])
    output: OutputConfig = Field(default_factory=OutputConfig)

    @field_validator("version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v > CONFIG_VERSION:
            raise ValueError(f"config version {v} is newer than this bilevel supports ({CONFIG_VERSION}); upgrade bilevel")
        return v

    @field_validator("concepts")
    @classmethod
    def _non_empty(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one concept is needed")
        for c in v:
            if not c or not c.strip():
                raise ValueError("empty concept name")
        return [c.strip() for c in v]


def validation_message(exc: ValidationError, prefix: str = "config") -> str:
    """One line naming the field, the problem and the value given."""
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    got = err.get("input")
    shown = f" (got {got!r})" if not isinstance(got, dict) and err["type"] != "missing" else ""
    return f"invalid {prefix} value at {where}: {msg}{shown}"


def read_config_file(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise BilevelError(f"config file not found: {path}")
    text = path.read_text()
    try:
        if path.suffix in {".yaml", ".yml"}:
            data = yaml.safe_load(text) or {}
        elif path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise BilevelError(f"unsupported config file type {path.suffix!r}; accepted: .yaml, .yml, .toml, .json")
    except (yaml.YAMLError, tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise BilevelError(f"cannot parse config file {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise BilevelError(f"config file {path} must hold a mapping at the top level")
    return data


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply 'a.b.c=value' (value parsed as YAML, so 3, 1e-4, true, [a, b] work) to a nested dict."""
    if "=" not in assignment:
        raise BilevelError(f"override {assignment!r} must look like key.path=value")
    key, raw = assignment.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError:
        value = raw
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise BilevelError(f"override {assignment!r}: {part!r} is not a section")
    node[parts[-1]] = value


def build_config(data: dict[str, Any]) -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise BilevelError(validation_message(exc)) from None
