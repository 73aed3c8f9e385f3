"""Running a stage from a recipe: the recipe parser, the model and data arguments, machine defaults, the pipeline
behind `scripts/run_*.py`, the Hub and wandb, and the CLI wrapper (one `error:` line). May import every other folder."""

from .arguments import DataArguments, ModelArguments
from .cli import run_cli
from .pipeline import DPO, SFT, Stage, run, run_dpo, run_sft
from .recipe import RecipeError, parse_recipe

__all__ = [
    "DPO",
    "SFT",
    "DataArguments",
    "ModelArguments",
    "RecipeError",
    "Stage",
    "parse_recipe",
    "run",
    "run_cli",
    "run_dpo",
    "run_sft",
]
