"""Data in: reading sources (files, folders, the Hub, mixtures) and turning their rows, strings or conversations,
into TRL's layouts.
May import `alignment.common` only: the tokenizer, when a filter needs one, is passed in."""

from .formats import (
    FORMATS,
    DataFormatError,
    FilterReport,
    detect_format,
    normalize_dataset,
    output_columns,
    split_hh_dialogue,
    split_shared_prompt,
)
from .sources import DatasetSpec, load_preference_dataset, load_sft_dataset, read_split

__all__ = [
    "FORMATS",
    "DataFormatError",
    "DatasetSpec",
    "FilterReport",
    "detect_format",
    "load_preference_dataset",
    "load_sft_dataset",
    "normalize_dataset",
    "output_columns",
    "read_split",
    "split_hh_dialogue",
    "split_shared_prompt",
]
