"""What a recipe says about the model and the data (the training settings are `alignment.training.configs`).

A recipe is one flat YAML mapping; each key belongs to exactly one of these classes or a training config (see
`alignment.run.recipe`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import trl

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
