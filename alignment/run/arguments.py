"""What a recipe says about the model and the data (the training settings are `alignment.training.configs`).

A recipe is one flat YAML mapping; each key belongs to exactly one of these classes or a training config (see
`alignment.run.recipe`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import trl

from ..data import FORMATS

GPT2_LORA_TARGETS = ["c_attn", "c_proj", "c_fc"]  # attention qkv, both output projections and the MLP input
GPT2_MODEL_TYPES = ("gpt2", "alignment_gpt2")


def default_lora_targets(model_type: str) -> list[str] | str:
    """LoRA's targets when the recipe names none: GPT-2's module names for GPT-2 models, otherwise PEFT's
    `all-linear` (every linear layer but the LM head), which fits any architecture."""
    return list(GPT2_LORA_TARGETS) if model_type in GPT2_MODEL_TYPES else "all-linear"


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
    chat_template: str | None = field(
        default=None,
        metadata={
            "help": "How conversations are written as text: 'hh' (HH-RLHF's Human:/Assistant: turns), 'chatml', a "
            "path to a Jinja file, or unset / 'tokenizer' for the tokenizer's own (GPT-2's is 'hh'). New special "
            "tokens grow the embeddings."
        },
    )
    save_format: str = field(
        default="stock",
        metadata={
            "help": "Format of the final model (and of the merged LoRA model) saved and pushed: 'stock' "
            "(transformers' GPT2LMHeadModel, loadable by every tool without remote code; lossless, and our GPT-2 "
            "class reads it back) or 'alignment' (our class, with its code). Checkpoints stay in our format.",
            "choices": ["stock", "alignment"],
        },
    )
    merge_adapter_on_save: bool = field(
        default=False,
        metadata={"help": "With LoRA, also write the base model with the adapter merged in (`<output_dir>/merged`)."},
    )
    hub_license: str | None = field(
        default=None,
        metadata={
            "help": "The model card's license (a Hub license id, e.g. 'apache-2.0'); when unset, 'mit' for models "
            "descending from OpenAI's GPT-2 weights, else none is claimed."
        },
    )

    def __post_init__(self) -> None:
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
            "help": "Shape of the data; detected from the columns and value types when unset.",
            "choices": list(FORMATS),
        },
    )
    dataset_train_split: str = field(default="train", metadata={"help": "Split of `dataset_name` to train on."})
    dataset_test_split: str | None = field(
        default=None,
        metadata={"help": "The source's own held-out split (e.g. 'test'); when unset, `test_size` is carved out."},
    )
    datasets: list[dict[str, Any]] = field(
        default_factory=list,
        metadata={
            "help": "A mixture: entries with TRL's fields (path, name, data_dir, data_files, split, columns, "
            "fraction: the entry's share of the mixture) and ours (subsample: a random share of the entry's rows, "
            "format, test_split: its own held-out split)."
        },
    )
    dataset_mixture: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "The alignment-handbook's mixture: {datasets: [{id, config, split, columns, weight}], seed, "
            "test_split_size}; weight keeps that share of the entry's rows (a JSON string on the CLI)."
        },
    )
    test_size: float = field(
        default=0.05, metadata={"help": "Held-out share (< 1) or row count (>= 1) when a source has no test split."}
    )
    test_split_size: float | None = field(
        default=None, metadata={"help": "TRL's name for test_size; when set, it is the one used."}
    )
    dataset_seed: int | None = field(
        default=None,
        metadata={"help": "Seed for subsampling, shuffling and holding out rows (default: the training seed)."},
    )
    max_prompt_length: int | None = field(
        default=None,
        metadata={"help": "Drop pairs whose prompt is longer than this many tokens (default: max_length - 1)."},
    )

    def __post_init__(self) -> None:
        if isinstance(self.datasets, str):
            self.datasets = json.loads(self.datasets)
        if isinstance(self.dataset_mixture, str):
            self.dataset_mixture = json.loads(self.dataset_mixture)
        if self.dataset_mixture is not None:
            if self.datasets:
                raise ValueError("set datasets or dataset_mixture, not both")
            self.datasets, seed, test_split_size = handbook_mixture(self.dataset_mixture)
            self.dataset_seed = seed if self.dataset_seed is None else self.dataset_seed
            self.test_split_size = test_split_size if self.test_split_size is None else self.test_split_size
        if self.test_split_size is not None:
            self.test_size = self.test_split_size
        if self.dataset_name is None and not self.datasets:
            raise ValueError("set dataset_name (one dataset), datasets or dataset_mixture (a mixture)")

    def specs(self) -> list[dict[str, Any]]:
        """The mixture as `alignment.data.DatasetSpec` mappings."""
        if self.datasets:
            return [dict(entry) for entry in self.datasets]
        spec = {"path": self.dataset_name, "split": self.dataset_train_split, "format": self.dataset_format}
        if self.dataset_config is not None:
            spec["name"] = self.dataset_config
        if self.dataset_test_split is not None:
            spec["test_split"] = self.dataset_test_split
        return [spec]


HANDBOOK_ENTRY_KEYS = {"id": "path", "config": "name", "split": "split", "columns": "columns", "weight": "subsample"}


def handbook_mixture(mixture: dict[str, Any]) -> tuple[list[dict[str, Any]], int | None, float | None]:
    """The handbook's `dataset_mixture` as our `datasets` entries, its seed and its test_split_size."""
    if not isinstance(mixture, dict):
        raise ValueError(
            f"dataset_mixture must be a mapping {{datasets: [...], seed, test_split_size}}, got {mixture!r}"
        )
    unknown = sorted(set(mixture) - {"datasets", "seed", "test_split_size"})
    if unknown:
        raise ValueError(f"unknown dataset_mixture keys {unknown}; expected datasets, seed, test_split_size")
    entries = []
    for entry in mixture.get("datasets") or []:
        unknown = sorted(set(entry) - set(HANDBOOK_ENTRY_KEYS))
        if unknown or "id" not in entry:
            raise ValueError(
                f"dataset_mixture entry {entry}: expected keys {sorted(HANDBOOK_ENTRY_KEYS)} with an id"
                + (f" (unknown: {unknown})" if unknown else "")
            )
        entries.append({HANDBOOK_ENTRY_KEYS[k]: v for k, v in entry.items() if v is not None})
    if not entries:
        raise ValueError("dataset_mixture has no datasets")
    return entries, mixture.get("seed"), mixture.get("test_split_size")
