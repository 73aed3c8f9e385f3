"""TRL's SFT and DPO configs, extended with the fields our trainers read; documented like TRL's own.

Machine-dependent defaults (bf16 only where a bf16 GPU is, CPU process groups) are not set here: `alignment.run`
gives them to the recipe parser once, so these classes behave exactly like TRL's when built from Python.
"""

from __future__ import annotations

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


@dataclass
class SFTConfig(RunFolderOptions, trl.SFTConfig):
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
class DPOConfig(RunFolderOptions, trl.DPOConfig):
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
