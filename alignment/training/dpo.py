"""Direct Preference Optimization: TRL's `DPOTrainer` with the log-prob and loss computations owned here.

A reply's log-probability is the sum, over the reply's tokens only, of log_softmax(logits)[true next token]
(the assignment's eq. 10; the prompt's terms would cancel in the loss). The losses are in `losses.py`.

TRL provides the rest: tokenisation, precomputed reference log-probs, PEFT, distributed training and logging. Our
changes beyond the computation:

* batches share each prompt between its replies (a pair's two, or all of a prompt's pairs in the batch, each
  distinct reply once) and pack them into short rows, and a model that takes those rows apart from its tokens (our
  GPT-2; a transformers model on sdpa, moved onto our kernel when a probe finds it exact) is given no padding at
  all (`shared_prefix.py`, `layouts.use_padding_free_attention`); `group_pairs_by_prompt` shuffles
  prompts rather than pairs, so that a prompt's pairs come in the same batch;
  `prefix_sharing: false` gives TRL's layout, [chosen rows; rejected rows], each padded, and so does a model whose
  token mixers would not keep the replies apart (`layouts.prefix_sharing_problem`, with one log line saying why);
* with no reference model given, the reference is a frozen copy of the starting policy (TRL would reload it by name,
  which fails for a model built in memory), or, where its weights are partitioned (ZeRO-3's `zero.Init`, FSDP's
  RAM-efficient loading), reloaded by name as TRL does (`starting_reference`); with LoRA it is the base model with
  the adapter disabled;
* reference-free losses (SimPO) keep no reference at all;
* a Mixture-of-Experts model whose config declares a router auxiliary loss gets TRL's own loss computation, on
  TRL's rows, with that loss added as TRL adds it (said in one log line);
* `compute_metrics` gets the logits of TRL's rows (prefix sharing is then off, with one log line);
* it is safe to stop and stops on a non-finite loss (`SafeTrainingMixin`), whether run from a script or Python.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from pathlib import Path

import torch
import trl
from accelerate.utils import is_peft_model
from datasets import Dataset
from safetensors.torch import load_model, save_model
from transformers import AutoProcessor
from transformers.integrations import is_deepspeed_zero3_enabled
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import create_model_from_path, get_config_model_id, use_adapter

from ..modeling.hf_attention import ATTN_IMPLEMENTATION
from ..modeling.tokenizer import ensure_pad_token
from .checkpoints import CheckpointError
from .configs import DPOConfig
from .layouts import ScoredTokens, prefix_sharing_problem, score_batch, use_padding_free_attention
from .logprobs import add_logprob_head
from .losses import TRL_LOSS_TYPES, PreferenceLoss, ReplyLogps, preference_loss
from .reference_cache import cache_path, load_reference_logps, save_reference_logps, token_ids_digest
from .safety import SafeTrainingMixin
from .sharding import ShardingMixin
from .shared_prefix import PromptGroupedSampler, SharedPrefixPreferenceCollator

logger = logging.getLogger(__name__)
SYNCED_REFERENCE_FILE = "synced_reference.safetensors"  # TR-DPO's reference, in every checkpoint


def load_as_trl_does(model_id: str, args: DPOConfig, quantization_config=None) -> torch.nn.Module:
    """The policy named by a Hub id or folder, loaded with `model_init_kwargs` as `trl.DPOTrainer` loads it."""
    init_kwargs = dict(args.model_init_kwargs or {})
    if quantization_config is not None:
        if "quantization_config" in init_kwargs:
            raise ValueError("quantization_config is set both as a trainer argument and in model_init_kwargs; keep one")
        init_kwargs["quantization_config"] = quantization_config
    if args.distributed_state.distributed_type in ("MULTI_GPU", "DEEPSPEED"):
        init_kwargs["device_map"] = None  # distributed training needs it ("auto" fails)
    init_kwargs.setdefault("trust_remote_code", args.trust_remote_code)
    return create_model_from_path(model_id, **init_kwargs)


def padding_free_attention(model: torch.nn.Module, ref_model) -> bool:
    """Whether the policy and its reference take padding-free shared-prefix batches (`use_padding_free_attention`:
    our GPT-2 does; a transformers model on sdpa is moved onto our kernel if a probe finds it exact, said in one log
    line). Where either cannot, both keep their implementation and the batches their padding, also said."""
    models = [m for m in (model, ref_model) if isinstance(m, torch.nn.Module)]
    bases = [m.get_base_model() if is_peft_model(m) else m for m in models]
    before = [getattr(base.config, "_attn_implementation", None) for base in bases]
    problem = None
    for base in bases:
        problem = problem or use_padding_free_attention(base)
    if problem is not None:
        for base, implementation in zip(bases, before):
            if getattr(base.config, "_attn_implementation", implementation) != implementation:
                base.set_attn_implementation(implementation)
        logger.warning("shared-prefix batches keep their padding: %s", problem)
        return False
    if any(getattr(base.config, "_attn_implementation", None) != old for base, old in zip(bases, before)):
        logger.info(
            "attention: attn_implementation=%r (PyTorch's SDPA underneath, as for 'sdpa'), so that shared-prefix "
            "batches carry no padding through the model (a probe found the log-probs equal)",
            ATTN_IMPLEMENTATION,
        )
    return True


def router_aux_loss_coef(model: torch.nn.Module, args: DPOConfig) -> float:
    """The weight TRL gives a Mixture-of-Experts model's router auxiliary loss (0: none), by TRL's rule."""
    config = model.config.get_text_config()
    coef = args.router_aux_loss_coef
    coef = getattr(config, "router_aux_loss_coef", 0.0) if coef is None else coef
    return coef if hasattr(config, "output_router_logits") else 0.0


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The reference policy: a copy of the starting policy, in eval mode, with no gradients."""
    reference = copy.deepcopy(model).eval()
    reference.requires_grad_(False)
    return reference


def weights_partitioned(model: torch.nn.Module) -> bool:
    """Whether this process holds only part of the model's weights: the empty placeholders of DeepSpeed ZeRO-3's
    `zero.Init` (parameters with a `ds_id`, their data in `ds_tensor`), or the meta tensors of FSDP's RAM-efficient
    loading on the processes other than the first. A copy of such a model copies nothing."""
    return any(hasattr(p, "ds_id") or p.is_meta for p in model.parameters())


def starting_reference(model: torch.nn.Module, args: DPOConfig) -> torch.nn.Module:
    """The reference policy: a frozen copy of the starting policy when its weights are whole (`frozen_copy`); when
    they are partitioned, the same model reloaded from its folder or Hub id, as TRL does, with the policy's class,
    dtype and attention and `model_init_kwargs`, and checked against the policy's own weights (as far as this
    process holds them), so that it is partitioned the same way (and prepared for the engine by TRL)."""
    if not weights_partitioned(model):
        return frozen_copy(model)
    path = get_config_model_id(model.config)
    if not path:
        raise ValueError(
            "the DPO reference is the starting policy, whose weights are partitioned here (DeepSpeed ZeRO-3's "
            "zero3_init_flag or FSDP's cpu_ram_efficient_loading) and which has no folder or Hub id to reload them "
            "from; load the model from a saved folder (model_name_or_path), or turn that loading option off"
        )
    init_kwargs = dict(args.model_init_kwargs or {})
    if args.distributed_state.distributed_type in ("MULTI_GPU", "DEEPSPEED"):
        init_kwargs["device_map"] = None  # distributed training needs it ("auto" fails)
    init_kwargs.setdefault("trust_remote_code", args.trust_remote_code)
    init_kwargs.setdefault("dtype", model.dtype)
    init_kwargs.setdefault("attn_implementation", model.config._attn_implementation)
    reference = create_model_from_path(path, architecture=type(model), **init_kwargs)
    differs = first_difference(model, reference)
    if differs is not None:
        raise ValueError(
            f"the DPO reference reloaded from {path} is not the starting policy ({differs}): the policy was built or "
            "changed in memory (a model_config, resized embeddings); save it to a folder and load it from there"
        )
    logger.info("DPO reference reloaded from %s (the policy's weights are partitioned: no copy)", path)
    reference.eval().requires_grad_(False)
    return reference


def first_difference(policy: torch.nn.Module, reference: torch.nn.Module) -> str | None:
    """The first parameter in which a reloaded reference differs from the policy, as far as this process holds
    both (ZeRO-3: its partitions; meta tensors: shapes only), or None. Under ZeRO-3 every process reloads, so the
    processes agree on the answer and fail together rather than leave the others waiting."""
    ours, theirs = dict(policy.named_parameters()), dict(reference.named_parameters())
    problem = None
    if ours.keys() != theirs.keys():
        problem = f"parameters {sorted(ours.keys() ^ theirs.keys())[:3]} are in one model only"
    for name, p in ours.items() if problem is None else ():
        r = theirs[name]
        p_data, r_data = getattr(p, "ds_tensor", p), getattr(r, "ds_tensor", r)
        p_shape, r_shape = tuple(getattr(p, "ds_shape", p.shape)), tuple(getattr(r, "ds_shape", r.shape))
        if hasattr(p, "ds_tensor") and not hasattr(r, "ds_tensor") and not r.is_meta:
            r_data = zero3_partition(r, p_data.numel())  # a whole reference: the part this process holds of p
        if p_shape != r_shape or p.dtype != r.dtype:
            problem = f"{name} is {r_shape} {r.dtype}, not {p_shape} {p.dtype}"
        elif p_data.is_meta or r_data.is_meta or (hasattr(r, "ds_tensor") and not hasattr(p, "ds_tensor")):
            continue  # nothing (comparable) held here
        elif not torch.equal(p_data.detach().cpu(), r_data.detach().cpu()):
            problem = f"{name} holds other values"
        if problem is not None:
            break
    first = next(policy.parameters(), None)
    if hasattr(first, "ds_id") and torch.distributed.is_initialized():
        flag = torch.tensor([float(problem is not None)], device=first.ds_tensor.device)  # NCCL: on the GPU
        torch.distributed.all_reduce(flag)
        if flag.item() and problem is None:
            problem = "another process found a difference"
    return problem


def zero3_partition(tensor: torch.Tensor, size: int) -> torch.Tensor:
    """This process's part of a whole tensor as ZeRO-3 partitions it: its rank's `size` elements of the flattened
    tensor, zero-padded to a multiple of the world size."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    flat = tensor.detach().flatten()[rank * size : (rank + 1) * size]
    return torch.cat([flat, flat.new_zeros(size - flat.numel())])


class DPOTrainer(SafeTrainingMixin, ShardingMixin, trl.DPOTrainer):
    """TRL's DPO trainer; see the module docstring for what is ours, and `SafeTrainingMixin` for its safety."""

    def __init__(
        self,
        model,
        ref_model=None,
        args: DPOConfig | None = None,
        *,
        peft_config=None,
        data_collator=None,
        processing_class=None,
        **kwargs,
    ):
        if args is None:  # as TRL: the defaults, writing to "<model name>-DPO"
            model_name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = DPOConfig(f"{model_name.split('/')[-1]}-DPO")
        if isinstance(model, str):  # TRL's most common form: load it here, as TRL would, so the heads can go on
            model = load_as_trl_does(model, args, kwargs.pop("quantization_config", None))
        if processing_class is None:  # as TRL: the model's own tokenizer
            processing_class = AutoProcessor.from_pretrained(
                get_config_model_id(model.config), trust_remote_code=args.trust_remote_code
            )
        uses_adapter = peft_config is not None or is_peft_model(model)
        builds_reference = not (uses_adapter or args.precompute_ref_log_probs or isinstance(model, str))
        if ref_model is None and builds_reference:
            ref_model = starting_reference(model, args)
        # TRL may compute reference log-probs inside its __init__, so the heads go on first (and under any adapter)
        for module in (model, ref_model):
            if isinstance(module, torch.nn.Module):
                add_logprob_head(module.get_base_model() if is_peft_model(module) else module)
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        self.prefix_sharing = data_collator is None and args.prefix_sharing
        if self.prefix_sharing and isinstance(model, torch.nn.Module) and router_aux_loss_coef(model, args):
            logger.warning("prefix_sharing is off: the MoE router auxiliary loss is TRL's, on TRL's rows")
            self.prefix_sharing = False
        if self.prefix_sharing and kwargs.get("compute_metrics") is not None:
            logger.warning(
                "prefix_sharing is off: compute_metrics is given the logits of TRL's [chosen; rejected] rows"
            )
            self.prefix_sharing = False
        if self.prefix_sharing and isinstance(model, torch.nn.Module):
            problem = prefix_sharing_problem(model, args.max_length)
            if problem is not None:
                logger.warning("prefix_sharing is off for this model: %s; pairs use TRL's layout", problem)
                self.prefix_sharing = False
        if args.group_pairs_by_prompt and not self.prefix_sharing:
            logger.warning("group_pairs_by_prompt is off: without prefix sharing a prompt's pairs share nothing")
        if args.group_pairs_by_prompt and isinstance(kwargs.get("train_dataset"), torch.utils.data.IterableDataset):
            raise ValueError(
                "group_pairs_by_prompt needs a map-style dataset: an iterable one is read in its own order; drop "
                "group_pairs_by_prompt (or streaming)"
            )
        if self.prefix_sharing:
            data_collator = SharedPrefixPreferenceCollator(
                ensure_pad_token(tokenizer).pad_token_id,
                args.max_length,
                padding_free=isinstance(model, torch.nn.Module) and padding_free_attention(model, ref_model),
            )
            # accelerate's dispatcher (its default for an iterable dataset) would cut every tensor of a batch to the
            # first one's length, which packed rows do not share: each process collates its own batches instead
            if args.accelerator_config.dispatch_batches:
                logger.warning("dispatch_batches is off: shared-prefix batches cannot be split between processes")
            args.accelerator_config.dispatch_batches = False
        init_kwargs, args.model_init_kwargs = args.model_init_kwargs, None  # used above: TRL would warn they are not
        try:
            super().__init__(
                model,
                ref_model,
                args,
                peft_config=peft_config,
                data_collator=data_collator,
                processing_class=processing_class,
                **kwargs,
            )
        finally:
            args.model_init_kwargs = init_kwargs
        if getattr(self, "aux_loss_enabled", False):
            ours_only = [t for t in args.loss_type if t not in TRL_LOSS_TYPES] + (["rpo_alpha"] * bool(args.rpo_alpha))
            if ours_only:
                raise ValueError(
                    f"this Mixture-of-Experts model's router auxiliary loss (router_aux_loss_coef="
                    f"{self.router_aux_loss_coef}) is computed by TRL's DPO loss, which has no {ours_only}; drop "
                    "them, or set router_aux_loss_coef: 0 to train without the auxiliary loss"
                )
            logger.warning("DPO loss: TRL's own computation, for the MoE router auxiliary loss")
        if args.reference_free:
            self.ref_model = None
        if args.sync_ref_model and self.reference_is_sharded:
            logger.warning(
                "sync_ref_model: under FSDP or ZeRO-3 the synced reference is not saved in checkpoints, so this run "
                "cannot be resumed exactly"
            )
        add_logprob_head(self.model.get_base_model() if is_peft_model(self.model) else self.model)

    # --- TR-DPO: the synced reference is part of the run's state --------------------------------------------------

    def save_trainer_extras(self, checkpoint: Path) -> None:
        """With `sync_ref_model` the reference drifts towards the policy; resuming from the starting model's copy
        would change the run, so every checkpoint keeps the reference as it is (TRL's checkpoints do not)."""
        if self.args.sync_ref_model and self.ref_model is not None and not self.reference_is_sharded:
            save_model(self.accelerator.unwrap_model(self.ref_model), str(checkpoint / SYNCED_REFERENCE_FILE))

    @property
    def reference_is_sharded(self) -> bool:
        return self.is_fsdp_enabled or is_deepspeed_zero3_enabled()

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if not self.args.sync_ref_model or self.ref_model is None:
            return
        path = Path(resume_from_checkpoint) / SYNCED_REFERENCE_FILE
        if self.reference_is_sharded:
            raise CheckpointError(
                "sync_ref_model: a run sharded with FSDP or ZeRO-3 cannot save its synced reference in checkpoints, "
                "so it cannot be resumed exactly; start it again, or train without sync_ref_model"
            )
        if not path.is_file():
            logger.warning(
                "%s has no synced reference (saved without sync_ref_model): the reference restarts from the "
                "starting model",
                resume_from_checkpoint,
            )
            return
        load_model(self.accelerator.unwrap_model(self.ref_model), str(path))
        logger.info("synced reference model restored from %s", path)

    def _get_train_sampler(self, train_dataset=None):
        """With `group_pairs_by_prompt`, prompts are shuffled rather than pairs (`PromptGroupedSampler`), so that a
        prompt's pairs share batches and the collator computes the prompt once for them."""
        if not (self.args.group_pairs_by_prompt and self.prefix_sharing):
            return super()._get_train_sampler(train_dataset)
        dataset = self.train_dataset if train_dataset is None else train_dataset
        prompts = dataset["prompt_ids"] if isinstance(dataset, Dataset) else [row["prompt_ids"] for row in dataset]
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return PromptGroupedSampler(prompts, seed)

    # --- log-probs -----------------------------------------------------------------------------------------------

    def scored_tokens(self, model, inputs, with_log_sum_sq: bool = False) -> ScoredTokens:
        """Log-probs of all reply tokens, from either batch layout (and log Σ p², for WPO)."""
        return score_batch(model, inputs, with_log_sum_sq)

    def reference_context(self):
        """No gradients, no checkpointing; with LoRA and no reference model, the adapter is switched off."""
        stack = contextlib.ExitStack()
        stack.enter_context(torch.no_grad())
        stack.enter_context(disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs))
        if self.ref_model is None and is_peft_model(self.model):
            peft_model = self.accelerator.unwrap_model(self.model)
            stack.enter_context(
                use_adapter(peft_model, adapter_name="ref" if "ref" in peft_model.peft_config else None)
            )
        return stack

    def reference_logps(self, inputs, policy: ReplyLogps) -> ReplyLogps:
        if "ref_chosen_logps" in inputs:  # precomputed once before training
            return ReplyLogps(
                inputs["ref_chosen_logps"], inputs["ref_rejected_logps"], policy.chosen_length, policy.rejected_length
            )
        with self.reference_context():
            model = self.ref_model if self.ref_model is not None else self.model
            return self.scored_tokens(model, inputs).reply_logps(self.args.ld_alpha)

    def _precompute_ref_logps(self, dataset, name, batch_size):
        """TRL's one pass of the reference over the data, kept on disk: a second run with the same data and
        reference reads it back instead (see `reference_cache.py`)."""
        if not isinstance(dataset, Dataset):  # TRL's own checks first (it refuses to precompute an iterable dataset)
            return super()._precompute_ref_logps(dataset, name, batch_size)
        path = cache_path(
            self.args.ref_logps_cache_dir,
            token_ids_digest(dataset),
            self._precompute_model_hash,
            self.args.max_length,
            self.prefix_sharing,
            *([f"ld_alpha={self.args.ld_alpha}"] if self.args.ld_alpha is not None else []),
        )
        if path.exists():
            logger.info("reference log-probs of the %s data read from %s", name, path)
            chosen, rejected = load_reference_logps(path)
            return dataset.add_column("ref_chosen_logps", chosen.numpy()).add_column(
                "ref_rejected_logps", rejected.numpy()
            )
        dataset = super()._precompute_ref_logps(dataset, name, batch_size)
        if self.accelerator.is_main_process:
            columns = dataset.select_columns(["ref_chosen_logps", "ref_rejected_logps"]).with_format("torch")[:]
            save_reference_logps(path, columns["ref_chosen_logps"], columns["ref_rejected_logps"])
        self.accelerator.wait_for_everyone()
        return dataset

    def compute_ref_log_probs(self, model, inputs):
        """TRL's hook for `precompute_ref_log_probs`: summed reference log-probs of the chosen and rejected replies."""
        with self.reference_context():
            logps = self.scored_tokens(model, inputs).reply_logps(self.args.ld_alpha)
        return logps.chosen, logps.rejected

    # --- loss ----------------------------------------------------------------------------------------------------

    def _compute_loss(self, model, inputs, return_outputs=False):
        if self.aux_loss_enabled:  # TRL's loss with the router's term, on TRL's rows (see __init__)
            return super()._compute_loss(model, inputs, return_outputs)
        mode = "train" if self.model.training else "eval"
        scored = self.scored_tokens(model, inputs, with_log_sum_sq=self.args.use_weighting)
        policy = scored.reply_logps(self.args.ld_alpha)
        reference = None if self.args.reference_free else self.reference_logps(inputs, policy)
        pair_weights = scored.wpo_weights() if self.args.use_weighting else None

        weights = self.args.loss_weights or [1.0] * len(self.args.loss_type)
        needs_nll = self.args.rpo_alpha is not None or "sft" in self.args.loss_type
        nll = scored.chosen_nll() if needs_nll else None
        terms = [
            preference_loss(
                policy,
                reference,
                beta=self.beta,
                loss_type=loss_type,
                label_smoothing=self.args.label_smoothing,
                simpo_gamma=self.args.simpo_gamma,
                discopop_tau=self.args.discopop_tau,
                chosen_nll=nll,
                f_divergence_type=self.args.f_divergence_type,
                f_alpha_divergence_coef=self.args.f_alpha_divergence_coef,
                weights=pair_weights,
            )
            for loss_type in self.args.loss_type
        ]
        loss = sum(weight * term.loss for weight, term in zip(weights, terms, strict=True))
        if self.args.rpo_alpha is not None:
            loss = loss + self.args.rpo_alpha * nll
            self._metrics[mode]["nll_loss"].append(self.accelerator.gather_for_metrics(nll.detach()).mean().item())
        self.record_metrics(mode, terms[0], policy, inputs)
        if return_outputs:  # as TRL, for compute_metrics: the rows' logits, from one more forward pass
            model_inputs = {k: inputs[k] for k in ("input_ids", "attention_mask", "position_ids") if k in inputs}
            with torch.no_grad():
                return loss, model(**model_inputs, use_cache=False)
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
            tokens = inputs["num_tokens"] if "num_tokens" in inputs else inputs["attention_mask"].sum()
            self._total_train_tokens += self.accelerator.gather_for_metrics(tokens.reshape(1)).sum().item()
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
