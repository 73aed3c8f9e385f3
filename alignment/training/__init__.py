"""Training: TRL's SFT and DPO trainers with our log-probs, losses, prefix sharing and safety built in, their configs,
and checkpoints that survive a crash. May import `alignment.common` and `alignment.modeling`."""

from .configs import DPOConfig, SFTConfig
from .dpo import DPOTrainer
from .safety import SafeTrainingMixin, TrainingInterrupted
from .sft import PackedDocumentsCollator, SFTTrainer

__all__ = [
    "DPOConfig",
    "DPOTrainer",
    "PackedDocumentsCollator",
    "SFTConfig",
    "SFTTrainer",
    "SafeTrainingMixin",
    "TrainingInterrupted",
]
