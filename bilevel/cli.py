"""The `bilevel` command line. Heavy libraries are imported inside commands so --help and `plugins` stay fast."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from bilevel import __version__
from bilevel.core.errors import BilevelError


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad input as one line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise BilevelError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="bilevel", description="Prune a diffusion UNet and suppress concepts in one bilevel phase.")
    parser.add_argument("--version", action="version", version=f"bilevel {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="prune, fine-tune bilevel (with baselines), evaluate, report")
    run.add_argument("--preset", help="start from a shipped preset (see `bilevel presets`); --config, flags and "
                     "--set override it")  # fmt: skip
    run.add_argument("--config", type=Path, help="YAML/TOML/JSON run config; flags override it")
    run.add_argument("--model", help="teacher: 'tiny' (shipped), a local diffusers pipeline folder (tiny or Stable "
                     "Diffusion) or a hub id of a Stable Diffusion pipeline")
    run.add_argument("--world", help="world plugin serving the model (default: resolved from --model; see "
                     "`bilevel plugins`)")  # fmt: skip
    run.add_argument("--trust-remote-code", action="store_true", default=None,
                     help="allow a pipeline whose model_index.json names custom code (off by default)")  # fmt: skip
    run.add_argument("--pruner", help="pruner plugin name (see `bilevel plugins`)")
    run.add_argument("--unlearner", help="unlearner plugin name")
    run.add_argument("--solver", help="bilevel solver plugin name")
    run.add_argument("--concept", action="append", help="concept to suppress (repeatable); tiny world: a colour")
    run.add_argument("--steps", type=int, help="outer training steps per trained arm")
    run.add_argument("--arms", help="comma-separated arms: teacher,pruned,ddpm,kd,bilevel,two-stage,two-stage-tuned")
    run.add_argument("--schedule", choices=["bilevel", "two-stage", "both"],
                     help="bilevel (default arms), two-stage (fine-tune then erase, same step counts) or both")  # fmt: skip
    run.add_argument("--out", type=Path, help="output folder (default runs/run-<time>)")
    run.add_argument("--overwrite", action="store_true", help="reuse an output folder that holds another run")
    run.add_argument("--robustness", action="store_true",
                     help="after training, attack the teacher and every trained arm (robustness table and JSON)")
    run.add_argument("--resume", action="store_true",
                     help="continue the interrupted run in --out with its saved config.json (no other flags allowed)")  # fmt: skip
    run.add_argument("--device", help="torch device, e.g. cpu or cuda")
    run.add_argument("--compile", action="store_true", default=None,
                     help="torch.compile student and teacher for training (model.compile; not with implicit/unrolled)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override any config value, e.g. --set training.upper_lr=1e-3 --set pruner.options.ratio=0.4")  # fmt: skip

    ab = sub.add_parser("ablate", help="a grid of runs (pruners x unlearners x solvers x seeds + baselines) and its report")
    ab.add_argument("--config", type=Path, help="YAML/TOML/JSON grid file; flags override it")
    ab.add_argument("--pruners", help="comma-separated pruner names (default: every built-in)")
    ab.add_argument("--unlearners", help="comma-separated unlearner names (default: every built-in)")
    ab.add_argument("--solvers", help="comma-separated solver names (default: alternating)")
    ab.add_argument("--seeds", help="comma-separated training seeds (default: 0,1,2; --quick: 0)")
    ab.add_argument("--baselines", help="comma-separated: teacher,pruned,ddpm,kd,two-stage,two-stage-tuned (default: "
                    "teacher,pruned,kd,two-stage,two-stage-tuned)")  # fmt: skip
    ab.add_argument("--quick", action="store_true", help="bk-sdm x esd,concept-ablation, 300 steps: a few minutes")
    ab.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="run-config override for every cell, e.g. training.steps=300 (repeatable)")  # fmt: skip
    ab.add_argument("--out", type=Path, help="grid folder (default runs/ablation, or runs/ablation-quick)")
    ab.add_argument("--overwrite", action="store_true", help="replace a different grid in --out")
    ab.add_argument("--report-only", action="store_true", help="rewrite the report from finished cells; run nothing")
    ab.add_argument("--jobs", default="auto", metavar="N",
                    help="cells run at once, one worker process each (default auto: one per core on a CPU, 1 on a "
                    "GPU); results do not depend on it beyond the threads each cell gets")  # fmt: skip
    ab.add_argument("--robustness", action="store_true",
                    help="attack every trained arm of every cell after training (about a CPU-minute per attack per "
                    "arm on the tiny world); the report adds the concept rate under attack")  # fmt: skip
    ab.add_argument("--check-html", action="store_true",
                    help="render report.html in headless Chromium (writes report.png) and fail if it is broken")  # fmt: skip

    model_help = ("'tiny', a local diffusers pipeline folder (tiny or Stable Diffusion, exported ones included), a hub "
                  "id, or a student folder written by bilevel (paired with the pipeline its manifest records)")
    ev = sub.add_parser("eval", help="evaluate any model on its world (concept rate, retained accuracy, quality, cost)")
    ev.add_argument("model", help=model_help)
    ev.add_argument("--concept", action="append", help="concept(s) to measure (default purple)")
    ev.add_argument("--samples", type=int, help="samples per prompt group (default 64)")
    ev.add_argument("--steps", type=int, help="DDIM steps (default 25)")
    ev.add_argument("--guidance", type=float, help="classifier-free guidance (default: the world's stated sampler)")
    ev.add_argument("--seed", type=int, help="sampling seed (default 1234)")
    ev.add_argument("--out", type=Path, help="folder for report.json and grid.png")
    _world_flags(ev)
    ev.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="world setting, e.g. --set evaluation.sd.clip_model=DIR --set data.retain_prompts=[...]")  # fmt: skip

    att = sub.add_parser("attack", help="is a suppressed concept really gone? attack plugins on any model")
    att.add_argument("model", help=model_help)
    att.add_argument("--concept", action="append", help="concept(s) to attack (default purple)")
    att.add_argument("--attack", action="append", help="attack plugin name(s), repeatable or comma-separated "
                     "(default: every registered attack; see `bilevel plugins`)")  # fmt: skip
    att.add_argument("--out", type=Path, help="folder for attacks.json and relearning.png")
    _world_flags(att)
    att.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="attack option (NAME.key=value, or key=value for every selected attack that has it, e.g. "
                     "inversion.steps=50, seed=1) or world setting (model.*, world.*, data.*, evaluation.*)")  # fmt: skip

    prune = sub.add_parser("prune", help="prune a teacher and write the student (compression only)")
    prune.add_argument("--model", default="tiny", help="teacher: 'tiny', a local diffusers pipeline folder or a hub id")
    prune.add_argument("--pruner", default="magnitude", help="pruner plugin name")
    prune.add_argument("--set", dest="options", action="append", default=[], metavar="KEY=VALUE",
                       help="pruner option (e.g. ratio=0.4, variant=tiny) or world setting (model.*, world.*, data.*, "
                       "e.g. data.finetune_data=DIR for calibration images on Stable Diffusion)")  # fmt: skip
    prune.add_argument("--out", type=Path, required=True, help="folder for the student")
    prune.add_argument("--overwrite", action="store_true", help="replace a student already in --out")
    _world_flags(prune, pipeline=False)

    unlearn = sub.add_parser("unlearn", help="erase concept(s) from a model with one unlearner (standalone)")
    unlearn.add_argument("model", help=model_help)
    unlearn.add_argument("--unlearner", default="esd", help="unlearner plugin name")
    unlearn.add_argument("--concept", action="append", help="concept to erase (repeatable; default purple)")
    unlearn.add_argument("--steps", type=int, help="default: the unlearner's measured recommendation (200)")
    unlearn.add_argument("--lr", type=float, help="default: the unlearner's measured recommendation (3e-4)")
    unlearn.add_argument("--batch-size", type=int, default=16)
    unlearn.add_argument("--seed", type=int, default=0)
    unlearn.add_argument("--set", dest="options", action="append", default=[], metavar="KEY=VALUE",
                         help="unlearner option (e.g. variant=full; overrides one recommended option) or world "
                         "setting (model.*, world.*, data.*, evaluation.*)")  # fmt: skip
    unlearn.add_argument("--out", type=Path, required=True, help="folder for the erased model")
    _world_flags(unlearn)

    export = sub.add_parser("export", help="write a student as a complete diffusers pipeline folder")
    export.add_argument("source", type=Path, help="a student folder, or a run folder (its bilevel arm unless --arm)")
    export.add_argument("--out", type=Path, required=True, help="folder for the pipeline")
    export.add_argument("--arm", help="which student of a run folder (ddpm, kd, bilevel, two-stage, pruned)")
    export.add_argument("--pipeline", help="the pipeline the student was pruned from (default: recorded in its manifest)")
    export.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")

    teacher = sub.add_parser("teacher", help="the tiny-world teacher")
    tsub = teacher.add_subparsers(dest="teacher_command", required=True, parser_class=_Parser)
    train = tsub.add_parser("train", help="train the tiny teacher (resumable)")
    train.add_argument("--out", type=Path, default=Path("runs/tiny-teacher"))
    train.add_argument("--steps", type=int, default=None)
    train.add_argument("--seed", type=int, default=None)
    train.add_argument("--no-resume", action="store_true", help="start over even if a checkpoint exists")

    presets = sub.add_parser("presets", help="list the shipped run presets (`bilevel run --preset NAME`)")
    presets.add_argument("--show", metavar="NAME", help="print one preset's file")

    plugins = sub.add_parser("plugins", help="list registered plugins")
    plugins.add_argument("--json", action="store_true", help="machine-readable listing")
    plugins.add_argument("--schema", metavar="NAME", help="JSON schema of one plugin's config")
    return parser


def main(argv: list[str] | None = None) -> int:
    # Before torch starts its OpenMP pool: idle threads sleep instead of spinning. On a 2-core machine shared with
    # another job, spinning made the same KD steps 8.5x slower than one thread, sleeping 0.58x (benchmarks/
    # bench_threads.py). A user's own OMP_WAIT_POLICY wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
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
    from bilevel.core.config import RunConfig, apply_override, build_config, read_config_file

    if args.resume:
        return _resume_run(args)
    from bilevel.core.presets import layer, load_preset

    preset: dict[str, Any] = load_preset(args.preset) if args.preset else {}
    data: dict[str, Any] = read_config_file(args.config) if args.config else {}
    flag_overrides = {
        "model.source": args.model,
        "model.device": args.device,
        "model.trust_remote_code": args.trust_remote_code,
        "model.compile": args.compile,
        "world.name": args.world,
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
        base = data.get("arms") or preset.get("arms") or list(RunConfig.model_fields["arms"].default_factory())
        base = [a for a in base if a not in ("bilevel", "two-stage")]
        data["arms"] = base + {"bilevel": ["bilevel"], "two-stage": ["two-stage"], "both": ["bilevel", "two-stage"]}[args.schedule]
    if args.overwrite:
        data.setdefault("output", {})["overwrite"] = True
    if args.robustness:
        data.setdefault("robustness", {})["enabled"] = True
    for assignment in args.overrides:
        apply_override(data, assignment)
    config = build_config(layer(preset, data))  # the preset is the bottom layer
    from bilevel.commands.run import run

    run(config)
    return 0


#: `run` flags that would change a run; --resume refuses them rather than continue a different run than was started.
_RUN_FLAGS = (
    "preset", "config", "model", "pruner", "unlearner", "solver", "concept", "steps", "arms", "schedule", "overwrite",
    "device", "world", "compile",
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
    from bilevel.commands.run import load_saved_config, run

    run(load_saved_config(args.out), resume=True)
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    from bilevel.commands.ablate.commands import ablate

    return ablate(args)


def _world_flags(parser: argparse.ArgumentParser, pipeline: bool = True) -> None:
    """The flags every command that builds a world shares."""
    parser.add_argument("--world", help="world plugin serving the model (default: resolved from the model)")
    parser.add_argument("--config", type=Path, help="YAML/TOML/JSON run config whose model/world/data/evaluation "
                        "settings apply (flags override it)")  # fmt: skip
    parser.add_argument("--device", default="cpu")
    if pipeline:
        parser.add_argument("--pipeline", help="for a student folder: the pipeline it was pruned from (default: "
                            "recorded in its manifest)")  # fmt: skip


#: --set keys of prune/unlearn that address the world's run config rather than the plugin's options.
WORLD_SECTIONS = ("model.", "world.", "data.", "evaluation.")


def _split_sets(assignments: list[str], kind: str) -> tuple[list[str], dict[str, Any]]:
    """(run-config assignments, plugin options): `data.x=1` is a world setting, `x=1` or `<kind>.options.x=1` an option."""
    from bilevel.core.config import apply_override

    world: list[str] = []
    options: dict[str, Any] = {}
    for assignment in assignments:
        key = assignment.split("=", 1)[0].strip()
        if key.startswith(WORLD_SECTIONS) or key == "concepts":
            world.append(assignment)
        else:
            apply_override(options, assignment.strip().removeprefix(f"{kind}.options."))
    return world, options


def _world_config(args: argparse.Namespace, pipeline: str, assignments: list[str], defaults: dict[str, Any]):
    """A RunConfig holding the world's settings: --config, then the command's defaults where the file is silent,
    then flags and --set (later wins)."""
    from bilevel.core.config import apply_override, build_config, read_config_file

    data: dict[str, Any] = read_config_file(args.config) if getattr(args, "config", None) else {}
    for key, value in defaults.items():
        section, field = key.split(".")
        data.setdefault(section, {}).setdefault(field, value)
    data.setdefault("model", {}).update({"source": pipeline, "device": args.device})
    if getattr(args, "world", None):
        data.setdefault("world", {})["name"] = args.world
    if getattr(args, "concept", None):
        data["concepts"] = args.concept
    for assignment in assignments:
        apply_override(data, assignment)
    return build_config(data)


def cmd_eval(args: argparse.Namespace) -> int:
    from bilevel.commands.evaluate import evaluate_model
    from bilevel.worlds.models import resolve_model_ref

    ref = resolve_model_ref(args.model, args.pipeline)
    flags = {"evaluation.samples_per_prompt": args.samples, "evaluation.steps": args.steps,
             "evaluation.guidance": args.guidance, "evaluation.seed": args.seed}  # fmt: skip
    given = [f"{k}={v}" for k, v in flags.items() if v is not None]
    defaults = {"evaluation.samples_per_prompt": 64, "data.finetune_size": 512}
    config = _world_config(args, ref.pipeline, given + list(args.overrides), defaults)
    evaluate_model(ref, config, args.out, label=args.model)
    return 0


def cmd_attack(args: argparse.Namespace) -> int:
    from bilevel.commands.attack import attack_model
    from bilevel.registry import get_registry
    from bilevel.worlds.models import resolve_model_ref

    named = [n.strip() for given in args.attack or [] for n in given.split(",") if n.strip()]
    names = list(dict.fromkeys(named)) or get_registry().names("attack")
    if not names:
        raise BilevelError("no attack is registered; see `bilevel plugins`")
    keys = [a.split("=", 1)[0].strip() for a in args.overrides]
    world_sets = [a for a, k in zip(args.overrides, keys) if k.startswith(WORLD_SECTIONS) or k == "concepts"]
    attack_sets = [a for a in args.overrides if a not in world_sets]
    ref = resolve_model_ref(args.model, args.pipeline)
    config = _world_config(args, ref.pipeline, world_sets, {"data.finetune_size": 512})
    attack_model(ref, config, names, attack_sets, args.out, explicit=bool(named), label=args.model)
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from bilevel.commands.prune import prune_to_folder

    world_sets, options = _split_sets(args.options, "pruner")
    config = _world_config(args, args.model, world_sets, {})
    prune_to_folder(
        args.model, args.pruner, options, args.out, device=args.device, overwrite=args.overwrite, world_config=config,
        latency_repeats=config.evaluation.latency_repeats,
    )
    return 0


def cmd_unlearn(args: argparse.Namespace) -> int:
    from bilevel.commands.unlearn import RECOMMENDED, unlearn_model
    from bilevel.worlds.models import resolve_model_ref

    recommended = RECOMMENDED.get(args.unlearner)
    world_sets, given = _split_sets(args.options, "unlearner")
    options: dict[str, Any] = {**(recommended.options if recommended else {}), **given}  # --set overrides one key
    steps = args.steps or (recommended.steps if recommended else 200)
    lr = args.lr or (recommended.lr if recommended else 3e-4)
    ref = resolve_model_ref(args.model, args.pipeline)
    config = _world_config(args, ref.pipeline, world_sets, {})
    unlearn_model(
        args.model, args.unlearner, options, args.concept or list(config.concepts), steps, lr, args.out,
        batch_size=args.batch_size, seed=args.seed, device=args.device, pipeline=args.pipeline, world_config=config,
    )  # fmt: skip
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from bilevel.commands.export import export_model
    from bilevel.runtime.report import console

    result = export_model(args.source, args.out, arm=args.arm, pipeline=args.pipeline, overwrite=args.overwrite)
    kind = "stock diffusers pipeline" if result.stock else "channel-pruned student (no stock config describes it)"
    console.print(f"exported {result.student} -> {result.out}: {kind}; load with {result.how_to_load}")
    return 0


def cmd_teacher(args: argparse.Namespace) -> int:
    from bilevel.worlds.tiny.teacher_training import TeacherTrainConfig, train_teacher

    options = {k: v for k, v in {"steps": args.steps, "seed": args.seed}.items() if v is not None}
    config = TeacherTrainConfig(**options)
    train_teacher(config, args.out, resume=not args.no_resume)
    print(f"teacher pipeline written to {args.out / 'pipeline'}")
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from bilevel.core.presets import available, get_preset

    if args.show:
        print(get_preset(args.show).text, end="")
        return 0
    presets = available()
    width = max((len(name) for name in presets), default=0)
    for name, preset in presets.items():
        print(f"{name:<{width}}  r{preset.revision}  {preset.description}")
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from bilevel.registry import get_registry

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


COMMANDS = {"run": cmd_run, "ablate": cmd_ablate, "eval": cmd_eval, "attack": cmd_attack, "prune": cmd_prune, "unlearn": cmd_unlearn, "export": cmd_export, "teacher": cmd_teacher, "plugins": cmd_plugins, "presets": cmd_presets}

if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
