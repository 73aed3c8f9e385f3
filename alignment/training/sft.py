"""Supervised fine-tuning: TRL's `SFTTrainer` with the assignment's objective and our log-prob head.

The objective is next-token cross-entropy over the scored tokens of a batch,

    loss = − Σ_t log p(x_{t+1} | x_{≤t}) / (number of scored tokens),

(with `loss_type: dft`, each term weighted by p(x_{t+1} | x_{≤t}) without gradient, as TRL's DFT),

where a token is scored when it has context in its own document: in fixed-length windows cut from EOS-separated
dialogues, every token but the first of each document (with `completion_only_loss`, only the reply tokens).
Documents sharing a window never attend to each other and their positions restart.

The options that need the full logits or the model's own outputs (`compute_loss_func`, `label_smoothing_factor`,
the MoE router auxiliary loss) run TRL's own loss computation instead, said in one log line. The logged metrics are
TRL's: `num_tokens`, `entropy`, `mean_token_accuracy` (and `aux_loss` on TRL's path).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import trl
from accelerate.utils import is_peft_model
from transformers import AutoProcessor
from trl.data_utils import get_dataset_column_names
from trl.trainer.utils import get_config_model_id

from ..modeling.tokenizer import ensure_pad_token
from .logprobs import IGNORE_INDEX, add_logprob_head
from .safety import SafeTrainingMixin
from .sharding import ShardingMixin

logger = logging.getLogger(__name__)


@dataclass
class PackedDocumentsCollator:
    """Stack fixed-length windows of EOS-separated documents; positions restart after every EOS.

    Returns `input_ids`, `position_ids` and `labels` (no attention mask: the model derives the document boundaries
    from the restarting positions). The first token of each document has no context and is not scored; nor is
    padding, which only the last, shorter window needs.
    """

    eos_token_id: int
    pad_token_id: int

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        length = max(len(example["input_ids"]) for example in examples)
        input_ids = torch.full((len(examples), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        real = torch.zeros_like(input_ids, dtype=torch.bool)
        for row, example in enumerate(examples):
            n = len(example["input_ids"])
            input_ids[row, :n] = torch.tensor(example["input_ids"])
            labels[row, :n] = torch.tensor(example.get("labels", example["input_ids"]))
            real[row, :n] = True
        position_ids = positions_restarting_after(input_ids, self.eos_token_id, real)
        labels[(position_ids == 0) | ~real] = IGNORE_INDEX
        return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}


def positions_restarting_after(input_ids: torch.Tensor, eos_token_id: int, real: torch.Tensor) -> torch.Tensor:
    """Position of each token within its document; a document starts after an EOS. Padding gets position 0."""
    starts = torch.zeros_like(input_ids, dtype=torch.bool)
    starts[:, 0] = True
    starts[:, 1:] = input_ids[:, :-1] == eos_token_id
    starts |= ~real
    index = torch.arange(input_ids.size(1)).expand_as(input_ids)
    start_index = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=-1).values
    return index - start_index


class SFTTrainer(SafeTrainingMixin, ShardingMixin, trl.SFTTrainer):
    """TRL's SFT trainer; the loss is computed here, from log-probs taken only at scored positions. Safe to stop,
    and stops on a non-finite loss (`SafeTrainingMixin`)."""

    def __init__(self, model, args=None, data_collator=None, train_dataset=None, *, processing_class=None, **kwargs):
        wrapped = getattr(args, "packing", False) and getattr(args, "packing_strategy", None) == "wrapped"
        if processing_class is None and data_collator is None and wrapped:  # as TRL: the model's own tokenizer
            name = model if isinstance(model, str) else get_config_model_id(model.config)
            processing_class = AutoProcessor.from_pretrained(name, trust_remote_code=args.trust_remote_code)
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        if data_collator is None and wrapped:
            data_collator = PackedDocumentsCollator(tokenizer.eos_token_id, ensure_pad_token(tokenizer).pad_token_id)
        super().__init__(
            model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        add_logprob_head(self.model.get_base_model() if is_peft_model(self.model) else self.model)
        self.trl_loss_for = [
            name
            for name, asked in (
                ("compute_loss_func", self.compute_loss_func is not None),
                ("label_smoothing_factor", self.label_smoother is not None),
                ("the MoE router auxiliary loss", getattr(self, "aux_loss_enabled", False)),
            )
            if asked
        ]
        if self.trl_loss_for:
            logger.warning(
                "SFT loss: TRL's own computation (not this package's log-prob head), for %s",
                ", ".join(self.trl_loss_for),
            )

    def _reject_skip_prepare_without_labels(self, datasets, data_collator) -> None:
        """TRL refuses mask columns without labels when preparation is skipped (training would use every token),
        but only for its own collator; ours builds labels from the same columns, so the same refusal holds."""
        super()._reject_skip_prepare_without_labels(datasets, data_collator)
        if not (self._skip_prepare_dataset and isinstance(data_collator, PackedDocumentsCollator)):
            return
        for name, dataset in datasets.items():
            columns = get_dataset_column_names(dataset)
            if "labels" not in columns and ("completion_mask" in columns or "assistant_masks" in columns):
                raise ValueError(
                    f"The {name} dataset has mask columns but no 'labels', and `skip_prepare_dataset=True` skips "
                    "label building, so it would train on the full sequence. Add a 'labels' column (-100 for "
                    "non-loss tokens) or drop `skip_prepare_dataset`."
                )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.trl_loss_for:
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        mode = "train" if self.model.training else "eval"
        labels = inputs["labels"]
        model_inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "position_ids")}
        uniform = self.args.loss_type != "dft" and torch.is_grad_enabled()  # the mean NLL weighs tokens alike
        token_logps, stats = model(
            **model_inputs, labels=labels, token_logps="with_stats", uniform_token_weights=uniform
        )
        per_token = -token_logps
        if self.args.loss_type == "dft":  # Wu et al., 2025 (https://huggingface.co/papers/2508.05629)
            per_token = per_token * token_logps.exp().detach()
        scored_tokens = stats.scored.sum()
        denominator = scored_tokens if num_items_in_batch is None else num_items_in_batch
        loss = per_token.sum() / torch.as_tensor(denominator, device=token_logps.device).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients; the count spans all ranks

        if mode == "train":
            tokens = inputs["attention_mask"].sum() if "attention_mask" in inputs else torch.tensor(labels.numel())
            self._total_train_tokens += self.accelerator.gather_for_metrics(tokens.to(labels.device)).sum().item()
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        scored = self.accelerator.gather_for_metrics(stats.scored.sum()).sum()
        entropy = self.accelerator.gather_for_metrics(stats.entropy.sum()).sum()
        correct = self.accelerator.gather_for_metrics(stats.is_top1.sum()).sum()
        self._metrics[mode]["entropy"].append((entropy / scored).item() if scored > 0 else 0.0)
        self._metrics[mode]["mean_token_accuracy"].append((correct / scored).item() if scored > 0 else 0.0)
        if return_outputs:
            with torch.no_grad():
                return loss, model(**model_inputs)
        return loss
