"""Direct Preference Optimization from a recipe:

    accelerate launch scripts/run_dpo.py recipes/gpt2_hh.yaml [--key=value ...]
"""

from alignment.cli import dpo

if __name__ == "__main__":
    dpo()
