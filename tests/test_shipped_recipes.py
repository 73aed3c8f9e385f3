"""Every recipe we ship parses into valid configs (a typo there would only show after a long download)."""

from pathlib import Path

import pytest

from alignment.run.arguments import DataArguments, ModelArguments
from alignment.run.recipe import parse_recipe
from alignment.training.configs import DPOConfig, SFTConfig

REPO = Path(__file__).resolve().parent.parent
DEMO_RECIPES = sorted((REPO / "examples" / "arithmetic" / "recipes").glob("*.yaml"))
RECIPES = sorted((REPO / "recipes").rglob("*.yaml")) + DEMO_RECIPES


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_parses(path):
    training_class = SFTConfig if "sft" in path.name else DPOConfig
    model_args, data_args, args = parse_recipe((ModelArguments, DataArguments, training_class), [str(path)])
    assert args.output_dir and data_args.specs()
    demo = path in DEMO_RECIPES
    gpt2 = path.name.startswith("gpt2_")
    if not demo:  # the real recipes: effective batch 64, the Hub and wandb
        assert args.per_device_train_batch_size * args.gradient_accumulation_steps == 64
        assert args.report_to == ["wandb"] and args.push_to_hub and args.hub_model_id
        assert model_args.use_peft == ("lora" in path.name)
    if gpt2:  # GPT-2 on HH-RLHF, the DPO paper's beta
        assert data_args.dataset_name == "Anthropic/hh-rlhf"
        assert training_class is SFTConfig or (args.beta == 0.1 and args.learning_rate <= 5e-6)
    elif not demo:  # past GPT-2: UltraFeedback in the model's own chat template
        assert data_args.specs()[0]["path"] == "HuggingFaceH4/ultrafeedback_binarized"
        assert model_args.chat_template == "tokenizer" and model_args.model_implementation == "transformers"


def test_both_stages_and_lora_variants_are_shipped():
    names = {p.name for p in RECIPES}
    assert {"gpt2_hh_sft.yaml", "gpt2_hh.yaml", "gpt2_hh_sft_lora.yaml", "gpt2_hh_lora.yaml"} <= names
    assert "smollm2_ultrafeedback.yaml" in names
    assert {p.name for p in DEMO_RECIPES} == {"arithmetic_sft.yaml", "arithmetic_dpo.yaml"}
