"""The `bilevel` command line. Heavy libraries are imported inside commands so --help and `plugins` stay fast."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from . import __version__
from .core.errors import BilevelError


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad input as one line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise BilevelError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="bilevel", description="Prune a diffusion UNet and suppress concepts in one bilevel phase.")
    parser.add_argument("--version", action="version", version=f"bilevel {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="prune, fine-tune bilevel (with baselines), evaluate, report")
    run.add_argument("--config", type=Path, help="YAML/TOML/JSON run config; flags override it")
    run.add_argument("--model", help="teacher: 'tiny' (shipped), a local diffusers pipeline folder (tiny or Stable "
                     "Diffusion) or a hub id of a Stable Diffusion pipeline")
    run.add_argument("--trust-remote-code", action="store_true", default=None,
                     help="allow a pipeline whose model_index.json names custom code (off by default)")  # fmt: skip
    run.add_argument("--pruner", help="pruner plugin name (see `bilevel plugins`)")
    run.add_argument("--unlearner", help="unlearner plugin name")
    run.add_argument("--solver", help="bilevel solver plugin name")
    run.add_argument("--concept", action="append", help="concept to suppress (repeatable); tiny world: a colour")
    run.add_argument("--steps", type=int, help="outer training steps per trained arm")
    run.add_argument("--arms", help="comma-separated arms: teacher,pruned,ddpm,kd,bilevel,two-stage")
    run.add_argument("--schedule", choices=["bilevel", "two-stage", "both"],
                     help="bilevel (default arms), two-stage (fine-tune then erase, same step counts) or both")  # fmt: skip
    run.add_argument("--out", type=Path, help="output folder (default runs/run-<time>)")
    run.add_argument("--overwrite", action="store_true", help="reuse an output folder that holds another run")
    run.add_argument("--resume", action="store_true",
                     help="continue the interrupted run in --out with its saved config.json (no other flags allowed)")  # fmt: skip
    run.add_argument("--device", help="torch device, e.g. cpu or cuda")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override any config value, e.g. --set training.upper_lr=1e-3 --set pruner.options.ratio=0.4")  # fmt: skip

    ab = sub.add_parser("ablate", help="a grid of runs (pruners x unlearners x solvers x seeds + baselines) and its report")
    ab.add_argument("--config", type=Path, help="YAML/TOML/JSON grid file; flags override it")
    ab.add_argument("--pruners", help="comma-separated pruner names (default: every built-in)")
    ab.add_argument("--unlearners", help="comma-separated unlearner names (default: every built-in)")
    ab.add_argument("--solvers", help="comma-separated solver names (default: alternating)")
    ab.add_argument("--seeds", help="comma-separated training seeds (default: 0)")
    ab.add_argument("--baselines", help="comma-separated: teacher,pruned,ddpm,kd,two-stage (default: all but ddpm)")
    ab.add_argument("--quick", action="store_true", help="bk-sdm x esd,concept-ablation, 300 steps: a few minutes")
    ab.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="run-config override for every cell, e.g. training.steps=300 (repeatable)")  # fmt: skip
    ab.add_argument("--out", type=Path, help="grid folder (default runs/ablation, or runs/ablation-quick)")
    ab.add_argument("--overwrite", action="store_true", help="replace a different grid in --out")
    ab.add_argument("--report-only", action="store_true", help="rewrite the report from finished cells; run nothing")
    ab.add_argument("--check-html", action="store_true",
                    help="render report.html in headless Chromium (writes report.png) and fail if it is broken")  # fmt: skip

    ev = sub.add_parser("eval", help="evaluate a model on the tiny world")
    ev.add_argument("model", help="'tiny', a pipeline folder, or a student folder written by bilevel")
    ev.add_argument("--concept", action="append", help="concept(s) to measure (default purple)")
    ev.add_argument("--samples", type=int, default=64, help="samples per colour group")
    ev.add_argument("--steps", type=int, default=25, help="DDIM steps")
    ev.add_argument("--guidance", type=float, default=2.0)
    ev.add_argument("--seed", type=int, default=1234)
    ev.add_argument("--out", type=Path, help="folder for report.json and grid.png")

    prune = sub.add_parser("prune", help="prune a teacher and write the student (compression only)")
    prune.add_argument("--model", default="tiny", help="teacher: 'tiny' or a local diffusers pipeline folder")
    prune.add_argument("--pruner", default="magnitude", help="pruner plugin name")
    prune.add_argument("--set", dest="options", action="append", default=[], metavar="KEY=VALUE",
                       help="pruner option, e.g. --set ratio=0.4 or --set variant=tiny")  # fmt: skip
    prune.add_argument("--out", type=Path, required=True, help="folder for the student")
    prune.add_argument("--overwrite", action="store_true", help="replace a student already in --out")
    prune.add_argument("--device", default="cpu")

    unlearn = sub.add_parser("unlearn", help="erase concept(s) from a model folder with one unlearner (standalone)")
    unlearn.add_argument("model", help="'tiny', a pipeline folder, or a student folder written by bilevel")
    unlearn.add_argument("--unlearner", default="esd", help="unlearner plugin name")
    unlearn.add_argument("--concept", action="append", help="concept to erase (repeatable; default purple)")
    unlearn.add_argument("--steps", type=int, help="default: the unlearner's measured recommendation (200)")
    unlearn.add_argument("--lr", type=float, help="default: the unlearner's measured recommendation (3e-4)")
    unlearn.add_argument("--batch-size", type=int, default=16)
    unlearn.add_argument("--seed", type=int, default=0)
    unlearn.add_argument("--set", dest="options", action="append", default=[], metavar="KEY=VALUE",
                         help="unlearner option, e.g. --set variant=full")  # fmt: skip
    unlearn.add_argument("--out", type=Path, required=True, help="folder for the erased model")
    unlearn.add_argument("--device", default="cpu")

    teacher = sub.add_parser("teacher", help="the tiny-world teacher")
    tsub = teacher.add_subparsers(dest="teacher_command", required=True, parser_class=_Parser)
    train = tsub.add_parser("train", help="train the tiny teacher (resumable)")
    train.add_argument("--out", type=Path, default=Path("runs/tiny-teacher"))
    train.add_argument("--steps", type=int, default=None)
    train.add_argument("--seed", type=int, default=None)
    train.add_argument("--no-resume", action="store_true", help="start over even if a checkpoint exists")

    plugins = sub.add_parser("plugins", help="list registered plugins")
    plugins.add_argument("--json", action="store_true", help="machine-readable listing")
    plugins.add_argument("--schema", metavar="NAME", help="JSON schema of one plugin's config")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except BilevelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


# ------------------------------------------------------------------------------------------------ commands
def cmd_run(args: argparse.Namespace) -> int:
    from .core.config import apply_override, build_config, read_config_file

    if args.resume:
        return _resume_run(args)
    data: dict[str, Any] = read_config_file(args.config) if args.config else {}
    flag_overrides = {
        "model.source": args.model,
        "model.device": args.device,
        "model.trust_remote_code": args.trust_remote_code,
        "pruner.name": args.pruner,
        "unlearner.name": args.unlearner,
        "solver.name": args.solver,
        "training.steps": args.steps,
        "output.dir": str(args.out) if args.out else None,
    }
    for key, value in flag_overrides.items():
        if value is not None:
            section, field = key.split(".")
            data.setdefault(section, {})[field] = value
    if args.concept:
        data["concepts"] = args.concept
    if args.arms:
        data["arms"] = [a.strip() for a in args.arms.split(",") if a.strip()]
    if args.schedule:
        base = data.get("arms") or ["teacher", "pruned", "ddpm", "kd", "bilevel"]
        base = [a for a in base if a not in ("bilevel", "two-stage")]
        data["arms"] = base + {"bilevel": ["bilevel"], "two-stage": ["two-stage"], "both": ["bilevel", "two-stage"]}[args.schedule]
    if args.overwrite:
        data.setdefault("output", {})["overwrite"] = True
    for assignment in args.overrides:
        apply_override(data, assignment)
    config = build_config(data)
    from .core.runner import run

    run(config)
    return 0


#: `run` flags that would change a run; --resume refuses them rather than continue a different run than was started.
_RUN_FLAGS = (
    "config", "model", "pruner", "unlearner", "solver", "concept", "steps", "arms", "schedule", "overwrite", "device",
    "trust_remote_code", "overrides",
)  # fmt: skip


def _resume_run(args: argparse.Namespace) -> int:
    """`run --resume --out DIR`: the config comes from DIR/config.json alone."""
    if args.out is None:
        raise BilevelError("--resume needs --out: the folder of the run to continue")
    given = [f"--{'set' if name == 'overrides' else name.replace('_', '-')}" for name in _RUN_FLAGS if getattr(args, name)]
    if given:
        saved = args.out / "config.json"
        raise BilevelError(
            f"--resume continues the run saved in {saved} unchanged; drop {', '.join(given)} (accepted with it: --out)"
        )
    from .core.runner import load_saved_config, run

    run(load_saved_config(args.out), resume=True)
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    from .core.ablation.commands import ablate

    return ablate(args)


def cmd_eval(args: argparse.Namespace) -> int:
    from .core.evaluate_cli import evaluate_model

    evaluate_model(args.model, args.concept or ["purple"], args.samples, args.steps, args.guidance, args.seed, args.out)
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from .core.config import apply_override
    from .core.prune_command import prune_to_folder

    options: dict[str, Any] = {}
    for assignment in args.options:
        apply_override(options, assignment)
    prune_to_folder(args.model, args.pruner, options, args.out, device=args.device, overwrite=args.overwrite)
    return 0


def cmd_unlearn(args: argparse.Namespace) -> int:
    from .core.config import apply_override
    from .core.unlearn_command import RECOMMENDED, unlearn_model

    recommended = RECOMMENDED.get(args.unlearner)
    options: dict[str, Any] = dict(recommended.options) if recommended and not args.options else {}
    for assignment in args.options:
        apply_override(options, assignment)
    steps = args.steps or (recommended.steps if recommended else 200)
    lr = args.lr or (recommended.lr if recommended else 3e-4)
    unlearn_model(
        args.model, args.unlearner, options, args.concept or ["purple"], steps, lr, args.out,
        batch_size=args.batch_size, seed=args.seed, device=args.device,
    )  # fmt: skip
    return 0


def cmd_teacher(args: argparse.Namespace) -> int:
    from .core.tinyworld.teacher_training import TeacherTrainConfig, train_teacher

    options = {k: v for k, v in {"steps": args.steps, "seed": args.seed}.items() if v is not None}
    config = TeacherTrainConfig(**options)
    train_teacher(config, args.out, resume=not args.no_resume)
    print(f"teacher pipeline written to {args.out / 'pipeline'}")
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from .registry import get_registry

    reg = get_registry()
    if args.schema:
        matches = [info for kind in reg.plugins for info in reg.plugins[kind].values() if info.name == args.schema]
        if not matches:
            every = sorted({n for kind in reg.plugins for n in reg.plugins[kind]})
            raise BilevelError(f"unknown plugin {args.schema!r}; available: {', '.join(every)}")
        schemas = {f"{i.kind}:{i.name}": i.cls.Config.model_json_schema() for i in matches}
        print(json.dumps(next(iter(schemas.values())) if len(schemas) == 1 else schemas, indent=2))
        return 0
    listing = [
        {
            "kind": info.kind,
            "name": info.name,
            "source": info.source,
            "version": info.version,
            "description": info.cls.description,
            "options": info.config_fields(),
        }
        for kind in reg.plugins
        for info in sorted(reg.plugins[kind].values(), key=lambda i: i.name)
    ]
    failures = [{"source": f.source, "error": f.error} for f in reg.failures]
    conflicts = [{"kind": k, "name": n, "claimed_by": owners} for (k, n), owners in reg.conflicts.items()]
    if args.json:
        print(json.dumps({"plugins": listing, "failures": failures, "conflicts": conflicts}, indent=2, default=str))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="bilevel plugins")
    for col in ("kind", "name", "source", "options"):
        table.add_column(col)
    for item in listing:
        opts = ", ".join(f"{k}={v!r}" for k, v in item["options"].items())
        table.add_row(item["kind"], item["name"], f"{item['source']} {item['version']}", opts)
    console = Console()
    console.print(table)
    for f in failures:
        console.print(f"[red]failed to load[/] {f['source']}: {f['error']}")
    for c in conflicts:
        console.print(f"[red]conflict[/] {c['kind']} {c['name']!r} claimed by {' and '.join(c['claimed_by'])}")
    return 0


COMMANDS = {"run": cmd_run, "ablate": cmd_ablate, "eval": cmd_eval, "prune": cmd_prune, "unlearn": cmd_unlearn, "teacher": cmd_teacher, "plugins": cmd_plugins}

if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
