"""Supervised fine-tuning from a recipe:

    accelerate launch scripts/run_sft.py recipes/gpt2_hh_sft.yaml [--key=value ...]

Recipe → data and model → `alignment.training.SFTTrainer` → saved run (→ Hub): see `alignment.run.pipeline`.
"""

from alignment.run import SFT, run, run_cli

if __name__ == "__main__":
    run_cli(lambda argv: run(SFT, argv))
