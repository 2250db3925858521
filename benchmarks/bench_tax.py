"""The framework tax: one KD fine-tuning step through `bilevel` versus the same step in a bare PyTorch loop.

Both paths train a copy of the same BK-SDM-pruned student of the tiny world's teacher on the same batches, with
the same loss (task + output KD + feature KD, the run's default weights), the same AdamW (lower lr, weight decay
0, fused on a CPU) and the same warm-up LambdaLR:

  * bilevel: the `kd` arm of `bilevel run` as the runner builds it: `build_problem(..., unlearner=None)` stepped
    by the `LowerOnly` solver inside ONE `run_solver` call, so each step pays everything the run pays per step:
    the draw (counter-seeded generator, the teacher pass under a per-pass FeatureTap), the student pass under its
    FeatureTap, `kd_loss` (its parts turned into floats), `gradient_step` (autograd.grad, setting .grad, the
    step, clearing .grad), the metrics dict, the finiteness check, the progress bar and the log window.
  * bare: a hand-written loop in this file: plain torch and diffusers UNet calls, forward hooks registered once,
    loss.backward(), optimizer.step(), zero_grad(set_to_none=True), scheduler.step(); no per-step .item().
    It uses its own (identical) copy of the teacher, so its permanent hooks never fire in the bilevel path.

Both live in one process and are interleaved: after one warm-up window of W steps each, every round runs W steps
of each path, alternating which goes first; a path's step time in a round is the window's wall time / W
(time.perf_counter; on CUDA synchronised at window edges). Reported: the median over rounds of the per-round
ratio bilevel / bare (goal <= 1.05), its min and max, and the same ratio of process CPU time
(time.process_time) as a check that is insensitive to other processes' load. The bilevel windows are cut from
the single run_solver call by its on_step callback, which runs the bare windows in between; that callback's
own cost (a modulo per step) is charged to bilevel, like the runner's on_step. Both paths draw the same batches
from the same start, so at the end they hold the same weights: the largest weight difference is reported too.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_tax.py --rounds 5 --steps 20 [--batch-size 32] [--json PATH]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GOAL = 1.05
UNCOND_PROB = 0.1  # make_lower_objective's default (classifier-free guidance dropout of the prompt)
LOWER_SALT = 1  # Run.train's lower-level DrawCounter salt


# ------------------------------------------------------------------------------------------------ the bare loop
class BareKD:
    """KD fine-tuning written by hand: what a user would write without the framework.

    The batch is drawn as the framework draws it (one CPU generator per step, seeded by the run's counter formula,
    then index / prompt-dropout / noise / timestep draws in the same order), so both paths see the same batches.
    """

    def __init__(
        self, student: nn.Module, teacher: nn.Module, images: torch.Tensor, cond_all: torch.Tensor,
        uncond: torch.Tensor, alphas_cumprod: torch.Tensor, pairs: list, w_task: float, w_output: float,
        w_feature: float, batch_size: int, lr: float, warmup: int, seed: int,
    ) -> None:  # fmt: skip
        self.student, self.teacher = student, teacher
        self.images, self.cond_all, self.uncond, self.abar = images, cond_all, uncond, alphas_cumprod
        self.w_task, self.w_output, self.w_feature = w_task, w_output, w_feature
        self.batch_size, self.seed, self.draws = batch_size, seed, 0
        self.device = next(student.parameters()).device
        self.pairs = list(pairs) if w_feature > 0 else []
        self.use_teacher = w_output > 0 or bool(self.pairs)
        # channel-pruned pairs compare the teacher's kept channels (in student order); None: shapes already agree
        self.keep = [
            None if p.teacher_channels is None else torch.tensor(p.teacher_channels, device=self.device)
            for p in self.pairs
        ]
        self.s_feats: dict[str, torch.Tensor] = {}
        self.t_feats: dict[str, torch.Tensor] = {}
        s_mods, t_mods = dict(student.named_modules()), dict(teacher.named_modules())
        for p in self.pairs:  # registered once, for good
            s_mods[p.student].register_forward_hook(_store(self.s_feats, p.student))
            t_mods[p.teacher].register_forward_hook(_store(self.t_feats, p.teacher))
        # what a speed-aware hand-written loop uses on a CPU (and what bilevel.optim.adamw builds): the fused kernel
        fused = {"fused": True} if self.device.type == "cpu" else {}
        self.opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0, **fused)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: min(1.0, (s + 1) / max(1, warmup)))

    def draw(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_t, t, cond, eps) of the next batch."""
        # the framework's counter-based seeding (runtime.seeding.draw_generator, stream 0), written out
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + LOWER_SALT * 7_919 + self.draws)
        self.draws += 1
        b = self.batch_size
        idx = torch.randint(len(self.images), (b,), generator=gen)
        x0 = self.images[idx].to(self.device)
        cond = self.cond_all[idx].clone().to(self.device)
        drop = torch.rand(b, generator=gen) < UNCOND_PROB
        cond[drop] = self.uncond.to(self.device)
        eps = torch.randn(x0.shape, generator=gen).to(self.device)
        t = torch.randint(len(self.abar), (b,), generator=gen)
        a = self.abar[t].view(-1, 1, 1, 1).to(self.device)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        return xt, t.to(self.device), cond, eps

    def loss(self, xt: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        if self.use_teacher:
            with torch.no_grad():
                eps_t = self.teacher(xt, t, encoder_hidden_states=cond).sample
        eps_s = self.student(xt, t, encoder_hidden_states=cond).sample
        total = self.w_task * F.mse_loss(eps_s, eps)
        if self.w_output > 0:
            total = total + self.w_output * F.mse_loss(eps_s, eps_t)
        if self.pairs:  # the sum over blocks of each block's mean squared error
            feat = torch.zeros((), device=self.device)
            for p, keep in zip(self.pairs, self.keep):
                tf = self.t_feats[p.teacher]
                if keep is not None:
                    tf = tf.index_select(1, keep)
                feat = feat + F.mse_loss(self.s_feats[p.student], tf)
            total = total + self.w_feature * feat
        return total

    def step(self) -> torch.Tensor:
        loss = self.loss(*self.draw())
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.sched.step()
        return loss.detach()


def _store(into: dict[str, torch.Tensor], name: str):
    def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
        into[name] = output[0] if isinstance(output, (tuple, list)) else output  # down blocks return (h, skips)

    return hook


# ------------------------------------------------------------------------------------------------ the set-up
@dataclass
class Setup:
    config: Any
    world: Any
    problem: Any  # the bilevel path's BilevelProblem (the kd arm's)
    solver: Any  # LowerOnly
    bare: BareKD
    fw_student: nn.Module
    bare_student: nn.Module
    start: nn.Module  # the pruned student both copies started from (untouched)
    notes: dict[str, Any] = field(default_factory=dict)


def build(
    batch_size: int | None = None,
    finetune_size: int | None = None,
    device: str | None = None,
    pruner: str = "bk-sdm",
    pruner_options: dict[str, Any] | None = None,
) -> Setup:
    """Both paths on the tiny world's `kd` arm, from two deep copies of one pruned student (BK-SDM, as the default
    run; a channel pruner such as 'magnitude' exercises the kept-teacher-channel feature pairs)."""
    from bilevel.core.config import build_config
    from bilevel.diffusion.noise import prediction_type
    from bilevel.optim.baselines import LowerOnly
    from bilevel.optim.problem import build_problem
    from bilevel.registry import get_registry
    from bilevel.worlds.resolve import build_world

    data: dict[str, Any] = {}
    if batch_size is not None:
        data.setdefault("training", {})["batch_size"] = batch_size
    if finetune_size is not None:
        data.setdefault("data", {})["finetune_size"] = finetune_size
    if device is not None:
        data.setdefault("model", {})["device"] = device
    config = build_config(data)
    tc, weights = config.training, config.training.weights
    # what the bare loop writes out; the defaults satisfy all of these
    assert config.model.mixed_precision == "no" and not config.model.gradient_checkpointing
    assert weights.snr_gamma is None, "the bare loop has no min-SNR weighting"
    torch.manual_seed(tc.seed)
    world = build_world(config, "run")
    assert prediction_type(world.scheduler_config) == "epsilon", "the bare loop regresses eps"
    pruned = get_registry().create("pruner", pruner, pruner_options or {}).prune(world.teacher, None)

    torch.manual_seed(tc.seed)  # as Run.train
    fw_student = copy.deepcopy(pruned.student).train().requires_grad_(True)
    bare_student = copy.deepcopy(pruned.student).train().requires_grad_(True)
    solver = LowerOnly()
    problem = build_problem(fw_student, world, config, weights, pruned.feature_pairs, None, solver.coupling)
    solver.setup(problem)

    bare_teacher = copy.deepcopy(world.teacher).eval().requires_grad_(False)
    bare = BareKD(
        bare_student, bare_teacher, world.finetune.images, world.bank(world.finetune.prompts),
        world.bank.empty(1)[0], world.alphas_cumprod, pruned.feature_pairs, weights.task, weights.output,
        weights.feature, tc.batch_size, tc.lower_lr, tc.warmup, tc.seed,
    )  # fmt: skip
    notes = {
        "pruner": pruner,
        "feature_pairs": len(pruned.feature_pairs),
        "channel_pruned_pairs": sum(p.teacher_channels is not None for p in pruned.feature_pairs),
        "student_params": sum(p.numel() for p in bare_student.parameters()),
        "teacher_params": sum(p.numel() for p in world.teacher.parameters()),
    }
    return Setup(config, world, problem, solver, bare, fw_student, bare_student, pruned.student, notes)


def max_weight_diff(a: nn.Module, b: nn.Module) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a.parameters(), b.parameters()))


# ------------------------------------------------------------------------------------------------ timing
def measure(setup: Setup, rounds: int, steps: int) -> dict[str, Any]:
    """Warm-up window, then `rounds` interleaved rounds of `steps` steps per path (alternating the first)."""
    from bilevel.optim.training import run_solver

    cuda = setup.bare.device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    # window sequence: warm-up (bilevel, bare), then per round (bilevel, bare) or (bare, bilevel)
    events = [("bilevel", -1), ("bare", -1)]
    for r in range(rounds):
        events += [("bilevel", r), ("bare", r)] if r % 2 == 0 else [("bare", r), ("bilevel", r)]
    # each bilevel window is followed by the bare windows up to the next bilevel one (none before the first)
    fw_rounds = [r for p, r in events if p == "bilevel"]
    after: list[list[int]] = [[] for _ in fw_rounds]
    k = -1
    for p, r in events:
        if p == "bilevel":
            k += 1
        else:
            after[k].append(r)

    wall: dict[str, dict[int, float]] = {"bilevel": {}, "bare": {}}
    cpu: dict[str, dict[int, float]] = {"bilevel": {}, "bare": {}}
    mark: dict[str, float] = {}

    def bare_window(r: int) -> None:
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(steps):
            setup.bare.step()
        sync()
        wall["bare"][r], cpu["bare"][r] = time.perf_counter() - t0, time.process_time() - c0

    def on_step(state) -> None:  # the end of a bilevel window: record it, run the bare windows that follow
        if state.step % steps:
            return
        sync()
        t, c = time.perf_counter(), time.process_time()
        k = state.step // steps - 1
        wall["bilevel"][fw_rounds[k]], cpu["bilevel"][fw_rounds[k]] = t - mark["t"], c - mark["c"]
        for r in after[k]:
            bare_window(r)
        sync()
        mark["t"], mark["c"] = time.perf_counter(), time.process_time()

    total = steps * len(fw_rounds)
    tc = setup.config.training
    sync()
    mark["t"], mark["c"] = time.perf_counter(), time.process_time()
    run_solver(
        setup.problem, setup.solver, total, description="kd fine-tuning (bilevel)", log_every=tc.log_every,
        on_step=on_step,
    )  # fmt: skip
    per_round = []
    for r in range(rounds):
        f, b = wall["bilevel"][r] / steps, wall["bare"][r] / steps
        fc, bc = cpu["bilevel"][r] / steps, cpu["bare"][r] / steps
        per_round.append(
            {"round": r, "first": "bilevel" if r % 2 == 0 else "bare", "bilevel_ms": 1e3 * f, "bare_ms": 1e3 * b,
             "ratio": f / b, "bilevel_cpu_ms": 1e3 * fc, "bare_cpu_ms": 1e3 * bc, "cpu_ratio": fc / bc}
        )  # fmt: skip
    ratios = [x["ratio"] for x in per_round]
    cpu_ratios = [x["cpu_ratio"] for x in per_round]
    return {
        "rounds": rounds,
        "steps_per_window": steps,
        "total_steps_per_path": total,
        "per_round": per_round,
        "bilevel_ms": statistics.median(x["bilevel_ms"] for x in per_round),
        "bare_ms": statistics.median(x["bare_ms"] for x in per_round),
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "cpu_ratio_median": statistics.median(cpu_ratios),
        "cpu_ratio_min": min(cpu_ratios),
        "cpu_ratio_max": max(cpu_ratios),
        "max_weight_diff_after": max_weight_diff(setup.fw_student, setup.bare_student),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median over them)")
    parser.add_argument("--steps", type=int, default=20, help="steps per path and round (W)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: training.batch_size (32)")
    parser.add_argument("--finetune-size", type=int, default=None, help="default: data.finetune_size")
    parser.add_argument("--device", default=None, help="default: model.device (cpu)")
    parser.add_argument("--pruner", default="bk-sdm", help="default: bk-sdm (the default run's)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    if args.rounds < 1 or args.steps < 1:
        parser.error("--rounds and --steps must be positive")
    torch.set_num_threads(args.threads)

    from rich.console import Console
    from rich.table import Table

    from bilevel.runtime.progress import console as progress_console

    setup = build(args.batch_size, args.finetune_size, args.device, args.pruner)
    res = measure(setup, args.rounds, args.steps)
    tc = setup.config.training
    meta = {
        "batch_size": tc.batch_size,
        "finetune_size": setup.config.data.finetune_size,
        "device": str(setup.bare.device),
        "threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "progress_bar_live": bool(progress_console.is_terminal),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "goal": GOAL,
        **setup.notes,
    }
    out = Console()
    table = Table(
        title=f"framework tax: kd arm, tiny world, batch {tc.batch_size}, {args.rounds} interleaved rounds x "
        f"{args.steps} steps per path (after a warm-up window)"
    )
    for col, just in (("path", "left"), ("ms/step", "right"), ("x bare (median)", "right"),
                      ("(min-max)", "right"), ("cpu x bare", "right")):  # fmt: skip
        table.add_column(col, justify=just)
    table.add_row("bare PyTorch loop", f"{res['bare_ms']:.2f}", "1.00", "", "1.00")
    table.add_row(
        "bilevel (kd arm: run_solver)", f"{res['bilevel_ms']:.2f}", f"{res['ratio_median']:.3f}",
        f"({res['ratio_min']:.3f}-{res['ratio_max']:.3f})", f"{res['cpu_ratio_median']:.3f}",
    )  # fmt: skip
    out.print(table)
    verdict = "[green]within[/]" if res["ratio_median"] <= GOAL else "[red]over[/]"
    out.print(
        f"median ratio {res['ratio_median']:.3f} is {verdict} the goal of {GOAL:.2f}x; both paths end "
        f"{res['max_weight_diff_after']:.2e} apart in their weights (same batches, same start)"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**meta, **res}, indent=2) + "\n")
        out.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
