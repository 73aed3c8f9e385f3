"""The dataclasses a recipe fills: model, data, and TRL's training configs extended with our fields.

A recipe is one flat YAML mapping; each key belongs to exactly one of these classes (see `alignment.recipe`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import trl

from .losses import LOSS_TYPES, REFERENCE_FREE_LOSS_TYPES

def fit_to_machine(config: trl.SFTConfig | trl.DPOConfig) -> None:
    """Defaults that work on the machine at hand.

    TRL turns bf16 on when unset, which fails without a bf16 GPU: there, default to fp32. And accelerate's multi-GPU
    launcher, which is how several processes start on a machine without GPUs, does not pass `use_cpu` on to them:
    without it they never join one process group and each trains alone, so set it here.
    """
    if config.bf16 is None:
        config.bf16 = not config.fp16 and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        config.use_cpu = True


GPT2_LORA_TARGETS = ["c_attn", "c_proj", "c_fc"]  # attention qkv, both output projections and the MLP input


@dataclass
class ModelArguments(trl.ModelConfig):
    """TRL's model options (checkpoint, dtype, LoRA) plus how to build a model without a checkpoint."""

    model_config: str | None = field(
        default=None,
        metadata={
            "help": "Start from random weights with this config when `model_name_or_path` is not set: a GPT-2 "
            "preset ('gpt2', 'gpt2/dropout', 'gpt2-medium', ...) or a folder/Hub id holding a config.json."
        },
    )
    model_config_overrides: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": "Config fields to override, e.g. {n_layer: 4, n_embd: 256} (a JSON string on the CLI)."},
    )
    model_implementation: str = field(
        default="alignment",
        metadata={
            "help": "'alignment': GPT-2 checkpoints (ours or the official ones) load into our GPT-2 class; "
            "'transformers': whatever AutoModelForCausalLM gives.",
            "choices": ["alignment", "transformers"],
        },
    )
    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Tokenizer folder or Hub id; defaults to the checkpoint's, else GPT-2's."},
    )
    merge_adapter_on_save: bool = field(
        default=False,
        metadata={"help": "With LoRA, also write the base model with the adapter merged in (`<output_dir>/merged`)."},
    )

    def __post_init__(self) -> None:
        if self.use_peft and not self.lora_target_modules:
            self.lora_target_modules = list(GPT2_LORA_TARGETS)
        if isinstance(self.model_config_overrides, str):
            self.model_config_overrides = json.loads(self.model_config_overrides)
        super().__post_init__()
        if self.model_name_or_path is None and self.model_config is None:
            raise ValueError("set model_name_or_path (a checkpoint) or model_config (random weights from a config)")


@dataclass
class DataArguments:
    """Where the data comes from: one source (`dataset_name`) or a mixture (`datasets`)."""

    dataset_name: str | None = field(
        default=None, metadata={"help": "Hub id or local file/folder of the one dataset to use."}
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub config (subset) of `dataset_name`."})
    dataset_format: str | None = field(
        default=None,
        metadata={
            "help": "Shape of the data; detected from the columns when unset.",
            "choices": ["hh", "rm-static", "stack-exchange", "preference", "prompt-completion", "text"],
        },
    )
    dataset_train_split: str = field(default="train", metadata={"help": "Split of `dataset_name` to train on."})
    dataset_test_split: str | None = field(
        default=None,
        metadata={"help": "The source's own held-out split (e.g. 'test'); when unset, `test_size` is carved out."},
    )
    datasets: list[dict[str, Any]] = field(
        default_factory=list,
        metadata={"help": "A mixture: entries with path, split, fraction, format, name, data_dir, eval_split."},
    )
    test_size: float = field(
        default=0.05, metadata={"help": "Held-out share (< 1) or row count (>= 1) when a source has no test split."}
    )
    max_prompt_length: int | None = field(
        default=None,
        metadata={"help": "Drop pairs whose prompt is longer than this many tokens (default: max_length - 1)."},
    )

    def __post_init__(self) -> None:
        if isinstance(self.datasets, str):
            self.datasets = json.loads(self.datasets)
        if self.dataset_name is None and not self.datasets:
            raise ValueError("set dataset_name (one dataset) or datasets (a mixture)")

    def specs(self) -> list[dict[str, Any]]:
        """The mixture as `alignment.data.DatasetSpec` mappings."""
        if self.datasets:
            return [dict(entry) for entry in self.datasets]
        spec = {"path": self.dataset_name, "split": self.dataset_train_split, "format": self.dataset_format}
        if self.dataset_config is not None:
            spec["name"] = self.dataset_config
        if self.dataset_test_split is not None:
            spec["eval_split"] = self.dataset_test_split
        return [spec]


@dataclass
class SFTConfig(trl.SFTConfig):
    """TRL's SFT config with the assignment's defaults: fixed-length windows cut from EOS-separated dialogues.

    With `packing_strategy: wrapped` our collator restarts positions after every end-of-text token, so the
    documents sharing a window never attend to each other (`alignment.trainers.sft.PackedDocumentsCollator`).
    """

    packing: bool = field(default=True, metadata={"help": "Pack documents into rows of `max_length` tokens."})
    packing_strategy: str = field(
        default="wrapped",
        metadata={
            "help": "'wrapped': concatenate and cut into fixed-length windows (the assignment); 'bfd': whole "
            "documents packed best-fit.",
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start a new run in an output_dir that already holds one (its checkpoints are deleted)."},
    )

    def __post_init__(self) -> None:
        fit_to_machine(self)
        super().__post_init__()


@dataclass
class DPOConfig(trl.DPOConfig):
    """TRL's DPO config; the losses are ours (`alignment.losses`)."""

    loss_type: list[str] = field(
        default_factory=lambda: ["sigmoid"],
        metadata={"help": f"Preference loss, one of {list(LOSS_TYPES)}; several are summed with `loss_weights`."},
    )
    rpo_alpha: float | None = field(
        default=None, metadata={"help": "RPO: add this weight × the NLL of the chosen replies to the loss."}
    )
    simpo_gamma: float = field(default=0.5, metadata={"help": "SimPO's target reward margin γ."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start a new run in an output_dir that already holds one (its checkpoints are deleted)."},
    )
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
        fit_to_machine(self)
        super().__post_init__()
        unknown = [t for t in self.loss_type if t not in LOSS_TYPES]
        if unknown:
            raise ValueError(f"unknown loss_type {unknown}; choose from {list(LOSS_TYPES)}")
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0 (got {self.beta}); the DPO paper uses 0.1")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5) (got {self.label_smoothing})")
        unsupported = {
            "ld_alpha": self.ld_alpha is not None,
            "use_weighting": self.use_weighting,
            "f_divergence_type": self.f_divergence_type != "reverse_kl",
            "sync_ref_model": self.sync_ref_model,
        }
        if any(unsupported.values()):
            names = [name for name, is_set in unsupported.items() if is_set]
            raise ValueError(f"{names} are TRL options our DPO trainer does not implement; unset them")

    @property
    def reference_free(self) -> bool:
        return all(t in REFERENCE_FREE_LOSS_TYPES for t in self.loss_type)
