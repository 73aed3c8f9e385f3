"""Bad input: one clear line, a non-zero exit, nothing lost.

A catalogue of what users get wrong, each case run through `alignment.run.cli.run_cli` (what the scripts run) in this
process: the exit code, exactly one `error:` line naming the problem and what to do, no traceback. A few run as real
processes, to prove the exit code and that nothing but that line (and the log) reaches the terminal. And a run never
overwrites a saved one.
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from alignment.run.cli import run_cli
from alignment.run.pipeline import run_dpo, run_sft
from alignment.training.checkpoints import check_output_dir, clear_previous_run

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = {"n_layer": 1, "n_head": 2, "n_embd": 16, "n_positions": 64}
BASE = {
    "model_config": "gpt2",
    "model_config_overrides": TINY_MODEL,
    "max_length": 32,
    "max_steps": 1,
    "per_device_train_batch_size": 2,
    "activation_checkpointing": False,
    "report_to": "none",
    "save_strategy": "no",
    "eval_strategy": "no",
    "test_size": 0,
    "seed": 0,
}
RUN = {"sft": run_sft, "dpo": run_dpo}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def pair(i, **overrides):
    row = {"prompt": f"\n\nHuman: What is {i} + 1?\n\nAssistant:", "chosen": f" {i + 1}", "rejected": f" {i + 2}"}
    return {**row, **overrides}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Data files and model folders the cases point at (built once)."""
    from transformers import (
        BertConfig,
        BertForMaskedLM,
        GPT2Config,
        GPT2LMHeadModel,
        T5Config,
        ViTConfig,
        ViTForImageClassification,
    )

    root = tmp_path_factory.mktemp("bad-input")
    data = root / "data"
    data.mkdir()
    files = {
        "sft": write_jsonl(data / "sft.jsonl", [{"text": f"Human: {i}?\n\nAssistant: {i}"} for i in range(8)]),
        "dpo": write_jsonl(data / "dpo.jsonl", [pair(i) for i in range(8)]),
        "qa": write_jsonl(data / "qa.jsonl", [{"question": "q", "answer": "a"}] * 4),
        "identical": write_jsonl(data / "identical.jsonl", [pair(i, rejected=f" {i + 1}") for i in range(6)]),
        "long_prompts": write_jsonl(data / "long.jsonl", [pair(i, prompt="Human: " + "why " * 40) for i in range(6)]),
        "all_bad": write_jsonl(
            data / "all_bad.jsonl",
            [
                pair(0, rejected=" 1"),
                pair(1, prompt="Human: " + "why " * 40),
                pair(2, chosen=""),
            ],
        ),
        "empty": str(data / "empty.jsonl"),
        "broken_json": str(data / "broken.jsonl"),
        "latin1": str(data / "latin1.jsonl"),
        "txt": str(data / "notes.txt"),
        "fake_parquet": str(data / "rows.parquet"),
    }
    Path(files["empty"]).write_text("")
    Path(files["broken_json"]).write_text('{"prompt": "a", "chosen": "b"\n', encoding="utf-8")
    Path(files["latin1"]).write_bytes(json.dumps(pair(0)).replace("What", "Qu\u00e9").encode("latin-1") + b"\n")
    Path(files["txt"]).write_text("hello\n")
    Path(files["fake_parquet"]).write_text('{"text": "a JSON line, not parquet"}\n')

    models = root / "models"
    BertForMaskedLM(
        BertConfig(vocab_size=99, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    ).save_pretrained(models / "bert")
    vit = ViTConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=8, patch_size=4
    )
    ViTForImageClassification(vit).save_pretrained(models / "vit")
    T5Config(d_model=16, num_layers=1, num_heads=2, d_ff=32, vocab_size=99).save_pretrained(models / "t5")
    GPT2LMHeadModel(GPT2Config(vocab_size=97, n_positions=64, n_embd=16, n_layer=1, n_head=2)).save_pretrained(
        models / "gpt2-vocab97"
    )
    truncated = models / "truncated"
    GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=64, n_embd=16, n_layer=1, n_head=2)).save_pretrained(
        truncated
    )
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a copy cut short
    diverged = GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=64, n_embd=16, n_layer=1, n_head=2))
    with torch.no_grad():
        diverged.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    diverged.save_pretrained(models / "diverged")
    (models / "no-config").mkdir()
    (models / "weights.safetensors").write_bytes(b"not a folder")
    (root / "a-file").write_text("")
    return SimpleNamespace(root=root, files=files, models=models)


def recipe(tmp_path, stage, **settings):
    """A recipe file for `stage` with `settings` over the tiny defaults (a None value removes the key)."""
    values = {**BASE, "dataset_name": None, "output_dir": str(tmp_path / "out"), **settings}
    if "model_name_or_path" in settings and "model_config_overrides" not in settings:
        values["model_config_overrides"] = None  # a checkpoint keeps its config: overrides would be refused
    values = {k: v for k, v in values.items() if v is not None}
    path = tmp_path / f"{stage}.yaml"
    path.write_text(yaml.safe_dump(values), encoding="utf-8")
    return str(path)


# Each case: (stage, recipe settings (callable of env → dict) or an argv builder, extra command-line args,
# substrings the one error line must hold).
CASES = {
    # --- the recipe ---
    "unknown recipe key": ("dpo", {"betta": 0.1}, [], ["unknown recipe key 'betta'", "did you mean", "beta"]),
    "unknown command-line key": (
        "dpo",
        {},
        ["--lerning_rate=1e-3"],
        ["unknown command-line key 'lerning_rate'", "learning_rate"],
    ),
    "wrong value type": ("dpo", {"beta": "abc"}, [], ["recipe key 'beta'", "'abc' is not a valid float"]),
    "value not among the choices": ("sft", {"lr_scheduler_type": "cosin"}, [], ["'lr_scheduler_type'", "cosine"]),
    "wrong type on the command line": ("dpo", {}, ["--max_steps", "two"], ["max_steps", "int"]),
    "missing recipe file": ("dpo", None, ["{root}/no-such-recipe.yaml"], ["recipe file not found", "no-such-recipe"]),
    "recipe not a mapping": ("dpo", "- beta: 0.1\n", [], ["must be a YAML mapping", "list"]),
    "beta <= 0": ("dpo", {"beta": 0.0}, [], ["beta must be > 0", "got 0.0"]),
    "no model given": ("sft", {"model_config": None}, [], ["set model_name_or_path", "model_config"]),
    "no data given": ("sft", {"dataset_name": None}, [], ["set dataset_name", "datasets"]),
    "unknown model_config_overrides field": (
        "sft",
        {"model_config_overrides": {"n_layers": 1}},
        [],
        ["unknown config fields 'n_layers'", "did you mean n_layer"],
    ),
    # --- data ---
    "missing local dataset file": (
        "dpo",
        {"dataset_name": "{root}/data/nope.jsonl"},
        [],
        ["nope.jsonl: no such file or directory"],
    ),
    "dataset neither here nor on the Hub": (
        "dpo",
        {"dataset_name": "someone/no-such-dataset"},
        [],
        ["cannot load the data someone/no-such-dataset", "Hub"],
    ),
    "dataset without the needed columns": (
        "dpo",
        {"dataset_name": "{qa}"},
        [],
        ["columns ['question', 'answer']", "no known preference format", "prompt, chosen, rejected"],
    ),
    "explicit format without its columns": (
        "sft",
        {"dataset_name": "{dpo}", "dataset_format": "text"},
        [],
        ["format 'text' needs columns ['text']", "missing ['text']"],
    ),
    "chosen identical to rejected (every row)": (
        "dpo",
        {"dataset_name": "{identical}"},
        [],
        ["all 6 rows were dropped", "chosen identical to rejected: 6"],
    ),
    "prompts longer than the budget (every row)": (
        "dpo",
        {"dataset_name": "{long_prompts}"},
        [],
        ["all 6 rows were dropped", "prompt longer than max_prompt_length: 6"],
    ),
    "nothing left, several reasons": (
        "dpo",
        {"dataset_name": "{all_bad}"},
        [],
        [
            "all 3 rows were dropped",
            "chosen identical to rejected: 1",
            "prompt longer than max_prompt_length: 1",
            "missing or empty field: 1",
        ],
    ),
    "empty data file": ("dpo", {"dataset_name": "{empty}"}, [], ["empty.jsonl is empty"]),
    "malformed JSON lines": (
        "dpo",
        {"dataset_name": "{broken_json}"},
        [],
        ["cannot load the data", "broken.jsonl", "JSON parse error"],
    ),
    "non-UTF-8 text": ("dpo", {"dataset_name": "{latin1}"}, [], ["latin1.jsonl is not valid UTF-8", "re-encode"]),
    "unsupported data file type": ("sft", {"dataset_name": "{txt}"}, [], ["notes.txt: unsupported file type"]),
    "a .parquet file that is not parquet": ("sft", {"dataset_name": "{fake_parquet}"}, [], ["rows.parquet", "parquet"]),
    "DPO max_length too small for any prompt": (
        "dpo",
        {"max_length": 4},
        [],
        ["all 8 rows were dropped", "no prompt fits in 3 tokens", "raise max_length"],
    ),
    "mixture subsample out of range": (
        "sft",
        {"datasets": [{"path": "{sft}", "subsample": 1.5}]},
        [],
        ["subsample must be in (0, 1]", "got 1.5"],
    ),
    # --- the model ---
    "model path that does not exist": (
        "dpo",
        {"model_name_or_path": "{root}/models/missing"},
        [],
        ["models/missing: no such folder"],
    ),
    "model id neither here nor on the Hub": (
        "dpo",
        {"model_name_or_path": "someone/no-such-model"},
        [],
        ["cannot load the model 'someone/no-such-model'", "Hub"],
    ),
    "model path is a file": (
        "dpo",
        {"model_name_or_path": "{root}/models/weights.safetensors"},
        [],
        ["must be a checkpoint folder or a Hub id, not a file"],
    ),
    "model folder without config.json": (
        "dpo",
        {"model_name_or_path": "{root}/models/no-config"},
        [],
        ["folder without a config.json"],
    ),
    "a truncated model.safetensors": (
        "sft",
        {"model_name_or_path": "{root}/models/truncated"},
        [],
        ["models/truncated/model.safetensors is truncated", "damaged"],
    ),
    "a checkpoint with NaN weights": (
        "dpo",
        {"model_name_or_path": "{root}/models/diverged"},
        [],
        ["models/diverged", "transformer.h.0.mlp.c_fc.weight holds NaN or infinite values", "earlier one"],
    ),
    "a BERT checkpoint": (
        "sft",
        {"model_name_or_path": "{root}/models/bert"},
        [],
        ["BertForMaskedLM ('bert')", "not a causal language model"],
    ),
    "a vision checkpoint": (
        "dpo",
        {"model_name_or_path": "{root}/models/vit"},
        [],
        ["'vit' model", "not a causal language model"],
    ),
    "an encoder-decoder config": (
        "sft",
        {"model_config": "{root}/models/t5", "model_config_overrides": None},
        [],
        ["'t5' encoder-decoder model", "not a causal language model"],
    ),
    "tokenizer that does not match the vocabulary": (
        "dpo",
        {"model_name_or_path": "{root}/models/gpt2-vocab97"},
        [],
        ["tokenizer has 50257 tokens", "embedding has only 97"],
    ),
    "max_length above the model's positions": (
        "sft",
        {"max_length": 128},
        [],
        ["max_length 128 exceeds the model's 64 positions"],
    ),
    "LoRA target module not in the model": (
        "dpo",
        {"use_peft": True, "lora_target_modules": ["c_attn", "q_proj"]},
        [],
        ["lora_target_modules ['q_proj'] match no module", "c_attn", "c_fc", "c_proj"],
    ),
    # --- the output folder and resuming ---
    "output folder not writable": ("sft", {"output_dir": "{root}/a-file/out"}, [], ["is not writable"]),
    "output folder is a file": ("sft", {"output_dir": "{root}/a-file"}, [], ["exists and is not a folder"]),
    "resume path that does not exist": (
        "sft",
        {"resume_from_checkpoint": "{root}/runs/checkpoint-9"},
        [],
        ["resume_from_checkpoint", "checkpoint-9 does not exist"],
    ),
    "resume path with no checkpoint": (
        "sft",
        {"resume_from_checkpoint": "{root}/data"},
        [],
        ["data is not a complete checkpoint (no trainer_state.json)"],
    ),
    "resume=true with nothing to resume": (
        "dpo",
        {"resume_from_checkpoint": "true"},
        [],
        ["resume_from_checkpoint=true", "holds no complete checkpoint"],
    ),
}


def fill(value, env):
    """Substitute {root} and {<data file>} in a setting (recursively)."""
    if isinstance(value, str):
        return value.format(root=env.root, **env.files)
    if isinstance(value, list):
        return [fill(v, env) for v in value]
    if isinstance(value, dict):
        return {k: fill(v, env) for k, v in value.items()}
    return value


def error_line(capsys, stage, argv, code=1):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(RUN[stage], argv)
    captured = capsys.readouterr()
    assert exit_info.value.code == code, captured.err[-2000:]
    lines = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, captured.err[-2000:]
    assert "Traceback" not in captured.err + captured.out
    assert lines[0].endswith("(run with --debug for the traceback)")
    return lines[0]


@pytest.fixture
def quiet_env(monkeypatch):
    import datasets
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # read when the libraries are imported, which may be before conftest sets the variable: without them, a Hub id
    # costs the client's retries with backoff (about 25 s) on a machine without network
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.delenv("ALIGNMENT_DEBUG", raising=False)


@pytest.mark.parametrize("case", list(CASES))
def test_catalogue(case, env, tmp_path, capsys, quiet_env):
    stage, settings, extra, expected = CASES[case]
    if settings is None:
        argv = []
    elif isinstance(settings, str):
        path = tmp_path / "recipe.yaml"
        path.write_text(settings, encoding="utf-8")
        argv = [str(path)]
    else:
        defaults = {} if "datasets" in settings else {"dataset_name": env.files[stage]}  # one or the other
        argv = [recipe(tmp_path, stage, **{**defaults, **fill(settings, env)})]
    argv += [fill(arg, env) for arg in extra]
    line = error_line(capsys, stage, argv)
    for part in expected:
        assert part in line, f"{part!r} not in {line!r}"
    assert not (tmp_path / "out").exists()  # a failed run leaves no (empty) output folder behind


def test_catalogue_is_large_enough():
    assert len(CASES) >= 20


# --- nothing lost --------------------------------------------------------------------------------------------------


def test_a_new_run_never_overwrites_a_saved_one(env, tmp_path, capsys, quiet_env):
    out = tmp_path / "out"
    (out / "checkpoint-2").mkdir(parents=True)
    saved = {
        "model.safetensors": b"weights of a finished run",
        "recipe.yaml": b"seed: 1\n",
        "checkpoint-2/trainer_state.json": b"{}",
    }
    for name, content in saved.items():
        (out / name).write_bytes(content)
    line = error_line(capsys, "sft", [recipe(tmp_path, "sft", dataset_name=env.files["sft"])])
    assert "already holds a saved run (checkpoint-2, model.safetensors)" in line
    assert "--resume_from_checkpoint=true" in line and "overwrite_output_dir" in line
    assert {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()} == saved


def test_overwrite_output_dir_clears_the_old_checkpoints(tmp_path):
    """With `overwrite_output_dir` (read with getattr by the pipeline, see configs) the check passes, and the old
    run's checkpoints go, so that a later resume cannot pick one of them."""
    out = tmp_path / "out"
    for name in ("checkpoint-2", "checkpoint-4", ".partial-checkpoint-6"):
        (out / name).mkdir(parents=True)
    (out / "model.safetensors").write_bytes(b"old")
    check_output_dir(out, overwrite=True)
    assert len(list(out.iterdir())) == 4  # the check deletes nothing; the run clears them once it has loaded
    clear_previous_run(out)
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    check_output_dir(out, resuming=True)  # resuming into a saved run is fine


def test_an_unwritable_output_folder_fails_before_anything_loads(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere: the not-a-folder case of the catalogue covers it")
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(ValueError, match="is not writable"):
            check_output_dir(folder / "out")
    finally:
        folder.chmod(0o700)


def test_only_the_main_process_probes_the_output_folder(tmp_path, monkeypatch):
    """The probe makes folders and removes them again; done by every process of a launch, one process's clean-up
    removed the folder another had just made for its lock (a flaky 'not writable (No such file or directory)')."""
    monkeypatch.setenv("RANK", "1")
    check_output_dir(tmp_path / "a" / "b")
    assert list(tmp_path.iterdir()) == []  # touched nothing: the main process checks and creates
    monkeypatch.setenv("RANK", "0")
    (tmp_path / "file").write_text("x", encoding="utf-8")
    with pytest.raises(ValueError, match="is not writable"):
        check_output_dir(tmp_path / "file" / "out")


# --- real processes: the exit code, no traceback -------------------------------------------------------------------


def test_real_processes_exit_non_zero_with_one_line(env, tmp_path):
    """Two failures at different stages (a missing file; no row left after filtering, after the model has loaded and
    the data has logged its warnings), and one with ALIGNMENT_DEBUG=1, which shows the traceback."""
    runs = {
        "missing data": (
            "run_dpo.py",
            {"dataset_name": str(env.root / "data" / "nope.jsonl")},
            {},
            "no such file or directory",
        ),
        "nothing left": ("run_dpo.py", {"dataset_name": env.files["all_bad"]}, {}, "all 3 rows were dropped"),
        "debug": ("run_dpo.py", {"dataset_name": env.files["identical"]}, {"ALIGNMENT_DEBUG": "1"}, None),
    }
    base_env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    base_env.pop("ALIGNMENT_DEBUG", None)
    processes = {}
    for name, (script, settings, extra_env, _) in runs.items():
        folder = tmp_path / name.replace(" ", "-")
        folder.mkdir()
        path = recipe(folder, "x", **settings)
        processes[name] = subprocess.Popen(
            [sys.executable, f"scripts/{script}", path],
            cwd=REPO,
            env={**base_env, **extra_env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    for name, process in processes.items():
        out, err = process.communicate(timeout=300)
        expected = runs[name][3]
        assert process.returncode == 1, (name, err[-3000:])
        if expected is None:  # --debug: the traceback, ending in the same error
            assert "Traceback" in err and "DataFormatError" in err and "chosen identical to rejected" in err
            continue
        assert "Traceback" not in out + err, (name, err[-3000:])
        lines = err.strip().splitlines()
        assert lines[-1].startswith("error:") and expected in lines[-1], (name, lines[-1])
        assert sum(line.startswith("error:") for line in lines) == 1
