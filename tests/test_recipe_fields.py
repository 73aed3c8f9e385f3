"""No recipe field is parsed and then silently ignored: every field of our model/data arguments and every field TRL's
SFT/DPO configs add to `TrainingArguments` is classified in `alignment.run.field_audit.AUDIT` (a new TRL field fails
here until it is), the refused ones stop a run in one line naming them, and a sample of the honoured ones reach
where they should (cheap checks, no training)."""

import dataclasses
from pathlib import Path

import pytest
import transformers
from trl import get_peft_config

from alignment.run.arguments import DataArguments, ModelArguments
from alignment.run.field_audit import AUDIT, REFUSALS, check_model_fields, check_training_fields, problems
from alignment.run.pipeline import check_trainable, model_loading, split_settings
from alignment.run.recipe import parse_recipe
from alignment.training.configs import DPOConfig, SFTConfig

CLASSES = {
    "ModelArguments": ModelArguments,
    "DataArguments": DataArguments,
    "SFTConfig": SFTConfig,
    "DPOConfig": DPOConfig,
}
TRAINING_ARGUMENTS = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yaml")) + sorted((REPO / "examples/arithmetic/recipes").glob("*.yaml"))
CPU = dict(use_cpu=True, bf16=False, report_to="none")


def recipe_fields(cls):
    return [f.name for f in dataclasses.fields(cls) if f.name not in TRAINING_ARGUMENTS]


def model(**settings):
    return ModelArguments(model_name_or_path="some/checkpoint", **settings)


def data(**settings):
    return DataArguments(**({"dataset_name": "rows.jsonl"} | settings))


@pytest.mark.parametrize("owner", CLASSES)
def test_every_field_is_classified(owner):
    fields = recipe_fields(CLASSES[owner])
    unclassified = [name for name in fields if name not in AUDIT[owner]]
    assert not unclassified, f"classify these {owner} fields in alignment/run/field_audit.py AUDIT: {unclassified}"
    stale = sorted(set(AUDIT[owner]) - set(fields))
    assert not stale, f"AUDIT lists {owner} fields that no longer exist: {stale}"
    for name, verdict in AUDIT[owner].items():
        assert verdict.startswith(("honoured: ", "refused: ", "refused unless ")), (name, verdict)


def test_every_refusal_is_a_classified_field_said_refused():
    for refusal in REFUSALS:
        verdict = AUDIT[refusal.owner][refusal.field]
        assert "refused" in verdict, (refusal.owner, refusal.field, verdict)


def test_defaults_and_the_shipped_recipes_refuse_nothing(tmp_path):
    assert problems("ModelArguments", model()) == [] and problems("DataArguments", data()) == []
    assert problems("SFTConfig", SFTConfig(str(tmp_path), **CPU)) == []
    assert problems("DPOConfig", DPOConfig(str(tmp_path), **CPU)) == []
    for path in RECIPES:
        config = SFTConfig if "sft" in path.name else DPOConfig
        model_args, data_args, args = parse_recipe((ModelArguments, DataArguments, config), [str(path)])
        check_model_fields(model_args)
        check_training_fields(args, data_args)


REFUSED_MODEL = [
    ({"load_in_4bit": True}, "load_in_4bit: a quantized model cannot be fully fine-tuned"),
    ({"bnb_4bit_quant_type": "fp4"}, "bnb_4bit_quant_type: is read only with load_in_4bit"),
    ({"lora_r": 8}, "lora_r: is read only with use_peft"),
    ({"use_dora": True}, "use_dora: is read only with use_peft"),
    ({"merge_adapter_on_save": True}, "merge_adapter_on_save: is read only with use_peft"),
    ({"use_peft": True, "lora_task_type": "SEQ_CLS"}, "lora_task_type: SFT and DPO train a causal language model"),
    ({"model_config_overrides": {"n_layer": 2}}, "model_config_overrides: applies to model_config"),
]


@pytest.mark.parametrize(("settings", "line"), REFUSED_MODEL, ids=lambda x: str(x)[:40])
def test_refused_model_fields_stop_in_one_line(settings, line):
    with pytest.raises(ValueError, match="^" + line) as error:
        model_loading(model(**settings), False)
    assert "\n" not in str(error.value)


def test_model_revision_without_a_checkpoint_is_refused():
    with pytest.raises(ValueError, match="^model_revision: applies to model_name_or_path"):
        check_model_fields(ModelArguments(model_config="gpt2", model_revision="v2"))


REFUSED_TRAINING = [
    (SFTConfig, {"model_init_kwargs": {"dtype": "bfloat16"}}, {}, "model_init_kwargs: the pipeline loads the model"),
    (DPOConfig, {"model_init_kwargs": {"device_map": "auto"}}, {}, "model_init_kwargs: the pipeline loads the model"),
    (SFTConfig, {"dataset_text_field": "content"}, {}, "dataset_text_field: the SFT data always reaches"),
    (SFTConfig, {"assistant_only_loss": True}, {}, "assistant_only_loss: conversations are rendered to text"),
    (SFTConfig, {"chat_template_path": "t.jinja"}, {}, "chat_template_path: the data is rendered"),
    (SFTConfig, {"packing": True, "packing_strategy": "wrapped", "eos_token": "<|im_end|>"}, {}, "eos_token: is not"),
    (SFTConfig, {}, {"max_prompt_length": 64}, "max_prompt_length: is read only by DPO"),
    (DPOConfig, {"padding_free": True}, {}, "padding_free: TRL 1.16's DPOTrainer switches it off"),
    (DPOConfig, {"truncation_mode": "keep_end"}, {}, "truncation_mode: keep_end is not applied with prefix_sharing"),
    (DPOConfig, {"pad_to_multiple_of": 8}, {}, "pad_to_multiple_of: is not applied with prefix_sharing"),
    (DPOConfig, {"ref_model_sync_steps": 64}, {}, "ref_model_sync_steps: is read only with sync_ref_model"),
    (DPOConfig, {"ref_logps_cache_dir": "cache"}, {}, "ref_logps_cache_dir: is read only with precompute_ref"),
    (
        DPOConfig,
        {},
        {"dataset_name": None, "datasets": [{"path": "a.jsonl"}], "dataset_config": "x"},
        "dataset_config: is read only without",
    ),
]


@pytest.mark.parametrize(("config", "settings", "data_settings", "line"), REFUSED_TRAINING, ids=lambda x: str(x)[:40])
def test_refused_training_and_data_fields_stop_in_one_line(tmp_path, config, settings, data_settings, line):
    args = config(str(tmp_path), max_steps=1, **CPU, **settings)
    with pytest.raises(ValueError, match="^" + line) as error:
        check_trainable(args, data(**data_settings))
    assert "\n" not in str(error.value)


def test_refused_only_where_ignored(tmp_path):
    """The same fields are honoured where something reads them."""
    assert (
        problems("DPOConfig", DPOConfig(str(tmp_path), truncation_mode="keep_end", prefix_sharing=False, **CPU)) == []
    )
    assert problems("DPOConfig", DPOConfig(str(tmp_path), sync_ref_model=True, ref_model_sync_steps=64, **CPU)) == []
    assert problems("SFTConfig", SFTConfig(str(tmp_path), eos_token="<|endoftext|>", **CPU)) == []
    check_training_fields(DPOConfig(str(tmp_path), **CPU), data(max_prompt_length=64))  # DPO reads it


def test_honoured_model_fields_reach_the_loader_and_the_lora_config():
    kwargs = model_loading(
        model(model_revision="v1", dtype="bfloat16", attn_implementation="sdpa", model_implementation="transformers"),
        True,
    )
    assert kwargs["revision"] == "v1" and kwargs["dtype"] == "bfloat16" and kwargs["attn_implementation"] == "sdpa"
    assert kwargs["implementation"] == "transformers" and kwargs["trust_remote_code"] is True
    assert kwargs["quantization_config"] is None
    lora = get_peft_config(
        model(use_peft=True, lora_r=4, use_rslora=True, use_dora=True, lora_modules_to_save=["lm_head"])
    )
    assert (lora.r, lora.use_rslora, lora.use_dora, lora.task_type) == (4, True, True, "CAUSAL_LM")
    assert lora.modules_to_save == ["lm_head"]


def test_honoured_quantization_fields_reach_the_bitsandbytes_config():
    pytest.importorskip("bitsandbytes")
    settings = dict(use_peft=True, load_in_4bit=True, bnb_4bit_quant_type="fp4", use_bnb_nested_quant=True)
    quantization = model_loading(model(**settings, dtype="bfloat16"), False)["quantization_config"]
    assert quantization.load_in_4bit and quantization.bnb_4bit_quant_type == "fp4"
    assert quantization.bnb_4bit_use_double_quant and str(quantization.bnb_4bit_compute_dtype) == "torch.bfloat16"


def test_honoured_data_fields_reach_the_specs_and_the_split(tmp_path):
    data_args = data(dataset_config="harmless", dataset_train_split="train_prefs", dataset_test_split="test_prefs")
    assert data_args.specs() == [
        {"path": "rows.jsonl", "split": "train_prefs", "format": None, "name": "harmless", "test_split": "test_prefs"}
    ]
    split = split_settings(data(dataset_seed=7, test_split_size=20), SFTConfig(str(tmp_path), seed=1, **CPU))
    assert split == {"seed": 7, "test_size": 20}
