"""Supervised fine-tuning from a recipe:

    accelerate launch scripts/run_sft.py recipes/gpt2_hh_sft.yaml [--key=value ...]
"""

from alignment.cli import sft

if __name__ == "__main__":
    sft()
