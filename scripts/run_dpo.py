"""Direct Preference Optimization from a recipe:

    accelerate launch scripts/run_dpo.py recipes/gpt2_hh.yaml [--key=value ...]

Recipe → data and model → `alignment.training.DPOTrainer` → saved run (→ Hub): see `alignment.run.pipeline`.
"""

from alignment.run import DPO, run, run_cli

if __name__ == "__main__":
    run_cli(lambda argv: run(DPO, argv))
