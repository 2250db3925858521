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

from bilevel.compression.model_stats import model_stats
from bilevel.compression.student_io import WEIGHTS, make_manifest, save_student
from bilevel.core.config import LossWeights, RunConfig, build_config, read_config_file
from bilevel.core.errors import BilevelError, NonFiniteLossError
from bilevel.core.interfaces import PruneResult, Unlearner
from bilevel.core.world import World, calibration_batch
from bilevel.diffusion.kd_objective import DrawCounter
from bilevel.optim.baselines import LowerOnly, UpperOnly
from bilevel.optim.problem import build_problem, upper_updates
from bilevel.optim.training import TrainCost, TrainState, run_solver
from bilevel.runtime.checkpoint import ArmState, load_checkpoint, load_unlearner_state, read_state, save_checkpoint
from bilevel.runtime.compilation import check_solver_compiles, compiled_for_training, eager
from bilevel.runtime.distributed import (
    barrier,
    broadcast_module,
    check_in_sync,
    check_launcher_precision,
    on_main,
    processes,
    quiet_unless_main,
    shard,
)
from bilevel.runtime.io import atomic_save_tensors, atomic_write_text, load_tensors
from bilevel.runtime.report import console, echo_plain, image_grid, results_table, write_json
from bilevel.worlds.models import absolute_source

RUN_MARKER = "config.json"
DONE = "DONE"
ROWS = "rows"  # <out>/rows/<arm>.json (+ .images.safetensors): an arm's metrics row, written once it is finished
CHECKPOINTS = "checkpoints"  # <out>/checkpoints/<arm>/: see runtime.checkpoint
TABLE_COLUMNS = [
    ("model", "model"),
    ("params", "params"),
    ("macs", "MACs"),
    ("latency_ms", "ms"),
    ("concept_rate", "concept"),
    ("alias_rate", "2nd name"),  # tiny world: the concept under its second name (the unlearners never see it)
    ("unasked_rate", "unasked"),  # tiny world: the concept on prompts that do not name it (what KD can re-teach)
    ("retained_accuracy", "retained"),
    ("collateral", "nearest"),
    ("quality_distance", "distance"),  # the world's quality distance (SWD on the tiny world, FID on SD)
    ("clip_score", "CLIP"),  # Stable Diffusion runs: CLIP score on the retain prompts
    ("nudity_rate", "nudity"),
    ("train_seconds", "train s"),
    ("train_cpu_seconds", "CPU s"),  # this process's CPU time training: unlike wall time, not inflated by other jobs
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
    from bilevel.registry import get_registry

    reg = get_registry()
    pruner = reg.create("pruner", config.pruner.name, config.pruner.options)
    unlearner = reg.create("unlearner", config.unlearner.name, config.unlearner.options)
    solver = reg.create("solver", config.solver.name, config.solver.options)  # an unsupported coupling fails here
    check_solver_compiles(config.model, solver)
    return pruner, unlearner, solver


def resolved_config(config: RunConfig, pruner, unlearner, solver) -> dict[str, Any]:
    data = config.model_dump(mode="json")
    for key, plugin in (("pruner", pruner), ("unlearner", unlearner), ("solver", solver)):
        data[key]["options"] = plugin.config.model_dump(mode="json")
    return data


def run(config: RunConfig, resume: bool = False) -> RunResult:
    """The whole run. resume: continue the run in config.output.dir (finished arms are kept, an interrupted one
    continues from its last checkpoint, bit-identically to an uninterrupted run)."""
    from bilevel.runtime.progress import console as progress_console
    from bilevel.runtime.progress import log_console

    check_launcher_precision(config.model.mixed_precision)
    processes()  # data-parallel under accelerate/torchrun: joins the process group
    for key in ("batch_size", "upper_batch_size"):  # global batches split over the processes: fail before loading
        shard(getattr(config.training, key), f"training.{key}")
    quiet_unless_main(console, progress_console, log_console)  # one table, one progress log
    if resume:
        out = prepare_output_dir(config, resume=True)
        if (out / DONE).is_file():
            result = _finished_result(out)
            from bilevel.commands.robustness import ROBUSTNESS_FILE, attack_arms

            # finished, but stopped before its attacks
            if config.robustness.enabled and not (out / ROBUSTNESS_FILE).is_file() and processes().is_main:
                console.print(f"run in {out} finished before its attacks; attacking its arms")
                attack_arms(out, config, [row["model"] for row in result.rows])
            else:
                console.print(f"run in {out} already finished; nothing to resume")
            return result
    return Run.start(config, resume).execute()


@dataclass
class Run:
    """One run's shared state: the world, the pruned student, the output folder and what the arms produced.
    Each arm (below) is one object; `execute` runs them in the config's order and writes the report."""

    config: RunConfig
    world: World
    pruner: Any
    unlearner: Unlearner
    solver: Any
    pruned: PruneResult
    prune_seconds: float
    out: Path
    resume: bool
    done: dict[str, tuple[dict[str, Any], list[dict[str, Any]] | None, dict[str, torch.Tensor]]]
    provenance: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)
    grids: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    histories: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    trained: dict[str, tuple[nn.Module, TrainCost]] = field(default_factory=dict)
    from_workers: set[str] = field(default_factory=set)  # arms this run ran side by side in worker processes

    @classmethod
    def start(cls, config: RunConfig, resume: bool, announce: bool = True) -> Run:
        """Resolve the plugins, build the world, prune, then (only then) claim the output folder. A resumed run
        takes the pruned student it saved instead of pruning again (the very start the interrupted run used)."""
        from bilevel.worlds.resolve import build_world

        torch.manual_seed(config.training.seed)
        pruner, unlearner, solver = resolve_plugins(config)
        world = build_world(config)  # tiny world, Stable Diffusion, a plugin's: bad concepts fail before loading
        saved_pruned = Path(config.output.dir or "") / "students" / "pruned"
        reuse_saved = resume and (saved_pruned / WEIGHTS).is_file()
        if reuse_saved:
            pruned, prune_seconds, provenance = _saved_pruned(saved_pruned, config.model.device)
        else:
            pruned, prune_seconds, provenance = _prune_or_reuse(config, pruner, world)
        if resume:
            out = prepare_output_dir(config, resume=True)
        else:

            def start_output() -> Path:
                folder = prepare_output_dir(config)
                write_json(folder / RUN_MARKER, resolved_config(config, pruner, unlearner, solver))
                return folder

            out = on_main(start_output)  # rank 0 writes; every process gets the folder (or rank 0's error)
        procs = processes()
        verb = "resuming" if resume else "bilevel run"
        if announce:
            console.print(
                f"[bold]{verb}[/] -> {out}  (pruner={pruner.name}, unlearner={unlearner.name}, solver={solver.name})"
            )
        if procs.multi:
            console.print(f"data-parallel over {procs.world_size} processes (rank 0 writes and evaluates)")
        if not reuse_saved and procs.is_main:
            manifest = make_manifest(pruned.student, pruned.feature_pairs, **provenance)
            save_student(out / "students" / "pruned", pruned.student, manifest)
        done = _finished_rows(out) if resume else {}
        return cls(config, world, pruner, unlearner, solver, pruned, prune_seconds, out, resume, done, provenance)

    def execute(self) -> RunResult:
        arms = arms_of(self.config)
        self.run_independent_arms_side_by_side([a.label for a in arms if a.label not in self.done])
        for arm in arms:
            if not self.skip(arm.label):
                arm.run(self)
        self.report()
        if self.config.robustness.enabled and processes().is_main:
            from bilevel.commands.robustness import attack_arms

            attack_arms(self.out, self.config, [row["model"] for row in self.rows])
        return RunResult(self.out, self.rows, self.histories)

    def run_independent_arms_side_by_side(self, pending: list[str]) -> None:
        """On a multi-core CPU, the arms that need only the pruned student run in worker processes at once
        (training.parallel_arms); their rows then count as finished, as in a resumed run."""
        from bilevel.commands.arm_workers import INDEPENDENT_ARMS, run_side_by_side, worker_count

        procs = processes()
        workers = worker_count(
            self.config.training.parallel_arms, self.config.model.device, pending, procs.multi
        )
        if workers < 2:
            return
        side_by_side = [a for a in pending if a in INDEPENDENT_ARMS]
        run_side_by_side(self.out, side_by_side, workers, echo_plain)
        self.done = _finished_rows(self.out)
        self.from_workers.update(side_by_side)

    # ------------------------------------------------------------------------------------------ shared by the arms
    def evaluate(
        self, label: str, unet: nn.Module, extra: dict[str, Any], history: list[dict[str, Any]] | None = None
    ) -> None:
        if not processes().is_main:
            return  # sampling and metrics on rank 0 only; the others go on to the next arm's first collective
        from bilevel.worlds.resolve import evaluate_world

        result = evaluate_world(unet, self.world, self.config)
        stats = model_stats(unet, latency_batch=64, repeats=self.config.evaluation.latency_repeats)
        row = {"model": label, **stats.to_json(), **result.metrics, **extra, "per_group": result.per_group}
        image_grid(result.images, self.out / "grids" / f"{label}.png")
        _save_row(self.out, label, row, history, result.images)
        self.keep(label, row, history, result.images)

    def keep(
        self, label: str, row: dict[str, Any], history: list[dict[str, Any]] | None, images: dict[str, torch.Tensor]
    ) -> None:
        self.rows.append(row)
        self.grids[label] = images
        if history is not None:
            self.histories[label] = history

    def skip(self, label: str) -> bool:
        """A finished arm of the resumed run: reuse its row instead of redoing it."""
        if label not in self.done:
            return False
        if label not in self.from_workers:
            console.print(f"{label}: finished before the interruption; kept")
        self.keep(label, *self.done[label])
        return True

    def train(
        self, arm: str, start: nn.Module, arm_solver: Any, unlearner: Unlearner | None, steps: int,
        weights: LossWeights,
    ) -> tuple[nn.Module, list[dict[str, Any]], TrainCost]:  # fmt: skip
        """Train a copy of `start` for `steps` outer steps of `arm_solver`, checkpointing into checkpoints/<arm>/."""
        tc, procs = self.config.training, processes()
        torch.manual_seed(tc.seed)  # every arm starts from the same RNG state, however the run got here
        student = copy.deepcopy(start).train().requires_grad_(True)
        broadcast_module(student)  # data-parallel replicas start identical (rank 0's weights)
        ckpt = self.out / CHECKPOINTS / arm
        if self.resume:
            load_unlearner_state(ckpt, unlearner)  # before prepare(), which then reuses it
        counters = {"lower": DrawCounter(tc.seed, salt=1), "upper": DrawCounter(tc.seed, salt=2)}
        problem = build_problem(
            student, self.world, self.config, weights, self.pruned.feature_pairs, unlearner, arm_solver.coupling,
            self.out / "unlearner", counters,
        )  # fmt: skip
        arm_solver.setup(problem)
        arm_state = ArmState(problem, arm_solver, unlearner, counters)
        state = load_checkpoint(ckpt, arm_state, steps) if self.resume else None
        if state is not None:
            console.print(f"{arm}: resuming from step {state.step}/{steps} ({ckpt})")
        state = state or TrainState()
        curve_at = _curve_steps(steps, self.config.evaluation.curve_points)

        def on_step(s: TrainState) -> None:
            if not procs.is_main:
                return  # rank 0 evaluates and writes checkpoints; the other processes' state is identical
            if s.step in curve_at:
                _curve_point(s, student, self.world, self.config)
            if s.step == steps or (tc.checkpoint_every and s.step % tc.checkpoint_every == 0):
                save_checkpoint(ckpt, arm_state, s, steps)

        try:
            with compiled_for_training(self.config.model, student, self.world.teacher):
                history = run_solver(
                    problem, arm_solver, steps, description=f"{arm} fine-tuning", log_every=tc.log_every, state=state,
                    on_step=on_step,
                )  # fmt: skip
        except NonFiniteLossError as exc:
            raise NonFiniteLossError(f"{exc}; {_last_good(ckpt)}") from None
        check_in_sync(student, f"{arm} fine-tuning")
        return student.eval(), history, TrainCost.of(state)

    def finish(self, arm: str, student: nn.Module, cost: TrainCost, info: dict[str, Any] | None = None) -> None:
        """Save a trained arm's student and evaluate it (`info`: what the arm chose, recorded in its row)."""
        procs = processes()
        if procs.is_main:
            manifest = make_manifest(student, self.pruned.feature_pairs, **self.provenance, arm=arm)
            save_student(self.out / "students" / arm, student, manifest)
        extra = {**cost.row(), "world_size": procs.world_size, "threads": torch.get_num_threads(), **(info or {})}
        if procs.multi:
            extra["in_sync"] = True  # train's check_in_sync passed
        self.evaluate(arm, student, extra, self.histories.get(arm))

    def report(self) -> None:
        if processes().is_main:
            write_json(self.out / "metrics.json", {"rows": self.rows, "histories": self.histories})
            image_grid(
                {f"{label}: {c}": imgs[c] for label, imgs in self.grids.items() for c in self.world.concepts},
                self.out / "grids" / "concepts.png",
            )
            shown = [  # each world has its own metrics; the distance column is named after the world's
                (k, self.world.quality_metric.upper() if k == "quality_distance" else h)
                for k, h in TABLE_COLUMNS
                if any(r.get(k) is not None for r in self.rows)
            ]
            console.print(results_table(f"concept(s) {', '.join(self.config.concepts)}", self.rows, shown))
            atomic_write_text(self.out / DONE, json.dumps({"finished": datetime.now().isoformat()}))
        barrier()  # no process leaves before rank 0 has written everything


# ---------------------------------------------------------------------------------------------- the arms
@dataclass
class TeacherArm:
    """The unpruned teacher, evaluated as it is."""

    label: str = "teacher"

    def run(self, r: Run) -> None:
        r.evaluate(self.label, r.world.teacher, {})


@dataclass
class PrunedArm:
    """The pruned student before any training."""

    label: str = "pruned"

    def run(self, r: Run) -> None:
        r.evaluate(self.label, r.pruned.student, {"prune_seconds": r.prune_seconds})


@dataclass
class FineTuneArm:
    """ddpm (task loss only), kd (the lower level alone) or bilevel (the solver with the unlearner upper level),
    all from the pruned student with the same seed and number of steps."""

    label: str

    def run(self, r: Run) -> None:
        tc = r.config.training
        ddpm_only = {"task": 1.0, "output": 0.0, "feature": 0.0}  # the ddpm arm keeps the task loss's SNR weighting
        weights = tc.weights.model_copy(update=ddpm_only) if self.label == "ddpm" else tc.weights
        bilevel = self.label == "bilevel"
        student, r.histories[self.label], cost = r.train(
            self.label, r.pruned.student, r.solver if bilevel else LowerOnly(), r.unlearner if bilevel else None,
            tc.steps, weights,
        )  # fmt: skip
        r.trained[self.label] = (student, cost)
        r.finish(self.label, student, cost)


@dataclass
class TwoStageArm:
    """Fine-tune (KD, the lower level alone), then erase with the unlearner alone: as many lower and upper updates
    as the bilevel run makes, so the two schedules are compared at equal cost."""

    label: str = "two-stage"

    def run(self, r: Run) -> None:
        tc = r.config.training
        kd_student, kd_cost = _kd_student(r)
        erase_steps = upper_updates(r.histories.get("bilevel"), r.solver, tc.steps)
        student, r.histories[self.label], cost = r.train(
            self.label, kd_student, UpperOnly(), r.unlearner, erase_steps, tc.weights
        )
        r.finish(self.label, student, kd_cost + cost)


@dataclass
class TunedTwoStageArm:
    """Two-stage as a practitioner would run it: the same KD student, then the unlearner alone with its measured
    standalone settings (`bilevel unlearn`'s recommendation: options such as a retain term on the fine-tuning data,
    and its learning rate) for as many updates as the bilevel arm's upper level made, so the total step budget is
    no larger than bilevel's. The claim check compares bilevel with both two-stage arms."""

    label: str = "two-stage-tuned"

    def run(self, r: Run) -> None:
        from bilevel.commands.unlearn import RECOMMENDED
        from bilevel.registry import get_registry

        tc = r.config.training
        kd_student, kd_cost = _kd_student(r)
        recommended = RECOMMENDED.get(r.unlearner.name)
        options = {**r.unlearner.config.model_dump(), **(recommended.options if recommended else {})}
        unlearner = get_registry().create("unlearner", r.unlearner.name, options)
        lr = recommended.lr if recommended else tc.upper_lr
        config = r.config.model_copy(update={"training": tc.model_copy(update={"upper_lr": lr})})
        erase_steps = upper_updates(r.histories.get("bilevel"), r.solver, tc.steps)
        tuned = Run(**{**vars(r), "config": config})  # the same run, with the recommended erase lr
        student, r.histories[self.label], cost = tuned.train(
            self.label, kd_student, UpperOnly(), unlearner, erase_steps, tc.weights
        )
        info = {"erase_lr": lr, "erase_steps": erase_steps, "erase_options": unlearner.config.model_dump(mode="json")}
        r.finish(self.label, student, kd_cost + cost, info)


def _kd_student(r: Run) -> tuple[nn.Module, TrainCost]:
    """The KD-only student two-stage arms start from: this run's, the interrupted run's, a reused one, or trained."""
    tc = r.config.training
    if "kd" in r.trained:
        return r.trained["kd"]
    if "kd" in r.done:
        student = _load_weights(copy.deepcopy(r.pruned.student), r.out / "students" / "kd").eval()
        return student, TrainCost.from_row(r.done["kd"][0])
    if r.config.reuse_kd_from is not None:
        return _reused_kd(Path(r.config.reuse_kd_from), r.pruned.student)
    student, r.histories["kd"], cost = r.train("kd", r.pruned.student, LowerOnly(), None, tc.steps, tc.weights)
    r.trained["kd"] = (student, cost)  # a second two-stage arm reuses it
    return student, cost


def arms_of(config: RunConfig) -> list[Any]:
    """The config's arms in the order they run: the evaluations, the trained arms in the config's order, then
    two-stage (which reuses the kd arm's student when the run trained one)."""
    arms: list[Any] = [arm for arm in (TeacherArm(), PrunedArm()) if arm.label in config.arms]
    arms += [FineTuneArm(a) for a in config.arms if a in ("ddpm", "kd", "bilevel")]
    arms += [TwoStageArm()] if "two-stage" in config.arms else []
    return arms + ([TunedTwoStageArm()] if "two-stage-tuned" in config.arms else [])


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


def _prune_or_reuse(config: RunConfig, pruner: Any, world: World) -> tuple[PruneResult, float, dict[str, Any]]:
    """Prune the teacher, or take the same pruning from config.cache_dir (keyed by everything pruning reads)."""
    from bilevel.compression import pruned_cache

    calibration = calibration_batch(world)
    options = pruner.config.model_dump(mode="json")
    here = {"teacher": absolute_source(config.model.source), "world": world.name}
    key = None
    if config.cache_dir is not None:
        key = pruned_cache.pruning_fingerprint(pruner.name, options, world.teacher, calibration)
        hit = pruned_cache.cached_folder(config.cache_dir, key)
        if hit is not None:
            console.print(f"pruned student: the same pruning is cached, reused {hit}")
            pruned, seconds, provenance = _saved_pruned(hit, config.model.device)
            return pruned, seconds, provenance | here
    t0 = time.perf_counter()
    pruned = pruner.prune(world.teacher, calibration)  # an unfit pruner writes nothing
    seconds = time.perf_counter() - t0
    provenance = {  # the framework records what made the student (and, for `bilevel export`, its pipeline)
        "pruner": pruner.name, "options": options, **pruned.manifest, **here, "prune_seconds": seconds,
    }  # fmt: skip
    if key is not None and processes().is_main:
        manifest = make_manifest(pruned.student, pruned.feature_pairs, **provenance)
        pruned_cache.store(config.cache_dir, key, pruned.student, manifest)
    return pruned, seconds, provenance


def _saved_pruned(folder: Path, device: str) -> tuple[PruneResult, float, dict[str, Any]]:
    """The pruned student a run saved, rebuilt from its manifest (no second pruning, so no second importance
    pass or ratio search), with what made it."""
    from bilevel.compression.student_io import load_student, provenance_of
    from bilevel.core.interfaces import FeaturePair

    student, manifest = load_student(folder, device)
    pairs = [FeaturePair.from_json(p) for p in manifest.get("feature_pairs", [])]
    return PruneResult(student, manifest, pairs), float(manifest.get("prune_seconds", 0.0)), provenance_of(manifest)


def _reused_kd(folder: Path, pruned_student: nn.Module) -> tuple[nn.Module, TrainCost]:
    """The KD-only student (and its training time) of another finished run, for this run's two-stage arm."""
    row = folder / ROWS / "kd.json"
    if not (row.is_file() and (folder / "students" / "kd" / WEIGHTS).is_file()):
        raise BilevelError(
            f"reuse_kd_from: {folder} holds no finished KD-only arm (rows/kd.json, students/kd); run it with --arms kd first"
        )
    student = _load_weights(copy.deepcopy(pruned_student), folder / "students" / "kd").eval()
    return student, TrainCost.from_row(json.loads(row.read_text())["row"])


def _curve_steps(steps: int, points: int) -> set[int]:
    """Evenly spread steps (the last one included) at which a trained arm is briefly evaluated."""
    if points <= 0:
        return set()
    return {max(1, round(steps * (i + 1) / points)) for i in range(points)}


def _curve_point(state: TrainState, student: nn.Module, world, config: RunConfig) -> None:
    """A small evaluation in the middle of training, merged into the history entry of that step."""
    from bilevel.worlds.resolve import evaluate_world

    ev = config.evaluation
    update = {"samples_per_prompt": ev.curve_samples, "concept_samples": ev.curve_samples, "secondary": False}
    small = config.model_copy(update={"evaluation": ev.model_copy(update=update)})
    with eager(student, world.teacher):  # under model.compile: sampling's shapes would each recompile
        metrics = evaluate_world(student, world, small).metrics
    keys = ("concept_rate", "retained_accuracy", "clip_score")
    point = {f"eval_{k}": float(metrics[k]) for k in keys if metrics.get(k) is not None}
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
