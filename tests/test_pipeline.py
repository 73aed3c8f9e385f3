"""The scripts end to end on a one-layer GPT-2 and a few rows of data: SFT, then DPO from its output; what the output
folder holds and that it loads without this package; one-line errors; no Hub, no wandb key; LoRA with a merged copy."""

import faulthandler
import json
import logging
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignment.run.arguments import DataArguments, ModelArguments
from alignment.run.cli import run_cli
from alignment.run.integrations import hub_push_possible, prepare_wandb, push_folder
from alignment.run.pipeline import resume_argument, run_dpo, run_sft
from alignment.run.recipe import parse_recipe
from alignment.training.configs import DPOConfig

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = {"n_layer": 1, "n_head": 2, "n_embd": 16, "n_positions": 64}
COMMON = {
    "max_length": 32,
    "max_steps": 2,
    "per_device_train_batch_size": 4,
    "per_device_eval_batch_size": 4,
    "activation_checkpointing": False,
    "report_to": "none",
    "save_strategy": "no",
    "logging_steps": 1,
    "learning_rate": 1e-3,
    "test_size": 4,  # a row count
    "seed": 0,
}
MODEL_CODE = ("modeling_gpt2.py", "configuration_gpt2.py", "attention.py")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
TOKEN_IDS = [[464, 3290, 318, 257, 1332, 13, 198, 198, 20490, 25]]  # any ids below GPT-2's 50257


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_recipe(path, **settings):
    path.write_text(yaml.safe_dump({**COMMON, **settings}), encoding="utf-8")
    return str(path)


def unset(monkeypatch, name):
    """Remove a variable such that monkeypatch restores the original state, even when code under test sets it."""
    monkeypatch.setenv(name, "")
    monkeypatch.delenv(name)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    sft = [{"text": f"\n\nHuman: What is {i % 7} + {i % 5}?\n\nAssistant: {i % 7 + i % 5}"} for i in range(24)]
    dpo = []
    for i in range(24):
        a, b = i % 7, (3 * i) % 5
        prompt = f"\n\nHuman: What is {a} + {b}?\n\nAssistant:"
        dpo.append({"prompt": prompt, "chosen": f" {a + b}", "rejected": f" It is {a + b + 1}, I think."})
    sft_recipe = write_recipe(
        folder / "sft.yaml",
        model_config="gpt2",
        model_config_overrides=TINY_MODEL,
        dataset_name=str(write_jsonl(folder / "sft.jsonl", sft)),
        eval_strategy="steps",
        eval_steps=2,
    )
    dpo_recipe = write_recipe(
        folder / "dpo.yaml", dataset_name=str(write_jsonl(folder / "dpo.jsonl", dpo)), eval_strategy="no", beta=0.1
    )
    return SimpleNamespace(folder=folder, sft_recipe=sft_recipe, dpo_recipe=dpo_recipe)


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """`scripts/run_sft.py` then `scripts/run_dpo.py` from its output, in-process (`--debug`: a failure shows its
    traceback here)."""
    folder = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("WANDB_MODE", "disabled")
        run_cli(run_sft, [data.sft_recipe, "--output_dir", str(folder / "sft"), "--debug"])
        run_cli(
            run_dpo,
            [
                "--config",
                data.dpo_recipe,
                "--model_name_or_path",
                str(folder / "sft"),
                f"--output_dir={folder / 'dpo'}",
                "--save_format=alignment",  # SFT saves the default, stock GPT-2; DPO our class with its code
                "--debug",
            ],
        )
    return SimpleNamespace(sft=folder / "sft", dpo=folder / "dpo")


def logits(model):
    with torch.no_grad():
        return model(torch.tensor(TOKEN_IDS)).logits


# --- SFT → DPO: what the output folder holds ----------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_output_folder_holds_everything(runs, data, stage):
    out = getattr(runs, stage)
    for name in (
        "model.safetensors",
        "config.json",
        "recipe.yaml",
        "README.md",
        "train_results.json",
        *TOKENIZER_FILES,
    ):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    if stage == "sft":  # save_format: stock (the default)
        assert config["model_type"] == "gpt2" and "auto_map" not in config
        assert not any((out / name).exists() for name in MODEL_CODE) and not (out / ".stock-export").exists()
    else:  # save_format: alignment
        assert all((out / name).is_file() for name in MODEL_CODE)
        assert config["auto_map"]["AutoConfig"] == "configuration_gpt2.AlignmentGPT2Config"
        assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_gpt2.AlignmentGPT2ForCausalLM"
    assert {k: config[k] for k in TINY_MODEL} == TINY_MODEL

    plots = sorted((out / "plots").glob("*.png"))
    assert plots and all(p.stat().st_size > 0 for p in plots)
    assert any("loss" in p.stem for p in plots)

    train_results = json.loads((out / "train_results.json").read_text())
    assert "train_loss" in train_results
    card = (out / "README.md").read_text()
    assert f"- method: {stage.upper()}" in card
    dataset = yaml.safe_load(Path(getattr(data, f"{stage}_recipe")).read_text())["dataset_name"]
    assert f"- data: `{Path(dataset).name}` (local)" in card  # a local file by its name: no path leaves the machine
    assert "### Final train metrics" in card and "| train_loss |" in card
    assert all(f"(plots/{p.name})" in card for p in plots)
    random_init = "- base model: `gpt2` (random initialisation)"
    assert (random_init if stage == "sft" else f"{random_init} → `sft` (local)") in card
    assert str(runs.sft.parent) not in card and str(data.folder) not in card

    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["output_dir"] == str(out) and recipe["max_steps"] == 2
    assert "hub_token" not in recipe
    if stage == "sft":
        assert (out / "eval_results.json").is_file() and "### Final eval metrics" in card
        assert recipe["model_config_overrides"] == TINY_MODEL
    else:
        assert recipe["model_name_or_path"] == str(runs.sft) and recipe["beta"] == 0.1


def test_dpo_starts_from_the_sft_weights(runs):
    from alignment import AlignmentGPT2ForCausalLM

    # SFT saved stock GPT-2, DPO our class: both read back into ours (stock GPT-2 converts losslessly)
    sft, dpo = (AlignmentGPT2ForCausalLM.from_pretrained(run).state_dict() for run in (runs.sft, runs.dpo))
    assert sft.keys() == dpo.keys()
    # two small steps away from the SFT weights, far closer to them than to a fresh random init
    distance = sum((sft[k] - dpo[k]).abs().sum() for k in sft) / sum(sft[k].abs().sum() for k in sft)
    assert 0 < distance < 0.1


def test_output_folder_loads_without_the_alignment_package(runs, tmp_path):
    """What anyone who downloads the pushed folder gets: stock GPT-2 (SFT, the default save_format), or our class
    whose code travels with the weights (DPO, save_format: alignment)."""
    script = tmp_path / "load.py"
    script.write_text(
        textwrap.dedent(f"""
        import sys
        sys.modules["alignment"] = None  # this package is not installed
        try:
            import alignment
        except ImportError:
            pass
        else:
            raise SystemExit("alignment is importable")
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        results = {{}}
        for folder in sys.argv[1:]:
            model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
            tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
            with torch.no_grad():
                logits = model(torch.tensor({TOKEN_IDS})).logits
            results[folder] = {{
                "module": type(model).__module__, "name": type(model).__name__, "logits": logits,
                "ids": tokenizer("What is 2 + 3?")["input_ids"],
            }}
        torch.save(results, {str(tmp_path / "results.pt")!r})
    """)
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "hf_modules")}
    env.pop("PYTHONPATH", None)
    done = subprocess.run(
        [sys.executable, str(script), str(runs.sft), str(runs.dpo)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = torch.load(tmp_path / "results.pt")

    from alignment.modeling.tokenizer import load_tokenizer

    expected_ids = load_tokenizer("gpt2")("What is 2 + 3?")["input_ids"]
    sft, dpo = results[str(runs.sft)], results[str(runs.dpo)]
    assert sft["name"] == "GPT2LMHeadModel" and sft["module"].startswith("transformers.models.gpt2")
    assert dpo["name"] == "AlignmentGPT2ForCausalLM"
    assert dpo["module"].startswith("transformers_modules.")  # the folder's code, not this package's
    for folder, result in ((runs.sft, sft), (runs.dpo, dpo)):
        assert result["ids"] == expected_ids
        ours = AutoModelForCausalLM.from_pretrained(folder).eval()
        if folder == runs.dpo:
            assert type(ours).__module__.startswith("alignment.")
        torch.testing.assert_close(result["logits"], logits(ours), atol=1e-5, rtol=0)


# --- one-line errors from the scripts ------------------------------------------------------------------------------


def test_script_error_is_one_line_and_debug_shows_the_traceback(data, tmp_path):
    recipe = write_recipe(tmp_path / "typo.yaml", dataset_name="x.jsonl", model_config="gpt2", betta=0.2)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    env.pop("ALIGNMENT_DEBUG", None)
    command = [sys.executable, "scripts/run_dpo.py", recipe, "--output_dir", str(tmp_path / "out")]
    # both at once: each spends most of its time importing torch and transformers
    plain, debug = (
        subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for argv in (command, command + ["--debug"])
    )
    plain_out, plain_err = plain.communicate(timeout=300)
    debug_out, debug_err = debug.communicate(timeout=300)

    assert plain.returncode == 1, plain_err
    lines = plain_err.strip().splitlines()
    assert len(lines) == 1, plain_err
    assert lines[0].startswith("error:") and "'betta'" in lines[0] and "beta" in lines[0]
    assert "Traceback" not in plain_err + plain_out

    assert debug.returncode != 0
    assert "Traceback" in debug_err and "RecipeError" in debug_err and "'betta'" in debug_err
    assert not (tmp_path / "out").exists()


# --- the Hub, unreachable ------------------------------------------------------------------------------------------


def test_push_to_hub_without_the_hub_keeps_the_run(data, tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    caplog.set_level(logging.WARNING)
    out = tmp_path / "pushed"
    run_cli(
        run_sft,
        [
            data.sft_recipe,
            "--output_dir",
            str(out),
            "--push_to_hub",
            "true",
            "--hub_model_id",
            "someone/x",
            "--eval_strategy",
            "no",
            "--debug",
        ],
    )
    for name in ("model.safetensors", "config.json", "README.md", "recipe.yaml", *TOKENIZER_FILES):
        assert (out / name).is_file(), name
    assert json.loads((out / "config.json").read_text())["model_type"] == "gpt2"  # what gets pushed: stock GPT-2
    hub_lines = [r.getMessage() for r in caplog.records if "hub" in r.getMessage().lower()]
    assert len(hub_lines) == 1, hub_lines
    assert "unreachable" in hub_lines[0] and "\n" not in hub_lines[0]
    assert yaml.safe_load((out / "recipe.yaml").read_text())["hub_model_id"] == "someone/x"


def test_push_happens_once_after_the_card_and_curves(data, tmp_path, monkeypatch):
    """With a Hub: the final push is `push_folder`'s, of the finished folder; the trainer's own push at
    `save_model` (before the card and curves exist, and able to abort the run) does not happen."""
    import transformers

    from alignment.run import pipeline

    def trainer_push(self, *args, **kwargs):
        raise ConnectionError("the trainer pushed by itself")

    def fake_init_hf_repo(self, token=None, private=None):
        self.hub_model_id, self.push_in_progress = self.args.hub_model_id, None

    pushed = []

    def fake_push_folder(folder, repo_id, token=None, **hub_settings):
        card = (Path(folder) / "README.md").read_text()
        plots = list(Path(folder).glob("plots/*.png"))
        pushed.append((Path(folder), repo_id, token, hub_settings, "## Training run" in card, plots))
        return True

    monkeypatch.setattr(pipeline, "hub_push_possible", lambda: True)
    monkeypatch.setattr(pipeline, "push_folder", fake_push_folder)
    monkeypatch.setattr(transformers.Trainer, "init_hf_repo", fake_init_hf_repo)
    monkeypatch.setattr(transformers.Trainer, "push_to_hub", trainer_push)
    out = tmp_path / "pushed"
    run_cli(
        run_sft,
        [
            data.sft_recipe,
            "--output_dir",
            str(out),
            "--push_to_hub",
            "true",
            "--hub_model_id",
            "someone/x",
            "--hub_token",
            "hf_fake",
            "--hub_private_repo",
            "true",
            "--hub_revision",
            "dpo-v1",
            "--eval_strategy",
            "no",
            "--debug",
        ],
    )
    assert len(pushed) == 1
    folder, repo_id, token, hub_settings, card_complete, plots = pushed[0]
    assert (folder, repo_id, token) == (out, "someone/x", "hf_fake")
    assert hub_settings == {"private": True, "revision": "dpo-v1"}
    assert card_complete and plots
    assert "hf_fake" not in (out / "recipe.yaml").read_text()


def test_hub_unreachable_over_the_network(monkeypatch, caplog):
    """Not offline by setting, but nothing answers: one quick probe, one line."""
    from huggingface_hub import constants

    unset(monkeypatch, "HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: connection refused
    caplog.set_level(logging.WARNING, logger="alignment.run.integrations")
    assert hub_push_possible() is False
    assert [r.getMessage() for r in caplog.records] == [
        "push_to_hub: the Hugging Face Hub is unreachable; checkpoints stay local"
    ]


@pytest.mark.parametrize("failing", ["init", "create_repo", "create_commit"])
def test_failed_push_keeps_the_folder_and_says_where(tmp_path, monkeypatch, caplog, failing):
    import huggingface_hub

    class UnreachableHub:
        def __init__(self, token=None):
            if failing == "init":
                raise OSError("no route to host\nsecond line")

        def create_repo(self, repo_id, **kwargs):
            if failing == "create_repo":
                raise ConnectionError("Failed to resolve 'huggingface.co'\n  (details)")

        def create_commit(self, repo_id, **kwargs):
            raise TimeoutError("read timed out")

    folder = tmp_path / "run"
    (folder / "plots").mkdir(parents=True)
    files = {"model.safetensors": b"weights", "config.json": b"{}", "plots/loss.png": b"png"}
    for name, content in files.items():
        (folder / name).write_bytes(content)
    monkeypatch.setattr(huggingface_hub, "HfApi", UnreachableHub)
    caplog.set_level(logging.INFO, logger="alignment.run.integrations")

    assert push_folder(folder, "someone/x", token="hf_fake") is False
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert caplog.records[0].levelno == logging.WARNING and "\n" not in message
    assert str(folder.resolve()) in message and "failed" in message
    assert {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()} == files


# --- wandb without an API key --------------------------------------------------------------------------------------


@pytest.fixture
def no_wandb_credentials(monkeypatch, tmp_path):
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "WANDB_DISABLED", "WANDB_PROJECT"):
        unset(monkeypatch, name)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc from `wandb login`
    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path))
    monkeypatch.chdir(tmp_path)


def wandb_warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "alignment.run.integrations"]


def test_wandb_without_api_key_logs_offline(no_wandb_credentials, caplog):
    caplog.set_level(logging.WARNING, logger="alignment.run.integrations")
    prepare_wandb(["none"])
    assert "WANDB_MODE" not in os.environ and not caplog.records
    prepare_wandb(["wandb"])
    prepare_wandb("wandb")  # a second call: already offline, nothing more to say
    assert os.environ["WANDB_MODE"] == "offline"
    messages = wandb_warnings(caplog)
    assert len(messages) == 1 and "API key" in messages[0] and "offline" in messages[0]


def test_wandb_with_a_key_but_no_server_logs_offline(no_wandb_credentials, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # the discard port: connection refused
    (tmp_path / ".netrc").write_text("machine 127.0.0.1\n  login user\n  password fake-key\n")
    (tmp_path / ".netrc").chmod(0o600)
    caplog.set_level(logging.WARNING, logger="alignment.run.integrations")
    prepare_wandb(["all"])
    assert os.environ["WANDB_MODE"] == "offline"
    messages = wandb_warnings(caplog)
    assert len(messages) == 1 and "unreachable" in messages[0]


def test_sft_run_reporting_to_wandb_without_api_key(no_wandb_credentials, data, tmp_path, caplog):
    import wandb

    caplog.set_level(logging.WARNING, logger="alignment.run.integrations")
    out = tmp_path / "wandb-run"
    faulthandler.dump_traceback_later(300, exit=True)  # a hang fails the session instead of stalling it
    seen = {}
    try:
        run_cli(
            run_sft,
            [data.sft_recipe, "--output_dir", str(out), "--report_to", "wandb", "--eval_strategy", "no",
             "--project", "alignment-tests", "--debug"],
        )  # fmt: skip
    finally:
        faulthandler.cancel_dump_traceback_later()
        if wandb.run is not None:
            run = wandb.run
            seen = {"project": run.project, "name": run.name, "tags": set(run.tags), "config": dict(run.config)}
            wandb.finish()
    assert os.environ["WANDB_MODE"] == "offline"
    # the project from the recipe (transformers' `project`), the folder's name, tags, and the whole recipe
    assert seen["project"] == "alignment-tests" and seen["name"] == "wandb-run"
    assert seen["tags"] == {"sft", "gpt2"}
    assert seen["config"]["model_config_overrides"] == TINY_MODEL  # model and data settings, not only training's
    assert seen["config"]["dataset_name"] == yaml.safe_load(Path(data.sft_recipe).read_text())["dataset_name"]
    assert seen["config"]["learning_rate"] == 1e-3
    assert len(wandb_warnings(caplog)) == 1
    assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()
    assert list(tmp_path.glob("wandb/offline-run-*")), sorted(p.name for p in tmp_path.rglob("*"))[:50]


# --- LoRA ----------------------------------------------------------------------------------------------------------


def test_lora_dpo_saves_the_adapter_and_a_merged_model(runs, data, tmp_path, monkeypatch):
    from peft import PeftModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "lora"
    run_cli(
        run_dpo,
        [
            data.dpo_recipe,
            "--model_name_or_path",
            str(runs.sft),
            "--output_dir",
            str(out),
            "--use_peft",
            "true",
            "--lora_r",
            "4",
            "--lora_alpha",
            "8",
            "--merge_adapter_on_save",
            "true",
            "--learning_rate",
            "1e-2",
            "--debug",
        ],
    )
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and set(adapter["target_modules"]) == {"c_attn", "c_proj", "c_fc"}

    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    assert not isinstance(merged, PeftModel)
    assert not any("lora" in name for name in merged.state_dict())
    assert (out / "merged" / "tokenizer.json").is_file()

    base_logits = logits(AutoModelForCausalLM.from_pretrained(runs.sft).eval())
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(runs.sft), out).eval()
    expected = logits(with_adapter)
    assert (expected - base_logits).abs().max() > 1e-4  # the adapter learned something
    torch.testing.assert_close(logits(merged), expected, atol=1e-5, rtol=0)


def test_lora_defaults_to_all_linear_past_gpt2(data, tmp_path, monkeypatch, gpt2_tokenizer):
    """No lora_target_modules on a Llama: PEFT's all-linear (every projection, not the LM head), not GPT-2's names."""
    from tests.conftest import tiny_causal_lms

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    llama = tmp_path / "llama"
    tiny_causal_lms()["transformers-llama"]().save_pretrained(llama)
    gpt2_tokenizer.save_pretrained(llama)
    out = tmp_path / "lora"
    run_cli(
        run_dpo,
        [data.dpo_recipe, f"--model_name_or_path={llama}", f"--output_dir={out}", "--use_peft=true", "--debug"],
    )
    targets = {
        name.rsplit(".", 1)[-1] for name in json.loads((out / "adapter_config.json").read_text())["target_modules"]
    }
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}  # no lm_head


def ultrafeedback_rows(n=12):
    rows = []
    for i in range(n):
        question = f"What is {i % 7} + {i % 5}?"
        turn = [{"role": "user", "content": question}]
        rows.append({
            "prompt": question, "prompt_id": str(i), "score_chosen": 8.0, "score_rejected": 3.0,
            "chosen": turn + [{"role": "assistant", "content": str(i % 7 + i % 5)}],
            "rejected": turn + [{"role": "assistant", "content": f"It is {i % 7 + i % 5 + 1}, I think."}],
        })  # fmt: skip
    return rows


def test_the_recipe_past_gpt2_runs_on_a_stand_in(tmp_path, monkeypatch, gpt2_tokenizer):
    """`recipes/smollm2_ultrafeedback.yaml` as shipped but for the Hub: a tiny Llama whose tokenizer brings its own
    ChatML template, and UltraFeedback-shaped rows in a local file through the recipe's dataset_mixture."""
    from alignment.modeling.chat_templates import set_chat_template
    from tests.conftest import tiny_causal_lms

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tokenizer = gpt2_tokenizer.__class__.from_pretrained(gpt2_tokenizer.name_or_path)
    set_chat_template(tokenizer, "chatml")
    model = tiny_causal_lms()["transformers-llama"]()
    model.resize_token_embeddings(len(tokenizer))
    stand_in = tmp_path / "smollm2"
    model.save_pretrained(stand_in)
    tokenizer.save_pretrained(stand_in)
    rows = write_jsonl(tmp_path / "ultrafeedback.jsonl", ultrafeedback_rows())
    mixture = json.dumps({"datasets": [{"id": str(rows), "columns": ["prompt", "chosen", "rejected"]}]})
    out = tmp_path / "run"
    overrides = [f"--model_name_or_path={stand_in}", "--dtype=float32", f"--dataset_mixture={mixture}",
                 "--max_steps=2", "--per_device_train_batch_size=2", "--global_batch_size=2",
                 "--activation_checkpointing=false", "--eval_strategy=no", "--save_strategy=no", "--report_to=none",
                 "--push_to_hub=false", "--max_length=64", "--max_prompt_length=32", "--bf16=false",
                 f"--output_dir={out}", "--debug"]  # fmt: skip
    run_cli(run_dpo, [str(REPO / "recipes" / "smollm2_ultrafeedback.yaml"), *overrides])
    results = json.loads((out / "train_results.json").read_text())
    assert math.isfinite(results["train_loss"])
    saved = AutoTokenizer.from_pretrained(out)
    assert "<|im_start|>" in saved.chat_template and len(saved) == len(tokenizer)


def test_chatml_on_gpt2_grows_the_embeddings_and_trains_the_new_tokens_with_lora(data, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rows = write_jsonl(tmp_path / "conversations.jsonl", ultrafeedback_rows())
    out = tmp_path / "chatml"
    run_cli(
        run_dpo,
        [data.dpo_recipe, "--model_config=gpt2", f"--model_config_overrides={json.dumps(TINY_MODEL)}",
         f"--dataset_name={rows}", "--chat_template=chatml", "--use_peft=true", "--lora_r=4",
         f"--output_dir={out}", "--debug"],
    )  # fmt: skip
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["trainable_token_indices"] == [50257, 50258]  # the rows of <|im_start|> and <|im_end|>
    from safetensors.torch import load_file

    assert any("trainable_tokens" in key for key in load_file(out / "adapter_model.safetensors"))
    saved = AutoTokenizer.from_pretrained(out)
    assert saved.convert_tokens_to_ids("<|im_end|>") == 50258 and "<|im_start|>" in saved.chat_template


# --- resuming ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("false", None),
        ("False", None),
        ("no", None),
        ("0", None),
        ("", None),
        ("true", True),
        ("True", True),
        ("yes", True),
        ("1", True),
        ("outputs/run/checkpoint-500", "outputs/run/checkpoint-500"),
    ],
)
def test_resume_argument(value, expected):
    assert resume_argument(value) == expected


def test_resume_from_checkpoint_true_on_the_command_line(tmp_path):
    argv = ["--model_config", "gpt2", "--dataset_name", "d.jsonl", "--output_dir", str(tmp_path)]
    *_, args = parse_recipe((ModelArguments, DataArguments, DPOConfig), argv + ["--resume_from_checkpoint=true"])
    assert resume_argument(args.resume_from_checkpoint) is True
    *_, args = parse_recipe((ModelArguments, DataArguments, DPOConfig), argv)
    assert resume_argument(args.resume_from_checkpoint) is None
