"""The model: our GPT-2, its attention kernel, official-checkpoint conversion (and export back to that format), the
tokenizer and its chat templates, and model loading.
May import `alignment.common` only. `attention.py`, `configuration_gpt2.py` and `modeling_gpt2.py` import nothing
but torch and transformers, because they travel with saved checkpoints as remote code."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .attention import attention, build_visibility_mask, reference_attention, sdpa_attention
from .chat_templates import (
    CHAT_TEMPLATES,
    fit_model_to_tokenizer,
    render_prompt,
    resolve_chat_template,
    set_chat_template,
    stop_token_ids,
)
from .configuration_gpt2 import GPT2_SIZES, AlignmentGPT2Config
from .conversion import register_gpt2_conversion
from .export import ExportError, export_stock_gpt2
from .hf_attention import ATTN_IMPLEMENTATION, register_with_transformers
from .modeling_gpt2 import AlignmentGPT2ForCausalLM, AlignmentGPT2Model, AlignmentGPT2PreTrainedModel


def register_auto_classes() -> None:
    """Make `AutoConfig`/`AutoModel`/`AutoModelForCausalLM` know our model type, and make saved folders carry the
    code and an `auto_map` so that `trust_remote_code=True` loads them anywhere."""
    AutoConfig.register(AlignmentGPT2Config.model_type, AlignmentGPT2Config, exist_ok=True)
    AutoModel.register(AlignmentGPT2Config, AlignmentGPT2Model, exist_ok=True)
    AutoModelForCausalLM.register(AlignmentGPT2Config, AlignmentGPT2ForCausalLM, exist_ok=True)
    AlignmentGPT2Config.register_for_auto_class()
    AlignmentGPT2Model.register_for_auto_class("AutoModel")
    AlignmentGPT2ForCausalLM.register_for_auto_class("AutoModelForCausalLM")


__all__ = [
    "ATTN_IMPLEMENTATION",
    "CHAT_TEMPLATES",
    "AlignmentGPT2Config",
    "AlignmentGPT2ForCausalLM",
    "AlignmentGPT2Model",
    "AlignmentGPT2PreTrainedModel",
    "ExportError",
    "GPT2_SIZES",
    "attention",
    "build_visibility_mask",
    "export_stock_gpt2",
    "fit_model_to_tokenizer",
    "reference_attention",
    "register_auto_classes",
    "register_gpt2_conversion",
    "register_with_transformers",
    "render_prompt",
    "resolve_chat_template",
    "sdpa_attention",
    "set_chat_template",
    "stop_token_ids",
]
