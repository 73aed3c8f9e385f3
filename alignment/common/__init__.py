"""Rules every stage shares, each written once: what a Hub id looks like, the HH-RLHF turn markers, one-line error
text, where caches live, whether the Hub answers, whether a saved file is whole and its weights finite (`files`). Imports nothing from the rest of the package."""

from .errors import first_line, one_line
from .hh import HH_ASSISTANT, HH_HUMAN, split_hh_dialogue
from .hub import default_cache_dir, hub_reachable, looks_like_hub_id, reachable

__all__ = [
    "HH_ASSISTANT",
    "HH_HUMAN",
    "default_cache_dir",
    "first_line",
    "hub_reachable",
    "looks_like_hub_id",
    "one_line",
    "reachable",
    "split_hh_dialogue",
]
