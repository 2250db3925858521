"""The public toolkit for plugin authors: what the built-in plugins use, importable from one place.

Built-ins import only from here, `bilevel` and `bilevel.core` (the contracts), so a third-party plugin can do
everything a built-in does without reaching into engine modules whose layout may change:

- noising and targets: `add_noise`, `get_velocity`, `task_target`, `prediction_type`, `noised` (draws t and eps);
- sampling: `sample_images`, `sample_trajectories`, `guided_eps`, `uncond_cond_eps`;
- prompts: `PromptBank`, `PromptMapping` (the shared anchor/relabel option) and its helpers;
- image sets: `generate_or_load` (teacher samples cached beside the run, or in the grid's shared cache),
  `load_png_folder`; caches of your own: `preparation_cache` (an unlearner's one-off tensors, shared by runs through
  ctx.cache_dir) or `cached_tensors`, with `model_fingerprint` / `tensor_fingerprint` in the metadata (reused only
  when made alike) and `digested_name` for one file per metadata;
- the retain extension: `draw_retain`, `RetainBatch`;
- parameter subsets: `select_subset`, `attention_modules`;
- compression: `prune_unet_channels` (one channel engine, any torch-pruning importance), `check_forward`,
  `remove_blocks` (BK-SDM);
- optimiser steps: `gradient_step`, `optimizer_step`, `unscaled_grads` (fp16 loss scaling and data-parallel
  averaging included; a plain `optimizer.step()` would miss both), `lower_step`, `upper_step`;
- evaluation helpers: `autocast` (the run's mixed precision), `frechet_distance` (on any features);
- files: `atomic_save_tensors`, `atomic_write_text`, `load_tensors`, `read_format_json`, `image_grid`;
- attacks: `ConditioningSwap` (render other conditioning in place of the concept prompts through the world's own
  evaluator), `fit_prompt_offsets` (concept inversion: learn conditioning offsets against a frozen model), `measure_concept_rate` (a concept rate with its Wilson interval), `concept_examples`,
  `read_prompt_file`, `relearn` (fine-tune a copy and measure the concept along the way);
- solver building blocks: hypergradients (`implicit_hypergrad`, `unrolled_hypergrad`, `conjugate_gradient`,
  `neumann`, HVPs) and parameter swapping (`swap_parameters`, `Coupled`).
"""

from __future__ import annotations

from bilevel.compression.block_removal import (
    remove_blocks,
)
from bilevel.compression.channel_pruning import (
    ChannelPruner,
    ChannelPrunerConfig,
    ChannelScores,
    check_forward,
    prune_unet_channels,
)
from bilevel.diffusion.conditioning import (
    PromptBank,
)
from bilevel.diffusion.conditioning_swap import (
    ConditioningSwap,
)
from bilevel.diffusion.image_sets import (
    cached_tensors,
    digested_name,
    generate_or_load,
    load_png_folder,
    model_fingerprint,
    preparation_cache,
    tensor_fingerprint,
)
from bilevel.diffusion.noise import (
    PREDICTION_TYPES,
    add_noise,
    get_velocity,
    noised,
    prediction_type,
    task_target,
)
from bilevel.diffusion.prompt_files import (
    read_prompt_file,
)
from bilevel.diffusion.prompt_mapping import (
    DROP,
    FARTHEST,
    RANDOM,
    PromptMapping,
    alias_prompts,
    check_word,
    concept_in,
    explicit_prompts,
    non_concept_colours,
    remap_prompts,
    replace_concept,
)
from bilevel.diffusion.prompt_offsets import fit_prompt_offsets
from bilevel.diffusion.retain import (
    RetainBatch,
    draw_retain,
)
from bilevel.diffusion.sampling import (
    guided_eps,
    sample_images,
    sample_trajectories,
    uncond_cond_eps,
)
from bilevel.evaluators.frechet import (
    frechet_distance,
)
from bilevel.optim.functional import (
    Coupled,
    batch_head,
    double_backward_attention,
    explain_missing_double_backward,
    set_parameters,
    split_names,
    swap_data,
    swap_parameters,
)
from bilevel.optim.hypergrad import (
    HVP,
    Tensors,
    conflict_averse_weight,
    conjugate_gradient,
    dot,
    grads_or_zeros,
    hvp_autograd,
    hvp_finite_difference,
    implicit_hypergrad,
    neumann,
    norm,
    unrolled_hypergrad,
)
from bilevel.optim.parameter_subsets import (
    attention_modules,
    select_subset,
)
from bilevel.optim.relearning import (
    RelearnData,
    relearn,
)
from bilevel.optim.steps import (
    gradient_step,
    loss_scale,
    lower_step,
    optimizer_step,
    scale_loss,
    unscaled_grads,
    upper_step,
)
from bilevel.runtime.io import (
    atomic_save_tensors,
    atomic_write_text,
    load_tensors,
    read_format_json,
)
from bilevel.runtime.precision import (
    autocast,
)
from bilevel.runtime.report import (
    image_grid,
)
from bilevel.runtime.seeding import (
    draw_generator,
)
from bilevel.worlds.concept_examples import (
    concept_examples,
)
from bilevel.worlds.concept_rate import (
    RateMeasure,
    measure_concept_rate,
    measure_swapped_rate,
)

__all__ = [
    "DROP",
    "FARTHEST",
    "HVP",
    "PREDICTION_TYPES",
    "RANDOM",
    "ChannelPruner",
    "ChannelPrunerConfig",
    "ChannelScores",
    "ConditioningSwap",
    "Coupled",
    "PromptBank",
    "PromptMapping",
    "RateMeasure",
    "RelearnData",
    "RetainBatch",
    "Tensors",
    "add_noise",
    "alias_prompts",
    "atomic_save_tensors",
    "atomic_write_text",
    "attention_modules",
    "autocast",
    "batch_head",
    "cached_tensors",
    "check_forward",
    "check_word",
    "concept_examples",
    "concept_in",
    "conflict_averse_weight",
    "conjugate_gradient",
    "digested_name",
    "dot",
    "double_backward_attention",
    "draw_generator",
    "draw_retain",
    "explain_missing_double_backward",
    "explicit_prompts",
    "fit_prompt_offsets",
    "frechet_distance",
    "generate_or_load",
    "get_velocity",
    "gradient_step",
    "grads_or_zeros",
    "guided_eps",
    "hvp_autograd",
    "hvp_finite_difference",
    "image_grid",
    "implicit_hypergrad",
    "load_png_folder",
    "load_tensors",
    "loss_scale",
    "lower_step",
    "measure_concept_rate",
    "measure_swapped_rate",
    "model_fingerprint",
    "neumann",
    "noised",
    "non_concept_colours",
    "norm",
    "optimizer_step",
    "prediction_type",
    "preparation_cache",
    "prune_unet_channels",
    "read_format_json",
    "read_prompt_file",
    "relearn",
    "remap_prompts",
    "remove_blocks",
    "replace_concept",
    "sample_images",
    "sample_trajectories",
    "scale_loss",
    "select_subset",
    "set_parameters",
    "split_names",
    "swap_data",
    "swap_parameters",
    "task_target",
    "tensor_fingerprint",
    "uncond_cond_eps",
    "unrolled_hypergrad",
    "unscaled_grads",
    "upper_step",
]
