"""Small, readable SFT and DPO for GPT-2-class language models, on top of TRL, Transformers and Accelerate.

Importing the package registers our GPT-2 with transformers' Auto classes (official GPT-2 checkpoints convert on
load) and our attention kernel as `attn_implementation="alignment"`.

The package follows the flow of a run; each folder may import only the folders listed before it:

    common      rules every stage shares (Hub ids, HH markers, error lines, caches)
    modeling    our GPT-2, the attention kernel, conversion, the tokenizer, model loading
    data        sources and row formats, into TRL's layouts
    training    the trainers (with their own safety), configs, losses, log-probs, prefix sharing, checkpoints
    evaluation  scoring pairs, generation, judging, curves
    run         recipes, the pipeline behind scripts/, the Hub and wandb, the command-line wrapper
"""

from .modeling import (
    ATTN_IMPLEMENTATION,
    AlignmentGPT2Config,
    AlignmentGPT2ForCausalLM,
    AlignmentGPT2Model,
    register_auto_classes,
    register_gpt2_conversion,
    register_with_transformers,
)

register_auto_classes()
register_gpt2_conversion()
register_with_transformers()

__version__ = "0.1.0"

__all__ = [
    "ATTN_IMPLEMENTATION",
    "AlignmentGPT2Config",
    "AlignmentGPT2ForCausalLM",
    "AlignmentGPT2Model",
    "__version__",
]
