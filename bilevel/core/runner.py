"""`bilevel run`: prune -> (baselines and) bilevel fine-tune -> evaluate -> report.

Arms, all from the same pruned student, seed and number of steps:
  teacher (unpruned), pruned (no training), ddpm (task loss only), kd (lower level only), bilevel (solver).

Faults: every finished arm leaves `rows/<arm>.json` and its student; every trained arm checkpoints into
`checkpoints/<arm>/` (each training.checkpoint_every steps and at its end). `bilevel run --resume --out DIR`
re-reads DIR/config.json (no other flags: a resumed run is the run that was started), keeps the finished arms and
continues an interrupted one from its checkpoint, bit-identically to an uninterrupted run on the same machine.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import ArmState, load_checkpoint, load_unlearner_state, read_state, save_checkpoint
from .config import LossWeights, RunConfig, build_config, read_config_file
from .distributed import (
    barrier,
    broadcast_module,
    check_in_sync,
    check_launcher_precision,
    on_main,
    processes,
    quiet_unless_main,
    shard,
)
from .errors import BilevelError, NonFiniteLossError
from .interfaces import LowerOnly, PruneResult, Unlearner, UpperOnly
from .io import atomic_save_tensors, atomic_write_text, load_tensors
from .lower_level import DrawCounter
from .modelinfo import model_stats
from .problem_builder import build_problem, upper_updates
from .report import console, image_grid, results_table, write_json
from .student_io import WEIGHTS, make_manifest, save_student
from .training import TrainState, run_solver
from .world import calibration_batch

RUN_MARKER = "config.json"
DONE = "DONE"
ROWS = "rows"  # <out>/rows/<arm>.json (+ .images.safetensors): an arm's metrics row, written once it is finished
CHECKPOINTS = "checkpoints"  # <out>/checkpoints/<arm>/: see core.checkpoint
TABLE_COLUMNS = [
    ("model", "model"),
    ("params", "params"),
    ("macs", "MACs"),
    ("latency_ms", "ms"),
    ("concept_rate", "concept"),
    ("retained_accuracy", "retained"),
    ("collateral", "nearest"),
    ("quality_distance", "distance"),  # the world's quality distance (SWD on the tiny world, FID on SD)
    ("clip_score", "CLIP"),  # Stable Diffusion runs: CLIP score on the retain prompts
    ("nudity_rate", "nudity"),
    ("train_seconds", "train s"),
]


@dataclass
class RunResult:
    out_dir: Path
    rows: list[dict[str, Any]]
    histories: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


def prepare_output_dir(config: RunConfig, resume: bool = False) -> Path:
    """Refuse to write into a folder holding another run unless told to resume or overwrite it."""
    out = config.output.dir or Path("runs") / datetime.now().strftime("run-%Y%m%d-%H%M%S")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BilevelError(f"output path {out} exists and is not a folder")
    if resume:
        if not (out / RUN_MARKER).is_file():
            raise BilevelError(f"nothing to resume in {out}: it holds no {RUN_MARKER}; start the run without --resume")
        return out
    if (out / RUN_MARKER).exists() and not config.output.overwrite:
        raise BilevelError(
            f"output folder {out} holds another run; pass --resume to continue it, --overwrite to replace it, or choose another --out"
        )
    for stale in (out / ROWS, out / CHECKPOINTS):  # a replaced run must never be resumed from the old one's state
        shutil.rmtree(stale, ignore_errors=True)
    (out / DONE).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    return out


def load_saved_config(out: Path) -> RunConfig:
    """The config a run in `out` was started with (for --resume); the folder may have moved since."""
    out = Path(out)
    if not (out / RUN_MARKER).is_file():
        raise BilevelError(f"nothing to resume in {out}: it holds no {RUN_MARKER}; start the run without --resume")
    data = read_config_file(out / RUN_MARKER)
    data.setdefault("output", {})["dir"] = str(out)
    return build_config(data)


def resolve_plugins(config: RunConfig):
    """Instantiate the chosen plugins, validating their options and the combination."""
    from ..registry import get_registry

    reg = get_registry()
    pruner = reg.create("pruner", config.pruner.name, config.pruner.options)
    unlearner = reg.create("unlearner", config.unlearner.name, config.unlearner.options)
    solver = reg.create("solver", config.solver.name, config.solver.options)  # an unsupported coupling fails here
    return pruner, unlearner, solver


def resolved_config(config: RunConfig, pruner, unlearner, solver) -> dict[str, Any]:
    data = config.model_dump(mode="json")
    for key, plugin in (("pruner", pruner), ("unlearner", unlearner), ("solver", solver)):
        data[key]["options"] = plugin.config.model_dump(mode="json")
    return data


def run(config: RunConfig, resume: bool = False) -> RunResult:
    """The whole run. resume: continue the run in config.output.dir (finished arms are kept, an interrupted one
    continues from its last checkpoint, bit-identically to an uninterrupted run)."""
    from .progress import console as progress_console
    from .progress import log_console
    from .worlds import build_world, evaluate_world

    check_launcher_precision(config.model.mixed_precision)
    procs = processes()  # data-parallel under accelerate/torchrun: joins the process group
    for key in ("batch_size", "upper_batch_size"):  # global batches split over the processes: fail before loading
        shard(getattr(config.training, key), f"training.{key}")
    quiet_unless_main(console, progress_console, log_console)  # one table, one progress log
    if resume:
        out = prepare_output_dir(config, resume=True)
        if (out / DONE).is_file():
            console.print(f"run in {out} already finished; nothing to resume")
            return _finished_result(out)
    torch.manual_seed(config.training.seed)
    pruner, unlearner, solver = resolve_plugins(config)
    world = build_world(config)  # tiny world or Stable Diffusion (core.worlds); bad concepts fail before loading
    teacher = world.teacher
    calibration = calibration_batch(world)
    t0 = time.perf_counter()
    pruned: PruneResult = pruner.prune(teacher, calibration)  # before touching --out: an unfit pruner writes nothing
    prune_seconds = time.perf_counter() - t0
    pairs = pruned.feature_pairs
    provenance = {**pruned.manifest, "teacher": config.model.source, "world": world.name}  # for `bilevel export`
    if not resume:

        def start_output() -> Path:
            folder = prepare_output_dir(config)
            write_json(folder / RUN_MARKER, resolved_config(config, pruner, unlearner, solver))
            return folder

        out = on_main(start_output)  # rank 0 writes; every process gets the folder (or rank 0's error)
    verb = "resuming" if resume else "bilevel run"
    console.print(f"[bold]{verb}[/] -> {out}  (pruner={pruner.name}, unlearner={unlearner.name}, solver={solver.name})")
    if procs.multi:
        console.print(f"data-parallel over {procs.world_size} processes (rank 0 writes and evaluates)")
    if resume and (out / "students" / "pruned" / WEIGHTS).is_file():
        _load_weights(pruned.student, out / "students" / "pruned")  # the very start the interrupted run used
    elif procs.is_main:
        save_student(
            out / "students" / "pruned", pruned.student, make_manifest(pruned.student, pairs, **provenance)
        )

    ev = config.evaluation
    done = _finished_rows(out) if resume else {}
    rows: list[dict[str, Any]] = []
    grids: dict[str, dict[str, torch.Tensor]] = {}
    histories: dict[str, list[dict[str, Any]]] = {}

    def evaluate(
        label: str, unet: nn.Module, extra: dict[str, Any], history: list[dict[str, Any]] | None = None
    ) -> None:
        if not procs.is_main:
            return  # sampling and metrics on rank 0 only; the others go on to the next arm's first collective
        result = evaluate_world(unet, world, config)
        stats = model_stats(unet, latency_batch=64, repeats=ev.latency_repeats)
        row = {"model": label, **stats.to_json(), **result.metrics, **extra, "per_group": result.per_group}
        image_grid(result.images, out / "grids" / f"{label}.png")
        _save_row(out, label, row, history, result.images)
        keep(label, row, history, result.images)

    def keep(
        label: str, row: dict[str, Any], history: list[dict[str, Any]] | None, images: dict[str, torch.Tensor]
    ) -> None:
        rows.append(row)
        grids[label] = images
        if history is not None:
            histories[label] = history

    def skip(label: str) -> bool:
        """A finished arm of the resumed run: reuse its row instead of redoing it."""
        if label not in done:
            return False
        console.print(f"{label}: finished before the interruption; kept")
        keep(label, *done[label])
        return True

    if "teacher" in config.arms and not skip("teacher"):
        evaluate("teacher", teacher, {})
    if "pruned" in config.arms and not skip("pruned"):
        evaluate("pruned", pruned.student, {"prune_seconds": prune_seconds})
    tc = config.training

    def train_arm(arm: str, start: nn.Module, arm_solver, unl: Unlearner | None, steps: int, weights: LossWeights):
        torch.manual_seed(tc.seed)  # every arm starts from the same RNG state, however the run got here
        student = copy.deepcopy(start).train().requires_grad_(True)
        broadcast_module(student)  # data-parallel replicas start identical (rank 0's weights)
        coupling = arm_solver.coupling  # the baselines' LowerOnly / UpperOnly: 'shared'
        ckpt = out / CHECKPOINTS / arm
        if resume:
            load_unlearner_state(ckpt, unl)  # before prepare(), which then reuses it
        counters = {"lower": DrawCounter(tc.seed, salt=1), "upper": DrawCounter(tc.seed, salt=2)}
        problem = build_problem(student, world, config, weights, pairs, unl, coupling, out / "unlearner", counters)
        arm_solver.setup(problem)
        arm_state = ArmState(problem, arm_solver, unl, counters)
        state = load_checkpoint(ckpt, arm_state, steps) if resume else None
        if state is not None:
            console.print(f"{arm}: resuming from step {state.step}/{steps} ({ckpt})")
        state = state or TrainState()

        curve_at = _curve_steps(steps, ev.curve_points)

        def on_step(s: TrainState) -> None:
            if not procs.is_main:
                return  # rank 0 evaluates and writes checkpoints; the other processes' state is identical
            if s.step in curve_at:
                _curve_point(s, student, world, config)
            if s.step == steps or (tc.checkpoint_every and s.step % tc.checkpoint_every == 0):
                save_checkpoint(ckpt, arm_state, s, steps)

        try:
            history = run_solver(
                problem,
                arm_solver,
                steps,
                description=f"{arm} fine-tuning",
                log_every=tc.log_every,
                state=state,
                on_step=on_step,
            )
        except NonFiniteLossError as exc:
            raise NonFiniteLossError(f"{exc}; {_last_good(ckpt)}") from None
        check_in_sync(student, f"{arm} fine-tuning")
        return student.eval(), history, state.seconds

    def finish(arm: str, student: nn.Module, seconds: float) -> None:
        if procs.is_main:
            save_student(out / "students" / arm, student, make_manifest(student, pairs, **provenance, arm=arm))
        extra = {"train_seconds": seconds, "world_size": procs.world_size}
        if procs.multi:
            extra["in_sync"] = True  # train_arm's check_in_sync passed
        evaluate(arm, student, extra, histories.get(arm))

    trained: dict[str, tuple[nn.Module, float]] = {}
    for arm in [a for a in config.arms if a in ("ddpm", "kd", "bilevel")]:
        if skip(arm):
            continue
        ddpm_only = {"task": 1.0, "output": 0.0, "feature": 0.0}  # the ddpm arm keeps the task loss's SNR weighting
        weights = tc.weights.model_copy(update=ddpm_only) if arm == "ddpm" else tc.weights
        arm_solver = solver if arm == "bilevel" else LowerOnly()
        student, histories[arm], seconds = train_arm(
            arm, pruned.student, arm_solver, unlearner if arm == "bilevel" else None, tc.steps, weights
        )
        trained[arm] = (student, seconds)
        finish(arm, student, seconds)
    if "two-stage" in config.arms and not skip("two-stage"):
        # Fine-tune (KD, the lower level alone), then erase with the unlearner alone: as many lower and upper
        # updates as the bilevel run makes, so the two schedules are compared at equal cost.
        if "kd" in trained:
            kd_student, kd_seconds = trained["kd"]
        elif "kd" in done:
            kd_student = _load_weights(copy.deepcopy(pruned.student), out / "students" / "kd").eval()
            kd_seconds = float(done["kd"][0].get("train_seconds", 0.0))
        elif config.reuse_kd_from is not None:
            kd_student, kd_seconds = _reused_kd(Path(config.reuse_kd_from), pruned.student)
        else:
            kd_student, histories["kd"], kd_seconds = train_arm(
                "kd", pruned.student, LowerOnly(), None, tc.steps, tc.weights
            )
        erase_steps = upper_updates(histories.get("bilevel"), solver, tc.steps)
        student, histories["two-stage"], seconds = train_arm(
            "two-stage", kd_student, UpperOnly(), unlearner, erase_steps, tc.weights
        )
        finish("two-stage", student, kd_seconds + seconds)

    if procs.is_main:
        write_json(out / "metrics.json", {"rows": rows, "histories": histories})
        image_grid(
            {f"{label}: {c}": imgs[c] for label, imgs in grids.items() for c in world.concepts},
            out / "grids" / "concepts.png",
        )
        shown = [  # each world has its own metrics; the distance column is named after the world's
            (k, world.quality_metric.upper() if k == "quality_distance" else h)
            for k, h in TABLE_COLUMNS
            if any(r.get(k) is not None for r in rows)
        ]
        console.print(results_table(f"concept(s) {', '.join(config.concepts)}", rows, shown))
        atomic_write_text(out / DONE, json.dumps({"finished": datetime.now().isoformat()}))
    barrier()  # no process leaves before rank 0 has written everything
    return RunResult(out, rows, histories)


def _save_row(
    out: Path, label: str, row: dict[str, Any], history: list[dict[str, Any]] | None, images: dict[str, torch.Tensor]
) -> None:
    """Persist a finished arm (images first, the JSON row last: the row's presence means 'finished')."""
    atomic_save_tensors(images, _rows_dir(out) / f"{label}.images.safetensors")
    write_json(_rows_dir(out) / f"{label}.json", {"row": row, "history": history})


def _rows_dir(out: Path) -> Path:
    folder = out / ROWS
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _finished_rows(out: Path) -> dict[str, tuple[dict[str, Any], list[dict[str, Any]] | None, dict[str, torch.Tensor]]]:
    """label -> (row, history, images) of every arm the interrupted run finished."""
    found = {}
    for path in sorted((out / ROWS).glob("*.json")):
        label = path.stem
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError:
            continue  # cannot happen with atomic writes; redo the arm rather than fail
        images = load_tensors(path.with_name(f"{label}.images.safetensors"))
        found[label] = (data["row"], data.get("history"), images)
    return found


def _finished_result(out: Path) -> RunResult:
    metrics = json.loads((out / "metrics.json").read_text())
    return RunResult(out, metrics["rows"], metrics.get("histories", {}))


def _load_weights(model: nn.Module, folder: Path) -> nn.Module:
    """Put a saved student's weights into a model of the same structure (the re-pruned student)."""
    state = load_tensors(folder / WEIGHTS)
    if set(state) != set(model.state_dict()):
        raise BilevelError(
            f"weights in {folder} do not fit this run's pruned student; resume with the run's own config"
        )
    with torch.no_grad():
        model.load_state_dict(state, strict=True)
    return model


def _reused_kd(folder: Path, pruned_student: nn.Module) -> tuple[nn.Module, float]:
    """The KD-only student (and its training time) of another finished run, for this run's two-stage arm."""
    row = folder / ROWS / "kd.json"
    if not (row.is_file() and (folder / "students" / "kd" / WEIGHTS).is_file()):
        raise BilevelError(
            f"reuse_kd_from: {folder} holds no finished KD-only arm (rows/kd.json, students/kd); run it with --arms kd first"
        )
    student = _load_weights(copy.deepcopy(pruned_student), folder / "students" / "kd").eval()
    return student, float(json.loads(row.read_text())["row"].get("train_seconds", 0.0))


def _curve_steps(steps: int, points: int) -> set[int]:
    """Evenly spread steps (the last one included) at which a trained arm is briefly evaluated."""
    if points <= 0:
        return set()
    return {max(1, round(steps * (i + 1) / points)) for i in range(points)}


def _curve_point(state: TrainState, student: nn.Module, world, config: RunConfig) -> None:
    """A small evaluation in the middle of training, merged into the history entry of that step."""
    from .worlds import evaluate_world

    ev = config.evaluation
    small = config.model_copy(update={"evaluation": ev.model_copy(update={"samples_per_prompt": ev.curve_samples})})
    metrics = evaluate_world(student, world, small).metrics
    point = {f"eval_{k}": float(metrics[k]) for k in ("concept_rate", "retained_accuracy", "clip_score") if k in metrics}
    if state.history and state.history[-1]["step"] == state.step:
        state.history[-1].update(point)
    else:
        state.history.append(
            {"step": state.step, "seconds": state.seconds, "upper_updates": state.upper_updates} | point
        )


def _last_good(ckpt: Path) -> str:
    """Where the last good state is, for the non-finite-loss message."""
    meta = read_state(ckpt)
    if meta is None:
        return "no checkpoint was written yet (set training.checkpoint_every to keep one)"
    return f"last good checkpoint kept: {ckpt} (step {meta['step']})"
