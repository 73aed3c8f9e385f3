"""Configuration of our GPT-2: the sizes of the official checkpoints and the dropout presets of the assignment."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig

# Sizes of the four official checkpoints (Radford et al., 2019).
GPT2_SIZES: dict[str, dict[str, int]] = {
    "gpt2": {"n_layer": 12, "n_head": 12, "n_embd": 768},  # 124M
    "gpt2-medium": {"n_layer": 24, "n_head": 16, "n_embd": 1024},  # 350M
    "gpt2-large": {"n_layer": 36, "n_head": 20, "n_embd": 1280},  # 774M
    "gpt2-xl": {"n_layer": 48, "n_head": 25, "n_embd": 1600},  # 1558M
}


class AlignmentGPT2Config(PreTrainedConfig):
    r"""
    Args:
        vocab_size: tokens in the vocabulary (50257 for GPT-2's BPE).
        n_positions: learned position embeddings, the longest sequence the model reads.
        n_embd: width of the residual stream.
        n_layer: number of transformer blocks.
        n_head: attention heads per block; must divide `n_embd`.
        n_inner: hidden width of the MLP, 4 * n_embd when None.
        embd_pdrop: dropout on the summed token and position embeddings.
        attn_pdrop: dropout on the attention probabilities.
        resid_pdrop: dropout on each block's attention and MLP outputs before they join the residual stream.
        layer_norm_epsilon: epsilon of every LayerNorm.
        initializer_range: standard deviation of the normal initialisation.
    """

    model_type = "alignment_gpt2"
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {
        "hidden_size": "n_embd",
        "max_position_embeddings": "n_positions",
        "num_attention_heads": "n_head",
        "num_hidden_layers": "n_layer",
    }

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    embd_pdrop: float = 0.0
    attn_pdrop: float = 0.0
    resid_pdrop: float = 0.0
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    use_cache: bool = True
    bos_token_id: int | None = 50256
    eos_token_id: int | list[int] | None = 50256
    pad_token_id: int | None = None
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs: Any) -> None:
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        super().__post_init__(**kwargs)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> AlignmentGPT2Config:
        """A config by name: "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", each without dropout, or with
        "/dropout" appended (e.g. "gpt2/dropout") for dropout 0.2 on embeddings, attention and residuals."""
        size, _, variant = name.partition("/")
        if size not in GPT2_SIZES or variant not in ("", "dropout"):
            presets = [p for s in GPT2_SIZES for p in (s, f"{s}/dropout")]
            raise ValueError(f"unknown GPT-2 preset {name!r}; choose one of {presets}")
        dropout = 0.2 if variant == "dropout" else 0.0
        fields = {**GPT2_SIZES[size], "embd_pdrop": dropout, "attn_pdrop": dropout, "resid_pdrop": dropout}
        return cls(**{**fields, **overrides})


__all__ = ["AlignmentGPT2Config", "GPT2_SIZES"]
