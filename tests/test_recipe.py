"""Recipes: a YAML file plus command-line overrides, parsed into our config dataclasses, with one clear error for
anything that cannot be used, and a resolved copy that parses back to the same settings."""

import dataclasses
import os

import pytest
import yaml

from alignment.run.arguments import DataArguments, ModelArguments
from alignment.run.recipe import (
    RESOLVED_RECIPE,
    SECRET_KEYS,
    RecipeError,
    parse_recipe,
    resolved_recipe,
    save_resolved_recipe,
)
from alignment.training.configs import DPOConfig, SFTConfig

DPO = (ModelArguments, DataArguments, DPOConfig)
SFT = (ModelArguments, DataArguments, SFTConfig)
FAKE_SECRET = "hf_fakeSecretToken1234567890"


def write(tmp_path, content, name="recipe.yaml"):
    """A recipe file: a mapping is dumped as YAML, a string written as it is (to control how YAML reads it)."""
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content), encoding="utf-8")
    return str(path)


def base(tmp_path, **settings):
    return {"model_config": "gpt2", "dataset_name": "data.jsonl", "output_dir": str(tmp_path / "out"), **settings}


def one_line_error(types, argv):
    with pytest.raises(RecipeError) as error:
        parse_recipe(types, argv)
    message = str(error.value)
    assert message and "\n" not in message, message
    return message


# --- where the recipe comes from, and who wins -------------------------------------------------------------------


@pytest.mark.parametrize("form", ["positional", "--config PATH", "--config=PATH", "overrides before --config"])
def test_recipe_path_positional_or_trl_config_flag(tmp_path, form):
    path = write(tmp_path, base(tmp_path, beta=0.25, max_steps=7))
    argv = {
        "positional": [path],
        "--config PATH": ["--config", path],
        "--config=PATH": [f"--config={path}"],
        "overrides before --config": ["--seed", "3", "--config", path],
    }[form]
    model_args, data_args, args = parse_recipe(DPO, argv)
    assert model_args.model_config == "gpt2"
    assert data_args.dataset_name == "data.jsonl"
    assert (args.beta, args.max_steps) == (0.25, 7)
    assert args.seed == (3 if form == "overrides before --config" else 42)


def test_recipe_given_twice_or_config_without_path(tmp_path):
    path = write(tmp_path, base(tmp_path))
    assert "once" in one_line_error(DPO, [path, "--config", path])
    assert "--config" in one_line_error(DPO, ["--beta", "0.2", "--config"])


@pytest.mark.parametrize("style", ["--key=value", "--key value"])
def test_command_line_overrides_win_over_the_yaml(tmp_path, style):
    path = write(tmp_path, base(tmp_path, beta=0.1, learning_rate=1e-6, use_peft=False, loss_type=["sigmoid"]))
    overrides = {"beta": "0.3", "learning_rate": "2e-4", "use_peft": "true", "model_config": "gpt2-medium"}
    argv = [path]
    for key, value in overrides.items():
        argv += [f"--{key}={value}"] if style == "--key=value" else [f"--{key}", value]
    argv += ["--loss_type", "ipo", "hinge"]
    model_args, _, args = parse_recipe(DPO, argv)
    assert args.beta == 0.3 and args.learning_rate == 2e-4
    assert model_args.use_peft is True and model_args.model_config == "gpt2-medium"
    assert args.loss_type == ["ipo", "hinge"]


def test_dashed_and_negated_flags_are_known_keys(tmp_path):
    path = write(tmp_path, base(tmp_path))
    _, _, args = parse_recipe(DPO, [path, "--max-steps", "5", "--no_gradient_checkpointing", "--no-disable-dropout"])
    assert args.max_steps == 5 and args.gradient_checkpointing is False and args.disable_dropout is False


def test_yaml_scientific_notation_is_a_float(tmp_path):
    text = "model_config: gpt2\ndataset_name: data.jsonl\nlearning_rate: 5e-7\nbeta: 1e-1\n"
    assert yaml.safe_load(text)["learning_rate"] == "5e-7"  # YAML 1.1 reads it as a string
    path = write(tmp_path, text + f"output_dir: {tmp_path / 'out'}\n")
    _, _, args = parse_recipe(DPO, [path])
    assert isinstance(args.learning_rate, float) and args.learning_rate == 5e-7
    assert isinstance(args.beta, float) and args.beta == 0.1


def test_lists_and_mappings_arrive_intact(tmp_path):
    mixture = [
        {"path": "a.jsonl", "split": "train", "subsample": 0.5, "format": "preference"},
        {"path": "org/hh", "name": "harmless", "test_split": "test", "data_dir": "harmless-base"},
    ]
    text = f"""
model_config: gpt2
model_config_overrides: {{n_layer: 2, n_head: 4, n_embd: 64, n_positions: 128}}
datasets:
  - {{path: a.jsonl, split: train, subsample: 0.5, format: preference}}
  - {{path: org/hh, name: harmless, test_split: test, data_dir: harmless-base}}
loss_type: [sigmoid, ipo]
loss_weights: [1, 0.5]
lora_target_modules: [c_attn, c_proj]
report_to: [none]
output_dir: {tmp_path / "out"}
"""
    model_args, data_args, args = parse_recipe(DPO, [write(tmp_path, text)])
    assert model_args.model_config_overrides == {"n_layer": 2, "n_head": 4, "n_embd": 64, "n_positions": 128}
    assert data_args.datasets == mixture
    assert data_args.specs() == mixture
    assert args.loss_type == ["sigmoid", "ipo"]
    assert args.loss_weights == [1.0, 0.5]
    assert model_args.lora_target_modules == ["c_attn", "c_proj"]


def test_lists_and_mappings_on_the_command_line(tmp_path):
    model_args, data_args, _ = parse_recipe(
        DPO,
        [
            "--model_config",
            "gpt2",
            "--output_dir",
            str(tmp_path / "out"),
            "--model_config_overrides",
            '{"n_layer": 1, "n_embd": 16}',
            "--datasets",
            '[{"path": "a.jsonl", "fraction": 0.5}, {"path": "b.jsonl"}]',
        ],
    )
    assert model_args.model_config_overrides == {"n_layer": 1, "n_embd": 16}
    assert data_args.datasets == [{"path": "a.jsonl", "fraction": 0.5}, {"path": "b.jsonl"}]
    # a mixture in the YAML is replaced as a whole by the command line's
    path = write(tmp_path, base(tmp_path, dataset_name=None, datasets=[{"path": "yaml.jsonl"}]))
    _, data_args, _ = parse_recipe(DPO, [path, '--datasets={"path": "cli.jsonl"}'])
    assert data_args.datasets == [{"path": "cli.jsonl"}]


# --- errors: one line that says what to change --------------------------------------------------------------------


@pytest.mark.parametrize("where", ["yaml", "command line"])
@pytest.mark.parametrize(("typo", "suggestion"), [("betta", "beta"), ("lerning_rate", "learning_rate")])
def test_unknown_key_names_it_and_suggests_the_closest(tmp_path, where, typo, suggestion):
    if where == "yaml":
        argv = [write(tmp_path, base(tmp_path, **{typo: 0.1}))]
    else:
        argv = [write(tmp_path, base(tmp_path)), f"--{typo}=0.1"]
    message = one_line_error(DPO, argv)
    assert repr(typo) in message
    assert "did you mean" in message and suggestion in message.split("did you mean", 1)[1]
    assert ("recipe key" if where == "yaml" else "command-line key") in message


def test_unknown_key_far_from_any_known_one(tmp_path):
    message = one_line_error(DPO, [write(tmp_path, base(tmp_path, zzzqqq=1))])
    assert "'zzzqqq'" in message and "did you mean" not in message


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("beta", "abc", "float"),  # float
        ("learning_rate", True, "float"),
        ("max_steps", 2.5, "int"),  # int
        ("max_steps", "two", "int"),
        ("use_peft", "maybe", "yes/no"),  # bool
        ("use_peft", 1, "yes/no"),
        ("lr_scheduler_type", "cosin", "cosine"),  # choices (TrainingArguments enum)
        ("model_implementation", "foo", "alignment"),  # choices (our metadata)
        ("dtype", "float64", "float32"),
    ],
)
def test_wrong_value_type_in_the_yaml(tmp_path, key, value, expected):
    message = one_line_error(DPO, [write(tmp_path, base(tmp_path, **{key: value}))])
    assert repr(key) in message and expected in message


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("beta", "abc", "float"),
        ("max_steps", "2.5", "int"),
        ("use_peft", "maybe", "yes/no"),
        ("lr_scheduler_type", "cosin", "cosine"),
        ("model_implementation", "foo", "alignment"),
    ],
)
def test_wrong_value_type_on_the_command_line(tmp_path, key, value, expected):
    message = one_line_error(DPO, [write(tmp_path, base(tmp_path)), f"--{key}", value])
    assert key in message and expected in message


def test_yes_no_strings_in_the_yaml_read_like_the_command_line(tmp_path):
    path = write(tmp_path, base(tmp_path, use_peft="yes", packing="false"))
    model_args, _, args = parse_recipe(SFT, [path])
    assert model_args.use_peft is True and args.packing is False


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"beta": -1}, "beta must be > 0"),
        ({"loss_type": "dpo_typo"}, "unknown loss_type"),
        ({"model_config": None}, "model_config"),
    ],
)
def test_invalid_settings_caught_by_the_dataclasses(tmp_path, settings, expected):
    assert expected in one_line_error(DPO, [write(tmp_path, base(tmp_path, **settings))])


def test_missing_recipe_file(tmp_path):
    missing = str(tmp_path / "nope.yaml")
    message = one_line_error(DPO, [missing])
    assert "not found" in message and missing in message


@pytest.mark.parametrize(("text", "type_name"), [("- beta: 0.1\n- seed: 1\n", "list"), ("just a string\n", "str")])
def test_yaml_that_is_not_a_mapping(tmp_path, text, type_name):
    message = one_line_error(DPO, [write(tmp_path, text)])
    assert "mapping" in message and type_name in message


def test_invalid_yaml(tmp_path):
    path = write(tmp_path, "model_config: gpt2\nbeta: [0.1, 0.2\nseed: 1\n")
    message = one_line_error(DPO, [path])
    assert "not valid YAML" in message and path in message


def test_empty_recipe_uses_the_command_line(tmp_path):
    path = write(tmp_path, "")
    model_args, _, _ = parse_recipe(DPO, [path, "--model_config", "gpt2", "--dataset_name", "d.jsonl"])
    assert model_args.model_config == "gpt2"


# --- the resolved recipe -------------------------------------------------------------------------------------------


def settings_of(config):
    """Every comparable field of a config, secrets aside."""
    fields = dataclasses.fields(config)
    return {f.name: getattr(config, f.name) for f in fields if f.compare and f.name not in SECRET_KEYS}


@pytest.mark.parametrize("types", [SFT, DPO], ids=["sft", "dpo"])
def test_resolved_recipe_has_every_setting_no_secret_and_round_trips(tmp_path, types):
    extra = {
        "max_length": None,  # a default switched off on purpose must stay off
        "lr_scheduler_type": "cosine",
        "learning_rate": "5e-7",
        "report_to": ["none"],
        "eval_strategy": "steps",
        "eval_steps": 0.25,
        "tokenizer_name_or_path": "some/tokenizer",
        "pad_token": "<|pad|>",
        "use_peft": True,
        "lora_r": 4,
        "model_config_overrides": {"n_layer": 1, "n_embd": 16},
        "datasets": [{"path": "a.jsonl", "fraction": 0.5}, {"path": "b.jsonl", "format": "preference"}],
        "dataset_name": None,
        "hub_token": FAKE_SECRET,
    }
    if types is DPO:
        extra |= {"loss_type": ["sigmoid", "ipo"], "loss_weights": [1.0, 0.5], "rpo_alpha": 1.0, "beta": 0.2}
    else:
        extra |= {"completion_only_loss": True, "packing_strategy": "bfd"}
    configs = parse_recipe(types, [write(tmp_path, base(tmp_path, **extra)), "--seed", "7"])
    assert configs[2].hub_token == FAKE_SECRET and configs[2].max_length is None

    saved = save_resolved_recipe(tmp_path / "run", *configs)
    assert saved == tmp_path / "run" / RESOLVED_RECIPE
    text = saved.read_text(encoding="utf-8")
    assert FAKE_SECRET not in text and "hub_token" not in text
    written = yaml.safe_load(text)

    init_fields = {f.name for config in configs for f in dataclasses.fields(config) if f.init} - set(SECRET_KEYS)
    assert set(written) == init_fields  # every setting, defaults and unset ones included
    assert written["max_length"] is None and written["seed"] == 7 and written["learning_rate"] == 5e-7
    assert written["pad_token"] == "<|pad|>" and written["tokenizer_name_or_path"] == "some/tokenizer"

    reparsed = parse_recipe(types, [str(saved)])
    for before, after in zip(configs, reparsed):
        assert settings_of(after) == settings_of(before), type(before).__name__
    assert reparsed[2].hub_token is None
    assert resolved_recipe(*reparsed) == resolved_recipe(*configs) == written


def test_resolved_recipe_from_the_defaults_round_trips(tmp_path):
    argv = ["--model_config", "gpt2", "--dataset_name", "d.jsonl", "--output_dir", str(tmp_path)]
    configs = parse_recipe(SFT, argv)
    saved = save_resolved_recipe(tmp_path, *configs)
    assert not (tmp_path / "recipe.yaml.tmp").exists()
    for before, after in zip(configs, parse_recipe(SFT, [str(saved)])):
        assert settings_of(after) == settings_of(before)


# --- env ------------------------------------------------------------------------------------------------------------


def test_env_mapping_sets_environment_variables(tmp_path, monkeypatch):
    for name in ("ALIGNMENT_TEST_NAME", "ALIGNMENT_TEST_NUMBER"):
        monkeypatch.setenv(name, "before")  # so that monkeypatch removes them again afterwards
    path = write(tmp_path, base(tmp_path, env={"ALIGNMENT_TEST_NAME": "recipe", "ALIGNMENT_TEST_NUMBER": 3}))
    configs = parse_recipe(DPO, [path])
    assert os.environ["ALIGNMENT_TEST_NAME"] == "recipe"
    assert os.environ["ALIGNMENT_TEST_NUMBER"] == "3"
    assert "env" not in resolved_recipe(*configs)


def test_env_that_is_not_a_mapping(tmp_path):
    message = one_line_error(DPO, [write(tmp_path, base(tmp_path, env=["A=1"]))])
    assert "'env'" in message and "mapping" in message


def test_the_handbooks_dataset_mixture_and_trls_test_split_size(tmp_path):
    text = f"""
model_config: gpt2
output_dir: {tmp_path / "out"}
dataset_mixture:
  datasets:
    - {{id: HuggingFaceH4/ultrafeedback_binarized, split: train_prefs, columns: [prompt, chosen, rejected], weight: 0.5}}
    - {{id: org/extra, config: small}}
  seed: 7
  test_split_size: 0.1
"""
    _, data_args, args = parse_recipe(DPO, [write(tmp_path, text)])
    assert data_args.specs() == [
        {"path": "HuggingFaceH4/ultrafeedback_binarized", "split": "train_prefs",
         "columns": ["prompt", "chosen", "rejected"], "subsample": 0.5},
        {"path": "org/extra", "name": "small"},
    ]  # fmt: skip
    assert (data_args.dataset_seed, data_args.test_size) == (7, 0.1)
    _, data_args, _ = parse_recipe(DPO, [write(tmp_path, base(tmp_path)), "--test_split_size=0.2"])
    assert data_args.test_size == 0.2
    bad = text.replace("weight: 0.5", "wieght: 0.5")
    with pytest.raises(RecipeError, match="dataset_mixture entry .*unknown: \\['wieght'\\]"):
        parse_recipe(DPO, [write(tmp_path, bad)])


@pytest.mark.parametrize("spelling", ["null", "None", "~", ""])
def test_an_optional_key_is_unset_from_the_command_line(tmp_path, spelling):
    recipe = write(tmp_path, base(tmp_path, dataset_test_split="test", max_prompt_length=64))
    _, data_args, args = parse_recipe(DPO, [recipe, f"--dataset_test_split={spelling}", "--max_prompt_length", "null"])
    assert data_args.dataset_test_split is None and data_args.max_prompt_length is None
    _, _, args = parse_recipe(DPO, [recipe, "--report_to", "none"])  # transformers' "no integration" stays
    assert args.report_to == []
    with pytest.raises(RecipeError, match="'beta' cannot be unset"):
        parse_recipe(DPO, [recipe, "--beta=null"])
