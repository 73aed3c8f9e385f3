"""Small, readable SFT and DPO for GPT-2-class language models, on top of TRL, Transformers and Accelerate.

Importing the package registers our GPT-2 with transformers' Auto classes and our attention kernel as
`attn_implementation="alignment"`.
"""

from .modeling import (
    ATTN_IMPLEMENTATION,
    AlignmentGPT2Config,
    AlignmentGPT2ForCausalLM,
    AlignmentGPT2Model,
    register_auto_classes,
    register_with_transformers,
)

register_auto_classes()
register_with_transformers()

__version__ = "0.1.0"

__all__ = [
    "ATTN_IMPLEMENTATION",
    "AlignmentGPT2Config",
    "AlignmentGPT2ForCausalLM",
    "AlignmentGPT2Model",
    "__version__",
]
