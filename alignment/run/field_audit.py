"""Every recipe field is either honoured or refused: none is parsed and then silently ignored.

`AUDIT` classifies each field of our `ModelArguments` and `DataArguments` and each field TRL's `SFTConfig` /
`DPOConfig` (and ours) add on top of `transformers.TrainingArguments` (whose own fields the HF Trainer honours).
"honoured: where" says what reads it; "refused: why" means a run with it set stops before loading anything, in one
line naming it (`REFUSALS`, checked by `check_model_fields` and `check_training_fields`). A field honoured in one
setting and ignored in another is "honoured" with its refused settings listed in `REFUSALS`.
`tests/test_recipe_fields.py` fails when a new TRL release adds a field that is not classified here.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trl

LORA = "honoured: pipeline.train_stage → trl.get_peft_config (the LoraConfig); refused without use_peft"
SHARED_TRL = {
    "trust_remote_code": "honoured: pipeline.model_loading → load_model; the trainers' AutoProcessor",
    "router_aux_loss_coef": "honoured: TRL's loss with the MoE router auxiliary loss (training/sft.py, dpo.py)",
    "dataset_num_proc": "honoured: TRL's tokenisation (Dataset.map num_proc)",
    "max_length": "honoured: TRL's tokenisation/truncation, our collators, check_compatible",
    "activation_offloading": "honoured: TRL's training_step (activation offloading context)",
    "model_init_kwargs": "refused: the pipeline loads the model itself (TRL reads it only for a model given by name)",
    "overwrite_output_dir": "honoured: pipeline.prepare_output → check_output_dir, train_and_save",
    "allow_recipe_change": "honoured: pipeline.train_stage → check_resume_recipe",
    "global_batch_size": "honoured: configs.BatchOptions → gradient_accumulation_steps for the launch's world size "
    "(refused when it does not divide, or next to a gradient_accumulation_steps that disagrees)",
}

AUDIT: dict[str, dict[str, str]] = {
    "ModelArguments": {
        "model_name_or_path": "honoured: load_model_and_tokenizer (the checkpoint)",
        "model_revision": "honoured: load_model (revision); refused without model_name_or_path",
        "dtype": "honoured: load_model (dtype); bnb_4bit_compute_dtype with load_in_4bit",
        "attn_implementation": "honoured: load_model (attn_implementation)",
        "use_peft": "honoured: trl.get_peft_config → the trainers' peft_config",
        "lora_r": LORA,
        "lora_alpha": LORA,
        "lora_dropout": LORA,
        "lora_target_modules": LORA + "; checked by check_lora_targets",
        "lora_target_parameters": LORA,
        "lora_modules_to_save": LORA,
        "lora_task_type": "refused unless CAUSAL_LM: SFT and DPO train a causal LM head",
        "use_rslora": LORA,
        "use_dora": LORA,
        "load_in_8bit": "honoured: trl.get_quantization_config → load_model (QLoRA); refused without use_peft",
        "load_in_4bit": "honoured: trl.get_quantization_config → load_model (QLoRA); refused without use_peft",
        "bnb_4bit_quant_type": "honoured: trl.get_quantization_config; refused without load_in_4bit",
        "use_bnb_nested_quant": "honoured: trl.get_quantization_config; refused without load_in_4bit",
        "bnb_4bit_quant_storage": "honoured: trl.get_quantization_config; refused without load_in_4bit",
        "model_config": "honoured: load_model → config_from_name (random init when model_name_or_path is unset)",
        "model_config_overrides": "honoured: config_from_name; refused with model_name_or_path (a checkpoint keeps "
        "its own config)",
        "model_implementation": "honoured: load_model (our GPT-2 class or AutoModelForCausalLM)",
        "tokenizer_name_or_path": "honoured: load_model_and_tokenizer → tokenizer_source",
        "chat_template": "honoured: pipeline.train_stage → set_chat_template",
        "save_format": "honoured: pipeline.save_run → save_in_stock_format",
        "merge_adapter_on_save": "honoured: pipeline.save_run; refused without use_peft and with quantization",
        "hub_license": "honoured: run/model_card.py (the card's license)",
    },
    "DataArguments": {
        "dataset_name": "honoured: DataArguments.specs; refused with datasets",
        "dataset_config": "honoured: DataArguments.specs (name); refused with datasets",
        "dataset_format": "honoured: DataArguments.specs (format); refused with datasets",
        "dataset_train_split": "honoured: DataArguments.specs (split); refused with datasets",
        "dataset_test_split": "honoured: DataArguments.specs (test_split); refused with datasets",
        "datasets": "honoured: DataArguments.specs (the mixture)",
        "dataset_mixture": "honoured: DataArguments.__post_init__ → datasets, dataset_seed, test_size",
        "test_size": "honoured: pipeline.split_settings",
        "test_split_size": "honoured: DataArguments.__post_init__ → test_size",
        "dataset_seed": "honoured: pipeline.split_settings",
        "max_prompt_length": "honoured: pipeline.preference_data (DPO); refused in SFT",
    },
    "SFTConfig": {
        **SHARED_TRL,
        "chat_template_path": "refused: the data is rendered with the template before the trainer starts; use "
        "chat_template",
        "dataset_text_field": "refused unless 'text': the SFT data always reaches the trainer as a 'text' column",
        "dataset_kwargs": "honoured: TRL's SFTTrainer (skip_prepare_dataset)",
        "eos_token": "honoured: TRL's SFTTrainer (tokenizer EOS, appended to texts); refused with wrapped packing",
        "truncation_mode": "honoured: TRL's SFT tokenisation",
        "shuffle_dataset": "honoured: TRL's SFTTrainer dataset preparation",
        "packing": "honoured: TRL's packing; our PackedDocumentsCollator with packing_strategy wrapped",
        "packing_strategy": "honoured: TRL's pack_dataset; training/sft.py (wrapped)",
        "padding_free": "honoured: TRL's DataCollatorForLanguageModeling",
        "pad_to_multiple_of": "honoured: TRL's collator; refused with wrapped packing",
        "eval_packing": "honoured: TRL's SFTTrainer eval dataset preparation",
        "completion_only_loss": "honoured: pipeline.sft_data (prompt/completion) and TRL's labels",
        "assistant_only_loss": "refused: conversations are rendered to text before the trainer; use "
        "completion_only_loss",
        "loss_type": "honoured: training/sft.py compute_loss (nll, dft)",
        "pad_token": "honoured: TRL's collator (padding id); refused with wrapped packing",
    },
    "DPOConfig": {
        **SHARED_TRL,
        "disable_dropout": "honoured: TRL's DPOTrainer (disable_dropout_in_model)",
        "truncation_mode": "honoured: TRL's DataCollatorForPreference; refused (keep_end) with prefix_sharing",
        "padding_free": "refused: TRL 1.16's DPOTrainer switches it off; prefix_sharing gives the model no padding",
        "pad_to_multiple_of": "honoured: TRL's DataCollatorForPreference; refused with prefix_sharing",
        "precompute_ref_log_probs": "honoured: TRL's DPOTrainer → DPOTrainer._precompute_ref_logps",
        "precompute_ref_batch_size": "honoured: TRL's precompute pass; refused without precompute_ref_log_probs",
        "loss_type": "honoured: training/dpo.py _compute_loss → losses.preference_loss",
        "loss_weights": "honoured: training/dpo.py _compute_loss",
        "ld_alpha": "honoured: layouts.ScoredTokens.reply_logps",
        "f_divergence_type": "honoured: losses.preference_loss",
        "f_alpha_divergence_coef": "honoured: losses.preference_loss (alpha_divergence)",
        "label_smoothing": "honoured: losses.preference_loss; checked in DPOConfig.__post_init__",
        "beta": "honoured: losses.preference_loss",
        "use_weighting": "honoured: training/dpo.py (WPO weights)",
        "discopop_tau": "honoured: losses.preference_loss (discopop)",
        "sync_ref_model": "honoured: TRL's SyncRefModelCallback; training/dpo.py checkpoints",
        "ref_model_mixup_alpha": "honoured: TRL's SyncRefModelCallback; refused without sync_ref_model",
        "ref_model_sync_steps": "honoured: TRL's SyncRefModelCallback; refused without sync_ref_model",
        "pad_token": "honoured: TRL's DataCollatorForPreference; refused with prefix_sharing",
        "rpo_alpha": "honoured: training/dpo.py _compute_loss",
        "simpo_gamma": "honoured: losses.preference_loss (simpo)",
        "ref_logps_cache_dir": "honoured: DPOTrainer._precompute_ref_logps; refused without precompute_ref_log_probs",
        "prefix_sharing": "honoured: training/dpo.py (SharedPrefixPreferenceCollator)",
        "group_pairs_by_prompt": "honoured: DPOTrainer._get_train_sampler (PromptGroupedSampler); checked in "
        "DPOConfig.__post_init__",
    },
}


@dataclass(frozen=True)
class Refusal:
    """`field` set as `when(obj)` says is refused with `f"{field}: {why}"` (one line)."""

    owner: str  # a key of AUDIT
    field: str
    when: Callable[[Any], bool]
    why: str


def changed(obj: Any, name: str) -> bool:
    """Whether `obj.name` differs from its dataclass default."""
    for f in dataclasses.fields(obj):
        if f.name == name:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            return getattr(obj, name) != default
    raise KeyError(name)


def quantized(m: Any) -> bool:
    return bool(m.load_in_4bit or m.load_in_8bit)


def wrapped(a: Any) -> bool:
    return bool(a.packing and a.packing_strategy == "wrapped")


LORA_FIELDS = (
    "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_target_parameters", "lora_modules_to_save",
    "use_rslora", "use_dora", "merge_adapter_on_save",
)  # fmt: skip
MIXTURE_SHADOWED = ("dataset_name", "dataset_config", "dataset_format", "dataset_train_split", "dataset_test_split")
NO_BNB = "needs bitsandbytes, which is not installed (pip install bitsandbytes)"
INIT_KWARGS_WHY = (
    "the pipeline loads the model itself and would not read it; use the recipe keys dtype, attn_implementation, "
    "model_revision, trust_remote_code, load_in_4bit / load_in_8bit"
)

REFUSALS: list[Refusal] = [
    *(
        Refusal("ModelArguments", q, lambda m, q=q: getattr(m, q) and not m.use_peft,
                "a quantized model cannot be fully fine-tuned; set use_peft: true (QLoRA) or drop it")
        for q in ("load_in_4bit", "load_in_8bit")
    ),
    *(
        Refusal("ModelArguments", q, lambda m, q=q: getattr(m, q) and importlib.util.find_spec("bitsandbytes") is None,
                NO_BNB)
        for q in ("load_in_4bit", "load_in_8bit")
    ),
    *(
        Refusal("ModelArguments", b, lambda m, b=b: changed(m, b) and not m.load_in_4bit,
                "is read only with load_in_4bit: true")
        for b in ("bnb_4bit_quant_type", "use_bnb_nested_quant", "bnb_4bit_quant_storage")
    ),
    *(
        Refusal("ModelArguments", f, lambda m, f=f: changed(m, f) and not m.use_peft, "is read only with use_peft: true")
        for f in LORA_FIELDS
    ),
    Refusal("ModelArguments", "merge_adapter_on_save", lambda m: m.merge_adapter_on_save and quantized(m),
            "merging into the quantized base re-quantizes it, rounding the adapter's update away; merge the saved "
            "adapter into the full-precision base instead (PeftModel.from_pretrained(base, out).merge_and_unload())"),
    Refusal("ModelArguments", "lora_task_type", lambda m: m.lora_task_type != "CAUSAL_LM",
            "SFT and DPO train a causal language model; only CAUSAL_LM (the default) fits"),
    Refusal("ModelArguments", "model_revision", lambda m: changed(m, "model_revision") and not m.model_name_or_path,
            "applies to model_name_or_path; model_config builds random weights"),
    Refusal("ModelArguments", "model_config_overrides",
            lambda m: bool(m.model_config_overrides) and bool(m.model_name_or_path),
            "applies to model_config (random weights); the checkpoint in model_name_or_path keeps its own config"),
    *(
        Refusal("DataArguments", f, lambda d, f=f: bool(d.datasets) and changed(d, f),
                "is read only without datasets / dataset_mixture; a mixture entry names its own path, name, "
                "format, split and test_split")
        for f in MIXTURE_SHADOWED
    ),
    Refusal("DataArguments", "max_prompt_length", lambda d: d.max_prompt_length is not None,
            "is read only by DPO; SFT texts are cut by max_length"),  # checked for SFT runs only
    *(
        Refusal(owner, "model_init_kwargs", lambda a: a.model_init_kwargs is not None, INIT_KWARGS_WHY)
        for owner in ("SFTConfig", "DPOConfig")
    ),
    Refusal("SFTConfig", "chat_template_path", lambda a: a.chat_template_path is not None,
            "the data is rendered with the chat template before the trainer starts; use chat_template"),
    Refusal("SFTConfig", "dataset_text_field", lambda a: a.dataset_text_field != "text",
            "the SFT data always reaches the trainer as a 'text' column; to read another column, map it in "
            "datasets[].columns"),
    Refusal("SFTConfig", "assistant_only_loss", lambda a: a.assistant_only_loss,
            "conversations are rendered to text before the trainer; use completion_only_loss: true (loss on the "
            "replies only)"),
    *(
        Refusal("SFTConfig", f, lambda a, f=f: wrapped(a) and getattr(a, f) not in (None, "auto"),
                "is not applied with packing_strategy wrapped (our collator splits windows at the tokenizer's EOS "
                "and masks padding); drop it or use another packing_strategy")
        for f in ("eos_token", "pad_token", "pad_to_multiple_of")
    ),
    Refusal("DPOConfig", "padding_free", lambda a: a.padding_free,
            "TRL 1.16's DPOTrainer switches it off; prefix_sharing (the default) already gives the model no padding "
            "where it can (our GPT-2, transformers models on sdpa) and says so where it cannot"),
    Refusal("DPOConfig", "truncation_mode", lambda a: a.prefix_sharing and a.truncation_mode != "keep_start",
            "keep_end is not applied with prefix_sharing (pairs keep their start); set prefix_sharing: false"),
    *(
        Refusal("DPOConfig", f, lambda a, f=f: a.prefix_sharing and getattr(a, f) not in (None, "auto"),
                "is not applied with prefix_sharing (shared-prefix rows pack pairs without padding); set "
                "prefix_sharing: false or drop it")
        for f in ("pad_token", "pad_to_multiple_of")
    ),
    *(
        Refusal("DPOConfig", f, lambda a, f=f: changed(a, f) and not a.sync_ref_model,
                "is read only with sync_ref_model: true")
        for f in ("ref_model_mixup_alpha", "ref_model_sync_steps")
    ),
    *(
        Refusal("DPOConfig", f, lambda a, f=f: changed(a, f) and not a.precompute_ref_log_probs,
                "is read only with precompute_ref_log_probs: true")
        for f in ("precompute_ref_batch_size", "ref_logps_cache_dir")
    ),
]  # fmt: skip


def problems(owner: str, obj: Any) -> list[str]:
    """The one-line refusals `obj` (an `owner` instance) triggers, in REFUSALS' order."""
    return [f"{r.field}: {r.why}" for r in REFUSALS if r.owner == owner and r.when(obj)]


def check_model_fields(model_args: Any) -> None:
    """Refuse the model fields that would be read nowhere (or cannot work), before anything loads."""
    found = problems("ModelArguments", model_args)
    if found:
        raise ValueError(found[0])


def check_training_fields(args: Any, data_args: Any) -> None:
    """Refuse the training-config and data fields that would be read nowhere, before anything loads."""
    owner = "DPOConfig" if isinstance(args, trl.DPOConfig) else "SFTConfig"
    found = problems(owner, args)
    data_problems = problems("DataArguments", data_args)
    if owner == "DPOConfig":  # max_prompt_length is DPO's
        data_problems = [p for p in data_problems if not p.startswith("max_prompt_length:")]
    found += data_problems
    if found:
        raise ValueError(found[0])
