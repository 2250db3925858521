"""Builds each arm's BilevelProblem: the KD lower level, the unlearner's upper level, the parameter partition
(coupling), optimisers and schedules."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from bilevel.core.config import LossWeights, RunConfig
from bilevel.core.errors import BilevelError
from bilevel.core.interfaces import BilevelProblem, Coupling, FeaturePair, Objective, UnlearnContext, Unlearner
from bilevel.core.world import World
from bilevel.diffusion.kd_objective import DrawCounter, make_lower_objective
from bilevel.diffusion.noise import prediction_type
from bilevel.optim.adamw import adamw
from bilevel.optim.training import warmup_schedule
from bilevel.runtime.distributed import average_gradients_before_step, main_first, processes, shard
from bilevel.runtime.precision import attach_loss_scaler, under_autocast


def unlearn_context(
    student: nn.Module, reference: nn.Module, world: World, run_dir: Path | None, seed: int, aliases: bool = False,
    cache_dir: Path | None = None,
) -> UnlearnContext:
    """Everything an unlearner may use; `reference` is the frozen model its targets come from. aliases: the concept
    prompts also name each concept by the world's other names (paraphrase hardening, AdvUnlearn-style). cache_dir:
    the folder runs share (config.cache_dir) for preparations that do not depend on the run."""
    has_retain = len(world.finetune) > 0
    return UnlearnContext(
        student=student,
        teacher=reference,
        concepts=list(world.concepts),
        concept_prompts=world.concept_prompts() + (prompts_under_aliases(world) if aliases else []),
        retain_prompts=world.retain_prompts(),
        encode=world.bank,
        concept_images=world.concept_data.images,
        concept_image_prompts=world.concept_data.prompts,
        retain_images=world.finetune.images if has_retain else None,
        retain_image_prompts=world.finetune.prompts if has_retain else None,
        alphas_cumprod=world.alphas_cumprod,
        scheduler_config=world.scheduler_config,
        sample_shape=world.sample_shape,
        run_dir=run_dir,
        device=world.device,
        seed=seed,
        clamp_samples=world.clamp_samples,
        tokenizer=world.tokenizer,
        encode_images=world.encode_images,
        image_shape=world.image_shape,
        cache_dir=cache_dir,
    )


def prompts_under_aliases(world: World) -> list[str]:
    """Each concept prompt again under each of the concept's other names."""
    from bilevel.diffusion.prompt_mapping import alias_prompts

    offered = getattr(world, "concept_aliases", None)
    if not callable(offered):
        raise BilevelError(f"training.upper_aliases: world {world.name!r} offers no other names for its concepts")
    return [p for c in world.concepts for a in offered(c) for p in alias_prompts(world.concept_prompts(c), c, a)]


def build_problem(
    student: nn.Module,
    world: World,
    config: RunConfig,
    weights: LossWeights,
    pairs: list[FeaturePair],
    unlearner: Unlearner | None,
    coupling: Coupling = "shared",
    run_dir: Path | None = None,
    counters: dict[str, DrawCounter] | None = None,
) -> BilevelProblem:
    """The KD lower level and (for the bilevel arm) the unlearner's upper level over one student: the two
    objectives, the parameter partition for the coupling, then the optimisers and schedules.

    counters ('lower', 'upper'): the data-draw counters, passed in so a checkpoint can save and restore them.
    """
    tc = config.training
    if counters is None:
        counters = {"lower": DrawCounter(tc.seed, salt=1), "upper": DrawCounter(tc.seed, salt=2)}
    if config.model.gradient_checkpointing and hasattr(student, "enable_gradient_checkpointing"):
        student.enable_gradient_checkpointing()
    lower = lower_objective(student, world, config, weights, pairs, counters["lower"])
    if unlearner is None:
        upper, upper_params, before = Objective(draw=lambda: None, loss=lambda _: torch.zeros(())), {}, None
        extra = {}
    else:
        upper, upper_params, extra = upper_objective(student, world, config, unlearner, run_dir, counters["upper"])
        before = lambda: unlearner.before_step(student)
    lower_params = partition(student, upper_params, coupling, unlearner)
    lower_opt, upper_opt = optimisers(lower_params, upper_params, config, world.device)
    return BilevelProblem(
        model=student,
        lower=lower,
        upper=upper,
        lower_params=lower_params,
        upper_params=upper_params,
        lower_optimizer=lower_opt,
        upper_optimizer=upper_opt,
        before_upper_step=before,
        lower_scheduler=warmup_schedule(lower_opt, tc.warmup),
        upper_scheduler=warmup_schedule(upper_opt, tc.warmup) if unlearner is not None else None,
        extra_state=extra,
    )


def lower_objective(
    student: nn.Module, world: World, config: RunConfig, weights: LossWeights, pairs: list[FeaturePair],
    counter: DrawCounter,
) -> Objective:  # fmt: skip
    """DDPM + output KD + feature KD on the world's clean data (this process's share of each global batch)."""
    tc, mc = config.training, config.model
    lower = make_lower_objective(
        student, world.teacher, world.finetune.images, world.bank(world.finetune.prompts), world.bank.empty(1)[0],
        world.alphas_cumprod, weights, pairs, tc.batch_size, counter,
        prediction_type=prediction_type(world.scheduler_config), part=shard(tc.batch_size, "training.batch_size"),
    )  # fmt: skip
    return Objective(
        draw=under_autocast(lower.draw, mc.mixed_precision, world.device),
        loss=under_autocast(lower.loss, mc.mixed_precision, world.device),
    )


def upper_objective(
    student: nn.Module, world: World, config: RunConfig, unlearner: Unlearner, run_dir: Path | None,
    counter: DrawCounter,
) -> tuple[Objective, dict[str, nn.Parameter], dict[str, Any]]:  # fmt: skip
    """The unlearner's forgetting loss (prepared once), the parameters it trains, and state a checkpoint must keep
    (the inversion adversary's embedding, when training.upper_inversion is on)."""
    tc, mc = config.training, config.model
    ctx = unlearn_context(
        student, world.teacher, world, run_dir, tc.seed, aliases=tc.upper_aliases, cache_dir=config.cache_dir
    )
    with main_first():  # rank 0 writes the unlearner's caches in run_dir, the other processes then read them
        under_autocast(unlearner.prepare, mc.mixed_precision, world.device)(ctx)
    upper_draw = under_autocast(unlearner.draw, mc.mixed_precision, world.device)
    upper_loss = under_autocast(unlearner.loss, mc.mixed_precision, world.device)
    upper_part, rank = shard(tc.upper_batch_size, "training.upper_batch_size"), processes().rank
    upper_batch = tc.upper_batch_size if upper_part is None else upper_part.stop - upper_part.start
    # data-parallel: each process draws its own share of the upper batch from its own stream (an unlearner
    # samples its batch itself, so it cannot be sliced like the lower one)
    next_generator = counter.next if upper_part is None else lambda: counter.next(stream=rank)
    upper = Objective(
        draw=lambda: upper_draw(ctx, upper_batch, next_generator()), loss=lambda batch: upper_loss(ctx, batch)
    )
    upper_params = unlearner.trainable_parameters(student)
    if not upper_params:
        raise BilevelError(f"unlearner {unlearner.name!r} selected no trainable parameters in this student")
    extra: dict[str, Any] = {}
    if tc.upper_inversion.enabled:
        from bilevel.optim.adversarial import harden

        upper, extra["inversion"] = harden(upper, ctx, upper_loss, world, tc.upper_inversion, tc.seed, counter)
    return upper, upper_params, extra


def partition(
    student: nn.Module, upper_params: dict[str, nn.Parameter], coupling: Coupling, unlearner: Unlearner | None
) -> dict[str, nn.Parameter]:
    """The lower level's parameters: all of them, or (coupling 'split') every one the upper level does not train."""
    lower_params = dict(student.named_parameters())
    if coupling == "split" and unlearner is not None:
        lower_params = {k: v for k, v in lower_params.items() if k not in upper_params}
        if not lower_params:
            raise BilevelError(
                f"split coupling leaves no parameters for the lower level: {unlearner.name!r} trains all"
            )
    return lower_params


def optimisers(
    lower_params: dict[str, nn.Parameter], upper_params: dict[str, nn.Parameter], config: RunConfig,
    device: torch.device,
) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:  # fmt: skip
    """AdamW per level (weight decay 0, so masked unlearners keep masked weights), data-parallel gradient
    averaging and, under fp16, a loss scaler on each."""
    tc = config.training
    if upper_params:
        upper_opt = adamw(upper_params.values(), tc.upper_lr)
    else:  # a one-level arm: a no-op optimiser keeps every solver's code path the same
        upper_opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)
    lower_opt = adamw(lower_params.values(), tc.lower_lr)
    average_gradients_before_step(lower_opt, upper_opt)  # data-parallel: whichever solver steps them
    if config.model.mixed_precision == "fp16":
        for opt in (lower_opt, upper_opt):
            attach_loss_scaler(opt, device)
    return lower_opt, upper_opt


def upper_updates(bilevel_history: list[dict[str, Any]] | None, solver, steps: int) -> int:
    """How many upper updates the bilevel arm made (or, if it did not run, would make)."""
    if bilevel_history:
        return max(1, int(bilevel_history[-1].get("upper_updates", 0)))
    return max(1, steps // int(getattr(solver.config, "upper_every", 1)))
