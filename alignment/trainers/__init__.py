"""TRL's SFT and DPO trainers with the log-prob and loss computations owned by this package."""

from .dpo import DPOTrainer
from .sft import PackedDocumentsCollator, SFTTrainer

__all__ = ["DPOTrainer", "PackedDocumentsCollator", "SFTTrainer"]
