"""TRL's SFT and DPO configs, extended with the fields our trainers read; documented like TRL's own.

Machine-dependent defaults (bf16 only where a bf16 GPU is, CPU process groups) are not set here: `alignment.run`
gives them to the recipe parser once, so these classes behave exactly like TRL's when built from Python.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import trl

from .losses import (
    F_DIVERGENCE_LOSS_TYPES,
    F_DIVERGENCE_TYPES,
    LOSS_TYPES,
    REFERENCE_FREE_LOSS_TYPES,
    SMOOTHED_LOSS_TYPES,
    SORTING_LOSS_TYPES,
)

logger = logging.getLogger(__name__)


@dataclass
class RunFolderOptions:
    """What a run may do to the output folder it finds: the fields both configs share (see `alignment.run`)."""

    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start a new run in an output_dir that already holds one (its checkpoints are deleted "
            "once the new run has loaded its model and data)."
        },
    )
    allow_recipe_change: bool = field(
        default=False,
        metadata={
            "help": "Resume a checkpoint with settings that change the result (data, batch, optimizer, ...); "
            "the changes are logged and recorded in recipe-changes.yaml."
        },
    )


def launch_world_size() -> int:
    """How many processes the launcher started (torchrun and `accelerate launch` set WORLD_SIZE, across all
    machines); 1 without a launcher. Read from the environment because the configs are built before the process
    group exists; `alignment.run.run_line.check_launch` stops a run whose accelerator runs another number."""
    return int(os.environ.get("WORLD_SIZE") or 1)


@dataclass
class BatchOptions:
    """The recipe's batch, whatever the number of processes: `global_batch_size` fixes the rows per optimizer step
    and gradient accumulation is derived from it (TRL and transformers only know the per-device batch)."""

    global_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Rows per optimizer step over all processes (DPO: pairs; SFT: sequences or packed windows). "
            "gradient_accumulation_steps is derived as global_batch_size / (per_device_train_batch_size × "
            "processes), so the same recipe trains with the same batch on 1 or 8 GPUs. Unset: "
            "gradient_accumulation_steps as given."
        },
    )

    def __post_init__(self) -> None:
        self.accumulation_given = self.gradient_accumulation_steps  # before it is derived: see check_batch_keys
        if self.global_batch_size is not None:
            self.gradient_accumulation_steps = derived_accumulation(
                self.global_batch_size,
                self.per_device_train_batch_size,
                launch_world_size(),
                given=self.gradient_accumulation_steps,
            )
            if self.auto_find_batch_size:
                raise ValueError(
                    "global_batch_size: auto_find_batch_size halves the per-device batch on out-of-memory and would "
                    "shrink the global batch with it; set per_device_train_batch_size yourself"
                )
        super().__post_init__()
        if self.global_batch_size is not None and self.accelerator_config.split_batches:
            raise ValueError(
                "global_batch_size: accelerator_config.split_batches divides per_device_train_batch_size over the "
                "processes instead; drop one of them"
            )


def derived_accumulation(global_batch: int, per_device: int, world_size: int, given: int = 1) -> int:
    """global_batch / (per_device × world_size), or one line saying why not. `given`: the gradient_accumulation_steps
    the config was built with (1, transformers' default, counts as not given; see `check_batch_keys`)."""
    processes = f"{world_size} process{'es' if world_size != 1 else ''}"
    if global_batch < 1:
        raise ValueError(f"global_batch_size must be at least 1, got {global_batch}")
    if global_batch % world_size:
        raise ValueError(
            f"global_batch_size {global_batch} cannot be split over {processes}; use a multiple of {world_size}"
        )
    if global_batch % (per_device * world_size):
        raise ValueError(
            f"global_batch_size {global_batch} is not a multiple of per_device_train_batch_size {per_device} × "
            f"{processes} = {per_device * world_size}; choose a per_device_train_batch_size that divides "
            f"{global_batch // world_size}"
        )
    accumulation = global_batch // (per_device * world_size)
    if given not in (1, accumulation):
        raise ValueError(accumulation_conflict(given, global_batch, per_device, processes, accumulation))
    logger.info(
        "global_batch_size %d = %d per device × %s × %d gradient accumulation steps",
        global_batch, per_device, processes, accumulation,
    )  # fmt: skip
    return accumulation


def accumulation_conflict(given: int, global_batch: int, per_device: int, processes: str, accumulation: int) -> str:
    return (
        f"gradient_accumulation_steps {given} disagrees with global_batch_size {global_batch} = {per_device} per "
        f"device × {processes} × {accumulation} accumulation; drop gradient_accumulation_steps (it is derived) or "
        "global_batch_size"
    )


def check_batch_keys(config: object, explicit_keys: set[str] | frozenset[str]) -> None:
    """The recipe parser's half of the refusal: gradient_accumulation_steps given as 1 (its default, which the
    config cannot tell from not given) next to a global_batch_size that derives another value."""
    if getattr(config, "global_batch_size", None) is None or "gradient_accumulation_steps" not in explicit_keys:
        return
    if config.accumulation_given != config.gradient_accumulation_steps:
        world_size = launch_world_size()
        processes = f"{world_size} process{'es' if world_size != 1 else ''}"
        raise ValueError(
            accumulation_conflict(
                config.accumulation_given,
                config.global_batch_size,
                config.per_device_train_batch_size,
                processes,
                config.gradient_accumulation_steps,
            )
        )


@dataclass
class SFTConfig(RunFolderOptions, BatchOptions, trl.SFTConfig):
    """TRL's SFT config, with TRL's defaults: swapping `trl.SFTConfig` for this one changes no row, step or
    checkpoint name.

    The assignment's fixed-length windows cut from EOS-separated dialogues are a recipe choice (`packing: true`,
    `packing_strategy: wrapped` in `recipes/gpt2_hh_sft.yaml`). With `wrapped` our collator restarts positions after
    every end-of-text token, so the documents sharing a window never attend to each other
    (`alignment.training.sft.PackedDocumentsCollator`).
    """

    packing_strategy: str = field(
        default="bfd",
        metadata={
            "help": "With packing: 'bfd' packs whole documents best-fit (TRL's default), 'bfd_split' splits the "
            "overflow, 'wrapped' concatenates and cuts fixed-length windows (the assignment's recipes).",
        },
    )


@dataclass
class DPOConfig(RunFolderOptions, BatchOptions, trl.DPOConfig):
    """TRL's DPO config; the losses are ours (`alignment.training.losses`)."""

    loss_type: list[str] = field(
        default_factory=lambda: ["sigmoid"],
        metadata={"help": f"Preference loss, one of {list(LOSS_TYPES)}; several are summed with `loss_weights`."},
    )
    rpo_alpha: float | None = field(
        default=None, metadata={"help": "RPO: add this weight × the NLL of the chosen replies to the loss."}
    )
    simpo_gamma: float = field(default=0.5, metadata={"help": "SimPO's target reward margin γ."})
    ref_logps_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "With precompute_ref_log_probs: where reference log-probs are kept between runs, keyed by the "
            "data and the reference weights (default: ~/.cache/alignment/reference_logps)."
        },
    )
    prefix_sharing: bool = field(
        default=True,
        metadata={
            "help": "Run each pair as one packed sequence [prompt, chosen, rejected]: the prompt is computed once and "
            "no padding between pairs. Same log-probs as separate rows; needs a model that takes 4D attention masks."
        },
    )
    group_pairs_by_prompt: bool = field(
        default=False,
        metadata={
            "help": "With prefix_sharing: shuffle prompts rather than pairs, so that a prompt's pairs (UltraFeedback's "
            "up to 6 per prompt) come in the same batch and its prompt and replies are computed once. Changes which "
            "pairs make a batch (TRL shuffles pairs); the loss of a given batch is the same."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        unknown = [t for t in self.loss_type if t not in LOSS_TYPES]
        if unknown:
            raise ValueError(f"unknown loss_type {unknown}; choose from {list(LOSS_TYPES)}")
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0 (got {self.beta}); the DPO paper uses 0.1")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5) (got {self.label_smoothing})")
        smoothed = [t for t in self.loss_type if t in SMOOTHED_LOSS_TYPES]
        if self.label_smoothing > 0 and not smoothed:
            raise ValueError(
                f"label_smoothing is read only by {list(SMOOTHED_LOSS_TYPES)} (as in TRL, whose {self.loss_type} "
                "ignore it); for conservative DPO use loss_type: cdpo"
            )
        if "exo_pair" in self.loss_type and self.label_smoothing == 0:
            raise ValueError("loss_type exo_pair needs label_smoothing > 0 (its ε; the EXO paper uses 1e-3)")
        if self.f_divergence_type not in F_DIVERGENCE_TYPES:
            raise ValueError(f"unknown f_divergence_type {self.f_divergence_type!r}; choose from {F_DIVERGENCE_TYPES}")
        no_f_form = [t for t in self.loss_type if t not in F_DIVERGENCE_LOSS_TYPES]
        if self.f_divergence_type != "reverse_kl" and no_f_form:
            raise ValueError(
                f"f_divergence_type {self.f_divergence_type!r} has no form for loss_type {no_f_form} (as in TRL: "
                f"its log Z(x) cancels only in the reward difference); use it with {list(F_DIVERGENCE_LOSS_TYPES)}"
            )
        sorting = [t for t in self.loss_type if t in SORTING_LOSS_TYPES]
        if self.use_weighting and sorting:
            raise ValueError(f"use_weighting (WPO) cannot weight {sorting}: they sort the batch, so weights misalign")
        if self.ld_alpha is not None and not 0 <= self.ld_alpha <= 1:
            raise ValueError(f"ld_alpha must be in [0, 1] (got {self.ld_alpha}); 1 is plain DPO")
        if self.group_pairs_by_prompt and not self.prefix_sharing:
            raise ValueError(
                "group_pairs_by_prompt only pays with prefix_sharing (a prompt's pairs then share one sequence); "
                "set prefix_sharing: true or drop group_pairs_by_prompt"
            )
        if self.group_pairs_by_prompt and self.train_sampling_strategy != "random":
            raise ValueError(
                f"group_pairs_by_prompt is its own shuffle; it cannot be combined with train_sampling_strategy "
                f"{self.train_sampling_strategy!r} (keep the default 'random')"
            )
        if self.sync_ref_model and self.reference_free:
            raise ValueError(f"sync_ref_model: loss_type {self.loss_type} keeps no reference model to sync")
        if self.sync_ref_model and self.precompute_ref_log_probs:
            raise ValueError(
                "sync_ref_model updates the reference during training, which makes precomputed reference log-probs "
                "stale; set precompute_ref_log_probs: false or sync_ref_model: false"
            )

    @property
    def reference_free(self) -> bool:
        return all(t in REFERENCE_FREE_LOSS_TYPES for t in self.loss_type)
