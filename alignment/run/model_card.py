"""The run's model card (README.md), written by us rather than TRL: TRL's card names a local base model as "None",
links local data files as Hub datasets, leaks absolute paths and shows a chat quick start for any model.

Ours says what the weights descend from (the Hub model the lineage started at, followed through the `recipe.yaml`
of every local checkpoint on the way, or a random initialisation), what data trained them (Hub ids in the metadata,
local files by their base name in the text only), the final metrics and curves, and a quick start in the prompt
format the model was trained on. No absolute local path appears in it.

License: the recipe's `hub_license` when set; else MIT when the lineage started from OpenAI's GPT-2 weights (their
license); else none is claimed (the base model's or the data's license governs, and we cannot know it offline).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import yaml

from .recipe import RESOLVED_RECIPE

logger = logging.getLogger(__name__)

HUB_RECORD = ".hub-push.json"  # written by `push_folder` after a push: where this folder lives on the Hub
GPT2_HUB_IDS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
GPT2_LICENSE = "mit"  # openai-community/gpt2*: MIT
LOCAL_BUILDERS = ("json", "csv", "parquet", "text", "arrow")  # `datasets` builders that read local data_files
DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt", ".arrow")
HH_PROMPT = "\n\nHuman: What is the capital of France?\n\nAssistant:"
QUESTION = "What is the capital of France?"
MAX_LINEAGE = 32  # local checkpoints followed before giving up (a loop of recipes pointing at each other)


# --- where the weights come from -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Lineage:
    """What a model descends from. `hub_id`: the nearest Hub model in its history (None: none is known);
    `local_steps`: base names of the local checkpoints between that and the model (oldest first);
    `random_init`: the config name a random initialisation used; `unknown`: a local folder of untraceable origin."""

    hub_id: str | None = None
    revision: str | None = None
    local_steps: tuple[str, ...] = ()
    random_init: str | None = None
    unknown: str | None = None

    def describe(self) -> str:
        """The card's base-model line: a Hub id, a random initialisation or an untraceable folder, never a path."""
        if self.hub_id:
            start = f"[{self.hub_id}](https://huggingface.co/{self.hub_id})"
            if self.revision and self.revision != "main":
                start += f" (revision `{self.revision}`)"
        elif self.random_init:
            start = f"{self.random_init} (random initialisation)"
        else:
            start = f"`{self.unknown}` (a local checkpoint of unknown origin)"
        via = " → ".join(f"`{step}` (local)" for step in self.local_steps)
        return f"{start} → {via}" if via else start


def looks_like_hub_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def hub_id_of_cache_folder(folder: Path) -> str | None:
    """`.../models--org--name/snapshots/<sha>` (the Hub cache) is `org/name`."""
    for part in reversed(folder.parts):
        if part.startswith("models--"):
            return part[len("models--") :].replace("--", "/")
    return None


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        value = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def pushed_to(folder: Path) -> dict[str, Any]:
    """Where `push_folder` put this folder, if it did."""
    try:
        record = json.loads((folder / HUB_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) and record.get("repo_id") else {}


def config_name(model_config: str) -> str:
    """A random initialisation's config as the card names it: a preset or Hub id as it is, a folder by its name."""
    path = Path(model_config).expanduser()
    return f"`{path.name}`" if path.is_dir() or path.is_absolute() else f"`{model_config}`"


def trace_lineage(
    model_name_or_path: str | None, model_config: str | None = None, revision: str | None = None
) -> Lineage:
    """Follow a local checkpoint back to the Hub: a folder pushed by us is its Hub repo; a folder from the Hub cache
    is that repo; a run folder's `recipe.yaml` names what it was trained from, and so on until a Hub id."""
    steps: list[str] = []
    seen: set[Path] = set()
    name, config = model_name_or_path, model_config
    while len(steps) < MAX_LINEAGE:
        if name is None:
            return Lineage(local_steps=tuple(reversed(steps)), random_init=config_name(config or "unknown config"))
        folder = Path(str(name)).expanduser()
        if not folder.is_dir():
            if folder.is_absolute() or not looks_like_hub_id(str(name)):  # a local path that no longer exists
                return Lineage(local_steps=tuple(reversed(steps)), unknown=folder.name)
            return Lineage(hub_id=str(name), revision=revision, local_steps=tuple(reversed(steps)))
        folder = folder.resolve()
        record = pushed_to(folder)
        cached = hub_id_of_cache_folder(folder)
        if record or cached:
            hub_id = record.get("repo_id") or cached
            return Lineage(hub_id=hub_id, revision=record.get("revision"), local_steps=tuple(reversed(steps)))
        recipe = read_yaml(folder / RESOLVED_RECIPE)
        if folder in seen or not recipe:
            return Lineage(local_steps=tuple(reversed(steps)), unknown=folder.name)
        seen.add(folder)
        steps.append(folder.name)
        name, config, revision = (
            recipe.get("model_name_or_path"),
            recipe.get("model_config"),
            recipe.get("model_revision"),
        )
        if name and not Path(str(name)).expanduser().is_absolute() and not Path(str(name)).exists():
            sibling = folder.parent / str(name)  # a relative path, written from another working directory
            name = str(sibling) if sibling.is_dir() else name
    return Lineage(local_steps=tuple(reversed(steps)), unknown=steps[-1] if steps else None)


def default_license(lineage: Lineage) -> str | None:
    """The license the base weights carry, where we know it: OpenAI's GPT-2 checkpoints are MIT."""
    gpt2 = {*GPT2_HUB_IDS, *(f"openai-community/{name}" for name in GPT2_HUB_IDS)}
    return GPT2_LICENSE if lineage.hub_id in gpt2 else None


# --- what data trained it --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataSource:
    name: str  # a Hub id, or a local file's / folder's base name
    on_hub: bool
    config: str | None = None

    def describe(self) -> str:
        if not self.on_hub:
            return f"`{self.name}` (local)"
        subset = f" ({self.config})" if self.config else ""
        return f"[{self.name}](https://huggingface.co/datasets/{self.name}){subset}"


def data_sources(specs: list[dict[str, Any]]) -> list[DataSource]:
    """Each source of the mixture: a Hub dataset, or local files named by their base names only."""
    sources = []
    for spec in specs:
        path = str(spec.get("path") or "")
        local = Path(path).expanduser()
        if path in LOCAL_BUILDERS:  # `json` with data_files: the files are the data
            files = spec.get("data_files") or []
            files = [files] if isinstance(files, str) else list(files.values() if isinstance(files, dict) else files)
            names = [Path(str(f)).name for f in files] or [path]
            sources += [DataSource(name, on_hub=False) for name in names]
        elif local.exists() or local.is_absolute() or path.startswith(".") or local.suffix in DATA_SUFFIXES:
            sources.append(DataSource(local.name, on_hub=False))
        else:
            sources.append(DataSource(path, on_hub=True, config=spec.get("name")))
    return sources


def prompt_style(example: dict[str, Any] | None) -> str | None:
    """How the quick start should prompt, from one training row: 'chat' (message lists, the tokenizer's chat
    template), 'hh' (Human:/Assistant: text) or 'text' (plain text)."""
    if not example:
        return None
    from trl.data_utils import is_conversational

    if is_conversational(example):
        return "chat"
    text = " ".join(str(v) for v in example.values() if isinstance(v, str))
    return "hh" if "Human:" in text and "Assistant:" in text else "text"


# --- the card --------------------------------------------------------------------------------------------------------


@dataclass
class RunCard:
    """What the card needs to know about a run; `write` (re)writes README.md in its output folder.

    Installed as the trainer's `create_model_card`, so that TRL's checkpoint saves write ours, not TRL's."""

    trainer: Any
    method: str  # "SFT" or "DPO"
    model_args: Any
    data_args: Any
    prompt_style: str | None = None

    def install(self) -> RunCard:
        self.trainer.create_model_card = self.create_model_card
        self.trainer.run_card = self
        return self

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """Called as TRL's (at every checkpoint save) or transformers' (`push_to_hub`); their arguments (model and
        dataset names, tags) are not needed: the card knows better."""
        if self.trainer.is_world_process_zero():
            self.write(Path(self.trainer.args.output_dir))

    def write(self, output_dir: Path, plots: list[Path] | tuple[Path, ...] = ()) -> Path:
        output_dir = Path(output_dir)
        text = card_text(self, output_dir, list(plots))
        path = output_dir / "README.md"
        tmp = path.with_suffix(".md.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
        return path


def read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def model_type_of(trainer: Any) -> str | None:
    model = trainer.model
    if hasattr(model, "get_base_model"):  # a PEFT model
        model = model.get_base_model()
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return model_type.removeprefix("alignment_") if model_type else None  # our GPT-2 class is GPT-2 on the Hub


def needs_remote_code(folder: Path) -> bool:
    """Our own model code travels with the weights (config.json's `auto_map`); a stock export needs none."""
    return "auto_map" in read_json(folder / "config.json")


def card_text(card: RunCard, output_dir: Path, plots: list[Path]) -> str:
    from huggingface_hub import ModelCard, ModelCardData

    trainer, model_args = card.trainer, card.model_args
    repo_id = trainer.args.hub_model_id or output_dir.name
    lineage = trace_lineage(model_args.model_name_or_path, model_args.model_config, model_args.model_revision)
    sources = data_sources(card.data_args.specs())
    adapter = (output_dir / "adapter_config.json").is_file() or bool(model_args.use_peft)
    model_type = model_type_of(trainer)
    tags = (
        ["alignment", "trl", card.method.lower()] + ([model_type] if model_type else []) + (["lora"] if adapter else [])
    )
    license_ = getattr(model_args, "hub_license", None) or default_license(lineage)
    data = ModelCardData(
        base_model=lineage.hub_id,
        datasets=[s.name for s in sources if s.on_hub] or None,
        library_name="peft" if adapter else "transformers",
        license=license_,
        pipeline_tag="text-generation",
        tags=tags,
    )
    summary = f"A {model_type or 'causal language'} model trained with {card.method} ([TRL](https://github.com/huggingface/trl))"
    if lineage.hub_id:
        summary += f", starting from [{lineage.hub_id}](https://huggingface.co/{lineage.hub_id})"
    elif lineage.random_init:
        summary += f", starting from random weights ({lineage.random_init} config): no pretrained base model"
    else:
        summary += f", starting from the local checkpoint `{lineage.unknown}`, whose origin is not recorded"
    if lineage.local_steps:
        summary += " via local checkpoints not on the Hub (" + ", ".join(f"`{s}`" for s in lineage.local_steps) + ")"
    summary += ", on " + ", ".join(s.describe() for s in sources) + "."
    if adapter:
        summary += " This repository holds a LoRA adapter, not the full weights."
    lines = [
        f"# {repo_id.split('/')[-1]}",
        "",
        summary,
        "",
        "## Quick start",
        "",
        quick_start(card, output_dir, repo_id, lineage),
    ]
    lines += ["## Training run", "", f"- method: {card.method}", f"- base model: {lineage.describe()}"]
    lines += [f"- data: {', '.join(s.describe() for s in sources)}"]
    if adapter:
        lines.append(f"- LoRA: r={model_args.lora_r}, alpha={model_args.lora_alpha}, dropout={model_args.lora_dropout}")
    lines += [f"- license: {license_}" if license_ else "- license: not stated (see the base model's and the data's)"]
    lines += ["- recipe: [`recipe.yaml`](recipe.yaml)", ""]
    lines += results_section(output_dir, plots)
    lines += versions_and_citations(trainer)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)).content


def quick_start(card: RunCard, output_dir: Path, repo_id: str, lineage: Lineage | None = None) -> str:
    """Code that runs as written once the folder is on the Hub as `repo_id`, in the prompt format of the training
    data: the tokenizer's chat template for conversations, HH's Human:/Assistant: turns, or plain text."""
    tokenizer = card.trainer.processing_class
    style = card.prompt_style
    if style is None:  # not known from the data: what the tokenizer suggests
        style = (
            "chat" if getattr(tokenizer, "chat_template", None) and "Human:" not in tokenizer.chat_template else "hh"
        )
    if style == "chat" and not getattr(tokenizer, "chat_template", None):
        style = "hh"
    merged = output_dir / "merged"
    load_args = [f'"{repo_id}"']
    if merged.is_dir():  # the adapter merged in: loads without peft or a base model
        load_args.append('subfolder="merged"')
        folder = merged
    else:
        folder = output_dir
    adapter = not merged.is_dir() and (output_dir / "adapter_config.json").is_file()
    if adapter:
        base = read_json(output_dir / "adapter_config.json").get("base_model_name_or_path")
        remote = bool(base) and Path(str(base)).is_dir() and needs_remote_code(Path(str(base)))
    else:
        remote = needs_remote_code(folder)
    if remote:
        load_args.append("trust_remote_code=True")
    loader = "AutoPeftModelForCausalLM" if adapter else "AutoModelForCausalLM"
    imports = ["from transformers import AutoModelForCausalLM, AutoTokenizer"]
    if adapter:
        imports = ["from peft import AutoPeftModelForCausalLM", "from transformers import AutoTokenizer"]
    code = [*imports, "", f"model = {loader}.from_pretrained({', '.join(load_args)})"]
    code.append(f"tokenizer = AutoTokenizer.from_pretrained({', '.join(load_args)})")
    if style == "chat":
        code += [
            f'messages = [{{"role": "user", "content": "{QUESTION}"}}]',
            "inputs = tokenizer.apply_chat_template(",
            '    messages, add_generation_prompt=True, return_tensors="pt", return_dict=True',
            ")",
        ]
    else:
        prompt = HH_PROMPT if style == "hh" else "The capital of France is"
        code += [f"prompt = {json.dumps(prompt)}", 'inputs = tokenizer(prompt, return_tensors="pt")']
    code += [
        "output = model.generate(**inputs, max_new_tokens=64, do_sample=False, pad_token_id=tokenizer.eos_token_id)",
        'print(tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))',
    ]
    note = {
        "chat": "The model was trained on conversations written with its tokenizer's chat template:",
        "hh": "The model was trained on Human:/Assistant: turns (Anthropic HH style); prompt it the same way:",
        "text": "The model was trained on plain text; give it text to continue:",
    }[style]
    text = f"{note}\n\n```python\n" + "\n".join(code) + "\n```\n"
    if adapter and lineage is not None and (lineage.local_steps or not lineage.hub_id):
        if lineage.local_steps:
            trained_on = f"the local checkpoint `{lineage.local_steps[-1]}`"
        else:
            trained_on = "randomly initialised weights" if lineage.random_init else f"`{lineage.unknown}`"
        text += (
            f"\nThe adapter was trained on top of {trained_on}, which is not on the Hub: loaded on "
            f"{lineage.hub_id or 'any other base model'} it is not the model that was trained.\n"
        )
    return text


def results_section(output_dir: Path, plots: list[Path]) -> list[str]:
    """The final metrics (`{split}_results.json`) and the training curves."""
    lines = []
    for split in ("train", "eval"):
        metrics = read_json(output_dir / f"{split}_results.json")
        if metrics:
            lines += [f"### Final {split} metrics", "", "| metric | value |", "| --- | --- |"]
            lines += [f"| {key} | {value:.4g} |" for key, value in metrics.items() if isinstance(value, (int, float))]
            lines.append("")
    if plots:
        lines += ["### Curves", ""]
        lines += [f"![{p.stem}]({p.relative_to(output_dir).as_posix()})" for p in plots] + [""]
    return lines


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def versions_and_citations(trainer: Any) -> list[str]:
    lines = ["### Framework versions", ""]
    lines += [f"- {name}: {package_version(name)}" for name in ("trl", "transformers", "torch", "peft", "datasets")]
    paper = getattr(trainer, "_paper", None) or {}
    citation = paper.get("citation")
    if citation:
        title = paper.get("title") or getattr(trainer, "_name", "the method")
        lines += ["", "## Citation", "", f"{title}:", "", "```bibtex", citation.strip(), "```"]
    return lines + [""]


def strip_local_paths(value: Any) -> Any:
    """A recipe value with absolute local paths cut to their base names (for what leaves this machine)."""
    if isinstance(value, str) and re.match(r"^(/|~/|[A-Za-z]:[\\/])", value):
        return Path(value).name
    if isinstance(value, list):
        return [strip_local_paths(v) for v in value]
    if isinstance(value, dict):
        return {k: strip_local_paths(v) for k, v in value.items()}
    return value
