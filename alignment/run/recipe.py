"""Recipes: one flat YAML file of settings, with command-line overrides, parsed into our config dataclasses.

    accelerate launch scripts/run_dpo.py recipes/gpt2_hh.yaml --beta=0.2 --learning_rate 1e-6

The recipe may also be given as TRL's `--config recipes/gpt2_hh.yaml`. Every key must belong to one of the
dataclasses; an unknown key or a value of the wrong type is one clear error, before anything is loaded. Values from
the YAML file are checked exactly like command-line values (so `learning_rate: 5e-7`, which YAML reads as a string,
works too). `--key=null` (also `none`, `~` or nothing after `=`) unsets an optional key, as `key: null` does in the
file. The resolved recipe (every setting, defaults included, secrets left out) is written next to the checkpoints.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import enum
import json
import os
import typing
from pathlib import Path
from typing import Any

import yaml
from transformers.hf_argparser import string_to_bool
from trl import TrlParser

from ..training.configs import check_batch_keys
from .machine import machine_defaults

SECRET_KEYS = ("hub_token", "token", "wandb_api_key")
RESOLVED_RECIPE = "recipe.yaml"


class RecipeError(ValueError):
    """A recipe or command line that cannot be used as it is; the message says what to change."""


def split_recipe_path(argv: list[str]) -> tuple[str | None, list[str]]:
    """The recipe path (positional, or TRL's `--config PATH` / `--config=PATH`) and the remaining overrides."""
    argv = list(argv)
    path = None
    if argv and not argv[0].startswith("-"):
        path = argv.pop(0)
    for i, arg in enumerate(argv):
        if arg == "--config" or arg.startswith("--config="):
            if path is not None:
                raise RecipeError("give the recipe once: either as the first argument or with --config")
            if arg == "--config":
                if i + 1 >= len(argv):
                    raise RecipeError("--config needs a path to a recipe YAML file")
                path = argv[i + 1]
                del argv[i : i + 2]
            else:
                path = arg.split("=", 1)[1]
                del argv[i]
            break
    return path, argv


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {key!r} is given twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def yaml_problem(error: yaml.YAMLError) -> str:
    """PyYAML's problem and where it is ("line 3, column 1: found character '\t' ..."), on one line."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    context = getattr(error, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + (f"{problem} ({context})" if context and context != problem else problem)


def read_recipe(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise RecipeError(f"recipe file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            recipe = yaml.load(f, Loader=UniqueKeyLoader) or {}
    except yaml.YAMLError as error:
        raise RecipeError(f"{path} is not valid YAML: {yaml_problem(error)}") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{path} is not UTF-8 text") from None
    if not isinstance(recipe, dict):
        raise RecipeError(f"{path} must be a YAML mapping of settings (key: value), got {type(recipe).__name__}")
    return recipe


def unknown_key_error(key: str, known: list[str], where: str) -> RecipeError:
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see the README for the recipe keys"
    return RecipeError(f"unknown {where} key {key!r}{hint}")


def override_keys(argv: list[str]) -> list[str]:
    """The keys named on the command line (`--key=value`, `--key value` or `--key-name ...`)."""
    return [arg[2:].split("=", 1)[0].replace("-", "_") for arg in argv if arg.startswith("--")]


def checked_value(action: argparse.Action, key: str, value: Any) -> Any:
    """Convert a YAML value the way argparse converts the same value given on the command line."""
    if value is None or isinstance(value, dict) or action.type is None:
        return value
    if isinstance(value, list):
        if all(isinstance(item, dict) for item in value):
            return value
        return [checked_value(action, key, item) for item in value]
    is_bool_field = getattr(action.type, "__name__", "") == string_to_bool.__name__  # also for Optional[bool]
    try:
        if is_bool_field and isinstance(value, str):  # "no", "true", ... as on the command line
            converted = action.type(value)
        elif isinstance(value, bool) != is_bool_field and action.type is not str:
            raise ValueError("a yes/no value where another type is expected, or the other way round")
        else:
            converted = value if isinstance(value, bool) and is_bool_field else action.type(str(value))
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        expected = "yes/no value" if is_bool_field else getattr(action.type, "__name__", "value of another type")
        raise RecipeError(f"recipe key {key!r}: {value!r} is not a valid {expected}") from None
    if action.choices is not None and converted not in action.choices:
        raise RecipeError(f"recipe key {key!r}: {value!r} is not one of {list(action.choices)}")
    return converted


NULL_SPELLINGS = ("null", "none", "~", "")  # `--key=null` unsets an optional key, as `key: null` in YAML does
KEEPS_NONE_AS_TEXT = ("report_to",)  # `--report_to none` is transformers' "no integration", not unset


def optional_keys(dataclass_types: tuple[type, ...]) -> set[str]:
    """The fields that accept None (typed `X | None`, or None by default)."""
    keys = set()
    for cls in dataclass_types:
        try:
            hints = typing.get_type_hints(cls)
        except Exception:  # a forward reference that does not resolve: fall back on the defaults
            hints = {}
        for f in dataclasses.fields(cls):
            hint = hints.get(f.name)
            if f.default is None or (hint is not None and type(None) in typing.get_args(hint)):
                keys.add(f.name)
    return keys


def take_nulls(overrides: list[str], optional: set[str], actions: dict[str, argparse.Action]) -> tuple[dict, list]:
    """Pull `--key=null` (or `--key null`, `--key=~`, `--key=`) out of the command line: {key: None}, the rest.
    A key that cannot be None is refused in one line."""
    nulls, rest, i = {}, [], 0
    while i < len(overrides):
        arg = overrides[i]
        if arg.startswith("--") and "=" in arg:
            key, value, width = arg[2:].split("=", 1)[0].replace("-", "_"), arg.split("=", 1)[1], 1
        elif arg.startswith("--") and i + 1 < len(overrides) and not overrides[i + 1].startswith("--"):
            key, value, width = arg[2:].replace("-", "_"), overrides[i + 1], 2
        else:
            rest.append(arg)
            i += 1
            continue
        choices = getattr(actions.get(key), "choices", None) or ()
        is_null = value.strip().lower() in NULL_SPELLINGS and value not in choices
        if is_null and key in actions and key not in KEEPS_NONE_AS_TEXT:
            if key not in optional:
                raise RecipeError(f"--{key}={value}: {key!r} cannot be unset (it has no null value); give a value")
            nulls[key] = None
        else:
            rest.extend(overrides[i : i + width])
        i += width
    return nulls, rest


def json_list(text: str) -> list[Any]:
    """A list-of-mappings setting given on the command line: a JSON list, or one JSON object."""
    value = json.loads(text)
    return value if isinstance(value, list) else [value]


def parse_recipe(dataclass_types: tuple[type, ...], argv: list[str]) -> tuple[Any, ...]:
    """Parse `[recipe.yaml] [--key=value ...]` into one instance of each dataclass type, with this machine's
    defaults (`alignment.run.machine`) under whatever the recipe and the command line set."""
    path, overrides = split_recipe_path(argv)
    parser = TrlParser(dataclass_types, exit_on_error=False)
    actions = {action.dest: action for action in parser._actions if action.dest != "help"}
    for action in actions.values():
        if typing.get_origin(action.type) is dict:  # list[dict] (`datasets`): argparse would call dict(text)
            action.type, action.nargs = json_list, None
    known = sorted(actions)

    recipe = read_recipe(path) if path is not None else {}
    env = recipe.pop("env", None) or {}
    if not isinstance(env, dict):
        raise RecipeError(f"recipe key 'env' must be a mapping of NAME: value, got {type(env).__name__}")
    for name, value in env.items():
        os.environ[str(name)] = str(value)
    for key in recipe:
        if key not in actions:
            raise unknown_key_error(key, known, "recipe")
    flags = {opt[2:].replace("-", "_") for action in parser._actions for opt in action.option_strings}
    for key in override_keys(overrides):
        if key not in flags:  # option names, not dests: `--help` and `--no_gradient_checkpointing` are fine
            raise unknown_key_error(key, known, "command-line")
    explicit = set(recipe) | set(override_keys(overrides))
    nulls, overrides = take_nulls(overrides, optional_keys(dataclass_types), actions)
    recipe.update(nulls)
    fitted = {key: value for key, value in machine_defaults(explicit).items() if key in actions}
    parser.set_defaults_with_config(**fitted, **{k: checked_value(actions[k], k, v) for k, v in recipe.items()})

    try:
        configs = tuple(parser.parse_args_into_dataclasses(args=overrides))
        for config in configs:  # gradient_accumulation_steps: 1 next to global_batch_size, which only we see
            check_batch_keys(config, explicit)
        return configs
    except argparse.ArgumentError as error:
        raise RecipeError(str(error)) from None
    except (ValueError, TypeError) as error:  # a dataclass's own validation
        raise RecipeError(str(error).splitlines()[0]) from None


def resolved_recipe(*configs: Any) -> dict[str, Any]:
    """Every setting of the parsed configs as one flat mapping, secrets left out; parses back as a recipe.

    Unset (None) settings are written too: leaving them out would turn a default switched off on purpose
    (`max_length: null`) back into the default when the file is parsed again.
    """
    resolved: dict[str, Any] = {}
    for config in configs:
        values = config.to_dict() if hasattr(config, "to_dict") else dataclasses.asdict(config)
        init_fields = {f.name for f in dataclasses.fields(config) if f.init}
        for key, value in values.items():
            if key not in init_fields or key in SECRET_KEYS:  # exact names: `pad_token` is no secret
                continue
            if key.endswith("_token"):  # TrainingArguments.to_dict masks them all, `pad_token` included
                value = getattr(config, key)
            resolved[key] = plain(value)
    return resolved


def plain(value: Any) -> Any:
    """YAML-safe form of a config value."""
    if value is None or value == "None":  # TrainingArguments.to_dict writes nested Nones as "None"
        return None
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def save_resolved_recipe(output_dir: str | os.PathLike, *configs: Any) -> Path:
    path = Path(output_dir) / RESOLVED_RECIPE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(yaml.safe_dump(resolved_recipe(*configs), sort_keys=True), encoding="utf-8")
    tmp.replace(path)
    return path
