"""Our GPT-2 checkpoints in transformers' stock GPT-2 format (`GPT2LMHeadModel`, model_type "gpt2").

A run saves `model_type: alignment_gpt2` with remote code; the weights are exactly GPT-2's, but vLLM, TGI, llama.cpp's
converters and lm-eval's `hf` model (without trust_remote_code) only read the stock format. Exporting is the reverse
of `conversion.py` and reads the same tables: same names, the four projections transposed into `Conv1D` (in, out),
a `GPT2Config` with our fields and the architecture settings ours fixes. It is lossless: the written tensors are
read back and compared bit for bit.

What does not travel: the attention implementation (a runtime choice, not part of the weights; stock GPT-2 picks its
own, same formula), and our forward's extras (`segment_ids`, positions counted from the attention mask: stock GPT-2
counts them 0..T-1 in a plain forward, so left-padded batches need explicit `position_ids` there; `generate` already
derives them from the mask).

    python scripts/export.py RUN_DIR OUT_DIR
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel, PreTrainedConfig, PreTrainedModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from .chat_templates import fit_model_to_tokenizer
from .configuration_gpt2 import AlignmentGPT2Config
from .conversion import CONV1D_WEIGHTS, GPT2_ARCHITECTURE, SHARED_GPT2_FIELDS, to_gpt2_state_dict
from .loading import checkpoint_config, load_model
from .modeling_gpt2 import AlignmentGPT2ForCausalLM, AlignmentGPT2Model
from .tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

# What a tokenizer may be saved as; whichever of these the exported folder has is copied byte for byte.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt", "chat_template.jinja", "chat_template.json",
)  # fmt: skip
# The run's card, with the curves and the recipe it links to: what the export is, wherever it is pushed.
PROVENANCE_FILES = ("README.md", "recipe.yaml", "plots")
# Fields every transformers config has; ours must have nothing else but the fields GPT2Config shares.
GENERIC_FIELDS = frozenset(PreTrainedConfig().to_dict())
NOT_WRITTEN = ("model_type", "architectures", "auto_map", "transformers_version", "_name_or_path")


class ExportError(ValueError):
    """What cannot be exported, in one line."""


def check_out_dir(out_dir: str | os.PathLike) -> Path:
    """The export goes into a new or empty folder: it never overwrites anything."""
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} is a file; export into a new or empty folder")
    if out.is_dir() and any(out.iterdir()):
        raise ExportError(f"{out} already holds files; export into a new or empty folder (nothing is overwritten)")
    return out


def stock_gpt2_config(config: AlignmentGPT2Config, dtype: torch.dtype) -> GPT2Config:
    """Our config as transformers' `GPT2Config`; refuses a field of ours stock GPT-2 has no equivalent for."""
    fields = {k: v for k, v in config.to_dict().items() if k not in NOT_WRITTEN}
    unknown = sorted(set(fields) - GENERIC_FIELDS - set(SHARED_GPT2_FIELDS))
    if unknown:
        raise ExportError(f"stock GPT-2 has no config field for {', '.join(unknown)}; this model cannot be exported")
    fields.update(GPT2_ARCHITECTURE, use_cache=True)  # runs save use_cache=False (training); inference wants it
    fields["dtype"] = str(dtype).removeprefix("torch.")
    return GPT2Config(**fields, architectures=["GPT2LMHeadModel"])


def causal_lm_of_ours(model: Any, where: str) -> AlignmentGPT2ForCausalLM:
    """The model to export, or one line saying why it is not exportable: a LoRA model is merged (on a copy)."""
    from peft import PeftModel  # here: importing peft costs seconds, and only LoRA needs it

    config = getattr(model, "config", None)  # a PeftModel's is its base's
    if isinstance(config, PreTrainedConfig):
        refuse_quantized(config.to_dict(), where)
    if isinstance(model, PeftModel):
        model = copy.deepcopy(model).merge_and_unload()
    if isinstance(model, AlignmentGPT2ForCausalLM):
        return model
    if isinstance(model, AlignmentGPT2Model):
        raise ExportError(f"{where} is our bare GPT-2 backbone (no LM head); export AlignmentGPT2ForCausalLM")
    model_type = getattr(model.config, "model_type", None) if isinstance(model, PreTrainedModel) else None
    if isinstance(model, PreTrainedModel):
        raise ExportError(
            f"{where} is a {model_type!r} model ({type(model).__name__}), already in transformers' stock format; "
            "save it with save_pretrained, no export needed"
        )
    raise ExportError(f"{where} is not a model (got {type(model).__name__})")


def export_model(
    model: AlignmentGPT2ForCausalLM,
    out_dir: Path,
    *,
    tokenizer: Any = None,
    tokenizer_dir: Path | None = None,
    generation_config: GenerationConfig | None = None,
    extra_files: tuple[Path, ...] | list[Path] = (),
) -> Path:
    """Write the stock layout into a temporary sibling of `out_dir`, check it, then move it into place: a failed
    export leaves nothing behind (and so never blocks the next try with a half-written folder)."""
    state = {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}
    config = stock_gpt2_config(model.config, state["transformer.wte.weight"].dtype)
    with torch.device("meta"):  # no random init of weights that are replaced right away
        stock = GPT2LMHeadModel(config)
    stock.load_state_dict(to_gpt2_state_dict(state), strict=True, assign=True)
    if config.tie_word_embeddings:
        stock.tie_weights()
    stock.generation_config = copy.deepcopy(generation_config or model.generation_config)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # a folder like any other, not mkdtemp's private 0700
    try:
        stock.save_pretrained(staging)
        check_written(staging, state, config.tie_word_embeddings)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        elif tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                if (tokenizer_dir / name).is_file():
                    shutil.copy2(tokenizer_dir / name, staging / name)
        for path in extra_files:
            if path.is_dir():
                shutil.copytree(path, staging / path.name)
            else:
                shutil.copy2(path, staging / path.name)
        check_out_dir(out_dir)  # nothing appeared there meanwhile
        if out_dir.is_dir():
            out_dir.rmdir()
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def check_written(folder: Path, ours: dict[str, torch.Tensor], tied: bool) -> None:
    """Every saved tensor is ours, bit for bit (transposed where Conv1D wants it), and none is missing."""
    from safetensors import safe_open

    expected = {k: v for k, v in ours.items() if not (tied and k == "lm_head.weight")}
    seen = set()
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118  (safe_open is not a mapping)
                written = f.get_tensor(name)
                if name.endswith(CONV1D_WEIGHTS):
                    written = written.t()
                if name not in expected or not torch.equal(written, expected[name]):
                    raise ExportError(f"export check failed: {name} differs from the model's weights")
                seen.add(name)
    if seen != set(expected):
        raise ExportError(f"export check failed: {sorted(set(expected) - seen)[:5]} were not written")


def export_stock_gpt2(
    model_or_folder: Any,
    out_dir: str | os.PathLike,
    *,
    tokenizer: Any = None,
    generation_config: GenerationConfig | None = None,
) -> Path:
    """Write our GPT-2 as transformers' stock `GPT2LMHeadModel` into `out_dir` (new or empty), with the tokenizer
    (and its chat template) and generation config; returns `out_dir`.

    `model_or_folder` is a run folder of ours (full model; a LoRA run: its `merged/` if saved, else the adapter merged
    into its base) or an in-memory model (ours, or a PEFT model on ours: merged on a copy); for an in-memory model
    pass `tokenizer` to have one saved. Anything else is refused with an `ExportError` of one line."""
    out = check_out_dir(out_dir)
    if isinstance(model_or_folder, (str, os.PathLike)):
        return export_run_folder(Path(model_or_folder).expanduser(), out)
    model = causal_lm_of_ours(model_or_folder, "the model")
    return export_model(model, out, tokenizer=tokenizer, generation_config=generation_config)


def export_run_folder(folder: Path, out: Path) -> Path:
    """A run folder of ours: the full model, or a LoRA run's merged model (saved, else merged here; a QLoRA run's
    quantized `merged/` is not GPT-2's weights, so it is merged here too)."""
    if not folder.is_dir():
        raise ExportError(f"{folder}: no such folder")
    extras = [folder / name for name in PROVENANCE_FILES if (folder / name).exists()]
    if (folder / "adapter_config.json").is_file():
        merged = folder / "merged"
        if (merged / "config.json").is_file() and not checkpoint_config(str(merged)).get("quantization_config"):
            logger.info("%s is a LoRA run: exporting its merged model (%s)", folder, merged)
            return export_full_folder(merged, out, extras)
        model, generation = merge_lora_run(folder)
        return export_model(model, out, tokenizer_dir=folder, generation_config=generation, extra_files=extras)
    return export_full_folder(folder, out, extras)


def export_full_folder(folder: Path, out: Path, extras: list[Path]) -> Path:
    """A folder holding our full model (a run, or a LoRA run's `merged/`)."""
    config = checkpoint_config(str(folder))
    refuse_other_model_type(config.get("model_type"), str(folder))
    refuse_quantized(config, str(folder))
    model = load_model(str(folder), dtype="auto")  # our class, from this package: the folder's code is not run
    generation = GenerationConfig.from_pretrained(folder) if (folder / "generation_config.json").is_file() else None
    return export_model(
        causal_lm_of_ours(model, str(folder)),
        out,
        tokenizer_dir=folder,
        generation_config=generation,
        extra_files=extras,
    )


def refuse_quantized(config: dict[str, Any], where: str) -> None:
    """Quantized weights (bitsandbytes) are not GPT-2's: a QLoRA run is exported from its folder, which merges the
    adapter into the full-precision base."""
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "quantized")
        raise ExportError(
            f"{where} holds {method} quantized weights, which stock GPT-2 cannot hold; export the run folder instead "
            "(its adapter is merged into the full-precision base)"
        )


def refuse_other_model_type(model_type: str | None, where: str, lora: bool = False) -> None:
    """Only our GPT-2 needs (and can have) an export; a stock model is told so."""
    if model_type == AlignmentGPT2Config.model_type:
        return
    if model_type is None:
        raise ExportError(f"{where} has no model_type in its config.json; it is not a checkpoint of ours")
    what = f"a LoRA adapter on a {model_type!r} model" if lora else f"a {model_type!r} model"
    if model_type in CONFIG_MAPPING:
        merge = " (merge the adapter with peft's merge_and_unload)" if lora else ""
        raise ExportError(
            f"{where} holds {what}, already in transformers' stock format: load it with AutoModelForCausalLM{merge}; "
            f"only our GPT-2 ({AlignmentGPT2Config.model_type}) needs exporting"
        )
    raise ExportError(f"{where} holds {what}; only our GPT-2 ({AlignmentGPT2Config.model_type}) can be exported")


def merge_lora_run(folder: Path) -> tuple[AlignmentGPT2ForCausalLM, GenerationConfig]:
    """A LoRA run without `merged/`: its base, grown to the run's tokenizer as in training, with the adapter merged.
    The base loads in full precision, also for QLoRA runs (merging into quantized weights would round them)."""
    from peft import PeftModel

    adapter = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    base = adapter.get("base_model_name_or_path")
    if not base:
        raise ExportError(
            f"{folder} is a LoRA adapter on a randomly initialised base that was not saved, so there is nothing to "
            "merge it into; train with merge_adapter_on_save: true to keep the merged model"
        )
    revision = adapter.get("revision")
    model_type = checkpoint_config(base, revision).get("model_type")
    if model_type != "gpt2":  # official GPT-2 checkpoints convert into ours on load
        refuse_other_model_type(model_type, str(folder), lora=True)
    model = load_model(base, revision=revision, dtype="auto")
    tokenizer = load_tokenizer(str(folder))
    fit_model_to_tokenizer(model, tokenizer)  # the rows the run added for its chat template's tokens
    merged = PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
    return causal_lm_of_ours(merged, str(folder)), model.generation_config


def main(argv: list[str] | None = None) -> Path:
    """`scripts/export.py RUN_DIR OUT_DIR`: errors are one line through `alignment.run.cli.run_cli`."""
    parser = argparse.ArgumentParser(
        prog="scripts/export.py",
        description="Export a run of ours (full or LoRA) as transformers' stock GPT-2 (GPT2LMHeadModel, model_type "
        "gpt2), loadable by vLLM, TGI, lm-eval and llama.cpp's converters without trust_remote_code.",
    )
    parser.add_argument("run_dir", help="a run folder (or any checkpoint folder of our GPT-2)")
    parser.add_argument("out_dir", help="a new or empty folder; nothing is overwritten")
    args = parser.parse_args(argv)
    out = export_stock_gpt2(args.run_dir, args.out_dir)
    print(f"exported {args.run_dir} as stock GPT-2 to {out}")
    return out


__all__ = ["ExportError", "export_stock_gpt2", "stock_gpt2_config"]
