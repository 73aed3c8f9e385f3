"""Direct Preference Optimization: TRL's `DPOTrainer` with the log-prob and loss computations owned here.

A reply's log-probability is the sum, over the reply's tokens only, of log_softmax(logits)[true next token]
(the assignment's eq. 10; the prompt's terms would cancel in the loss). The losses are in `alignment.losses`.

TRL provides the rest: tokenisation, the collator (each batch is [chosen rows; rejected rows]), precomputed
reference log-probs, PEFT, distributed training and logging. Our changes beyond the computation:

* with no reference model given, the reference is a frozen copy of the starting policy (TRL would reload it by name,
  which fails for a model built in memory); with LoRA it is the base model with the adapter disabled;
* reference-free losses (SimPO) keep no reference at all.
"""

from __future__ import annotations

import contextlib
import copy

import torch
import trl
from accelerate.utils import is_peft_model
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import use_adapter

from ..configs import DPOConfig
from ..logprobs import IGNORE_INDEX, add_logprob_head
from ..losses import PreferenceLoss, ReplyLogps, chosen_nll, preference_loss


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    reference = copy.deepcopy(model).eval()
    reference.requires_grad_(False)
    return reference


class DPOTrainer(trl.DPOTrainer):
    """TRL's DPO trainer; see the module docstring for what is ours."""

    def __init__(self, model, ref_model=None, args: DPOConfig | None = None, *, peft_config=None, **kwargs):
        if args is None:
            raise ValueError("pass a DPOConfig (alignment.configs.DPOConfig)")
        uses_adapter = peft_config is not None or is_peft_model(model)
        builds_reference = not (uses_adapter or args.precompute_ref_log_probs or isinstance(model, str))
        if ref_model is None and builds_reference:
            ref_model = frozen_copy(model)
        super().__init__(model, ref_model, args, peft_config=peft_config, **kwargs)
        if args.reference_free:
            self.ref_model = None
        add_logprob_head(self.model.get_base_model() if is_peft_model(self.model) else self.model)
        if self.ref_model is not None:
            add_logprob_head(self.accelerator.unwrap_model(self.ref_model))

    # --- log-probs -----------------------------------------------------------------------------------------------

    @staticmethod
    def reply_mask(inputs) -> torch.Tensor:
        """Which next-token positions belong to a reply: (2B, T-1), aligned with the token log-probs."""
        return inputs["completion_mask"][:, 1:].bool()

    def token_logps(self, model, inputs) -> torch.Tensor:
        """(2B, T-1) log-probs of the reply tokens, 0 elsewhere; rows are [chosen; rejected]."""
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, IGNORE_INDEX)
        return model(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=labels, token_logps=True
        )

    @staticmethod
    def reply_logps(token_logps: torch.Tensor, reply_mask: torch.Tensor) -> ReplyLogps:
        sums = (token_logps * reply_mask).sum(-1)
        lengths = reply_mask.sum(-1)
        chosen, rejected = sums.chunk(2)
        chosen_length, rejected_length = lengths.chunk(2)
        return ReplyLogps(chosen, rejected, chosen_length, rejected_length)

    def reference_context(self):
        """No gradients, no checkpointing; with LoRA and no reference model, the adapter is switched off."""
        stack = contextlib.ExitStack()
        stack.enter_context(torch.no_grad())
        stack.enter_context(disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs))
        if self.ref_model is None and is_peft_model(self.model):
            peft_model = self.accelerator.unwrap_model(self.model)
            stack.enter_context(use_adapter(peft_model, adapter_name="ref" if "ref" in peft_model.peft_config else None))
        return stack

    def reference_logps(self, inputs) -> ReplyLogps:
        mask = self.reply_mask(inputs)
        lengths = mask.sum(-1).chunk(2)
        if "ref_chosen_logps" in inputs:  # precomputed once before training
            return ReplyLogps(inputs["ref_chosen_logps"], inputs["ref_rejected_logps"], *lengths)
        with self.reference_context():
            token_logps = self.token_logps(self.ref_model if self.ref_model is not None else self.model, inputs)
        return self.reply_logps(token_logps, mask)

    def compute_ref_log_probs(self, model, inputs):
        """TRL's hook for `precompute_ref_log_probs`: summed reference log-probs of the chosen and rejected replies."""
        with self.reference_context():
            logps = self.reply_logps(self.token_logps(model, inputs), self.reply_mask(inputs))
        return logps.chosen, logps.rejected

    # --- loss ----------------------------------------------------------------------------------------------------

    def _compute_loss(self, model, inputs, return_outputs=False):
        mode = "train" if self.model.training else "eval"
        mask = self.reply_mask(inputs)
        token_logps = self.token_logps(model, inputs)
        policy = self.reply_logps(token_logps, mask)
        reference = None if self.args.reference_free else self.reference_logps(inputs)

        weights = self.args.loss_weights or [1.0] * len(self.args.loss_type)
        terms = [
            preference_loss(
                policy,
                reference,
                beta=self.beta,
                loss_type=loss_type,
                label_smoothing=self.args.label_smoothing,
                simpo_gamma=self.args.simpo_gamma,
            )
            for loss_type in self.args.loss_type
        ]
        loss = sum(weight * term.loss for weight, term in zip(weights, terms, strict=True))
        if self.args.rpo_alpha is not None:
            nll = chosen_nll(*(t.chunk(2)[0] for t in (token_logps, mask)))
            loss = loss + self.args.rpo_alpha * nll
            self._metrics[mode]["nll_loss"].append(self.accelerator.gather_for_metrics(nll.detach()).mean().item())
        self.record_metrics(mode, terms[0], policy, inputs)
        if return_outputs:
            with torch.no_grad():
                return loss, model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        return loss

    def record_metrics(self, mode: str, result: PreferenceLoss, policy: ReplyLogps, inputs) -> None:
        """TRL's metric names, averaged over all processes."""

        def mean(values: torch.Tensor) -> float:
            return self.accelerator.gather_for_metrics(values.detach()).float().mean().item()

        self._metrics[mode]["rewards/chosen"].append(mean(result.chosen_rewards))
        self._metrics[mode]["rewards/rejected"].append(mean(result.rejected_rewards))
        self._metrics[mode]["rewards/accuracies"].append(mean(result.accuracy))
        self._metrics[mode]["rewards/margins"].append(mean(result.margin))
        self._metrics[mode]["logps/chosen"].append(mean(policy.chosen))
        self._metrics[mode]["logps/rejected"].append(mean(policy.rejected))
        if mode == "train":
            tokens = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += tokens
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
