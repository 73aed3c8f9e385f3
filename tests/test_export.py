"""Exporting our GPT-2 to transformers' stock format: what `scripts/export.py` writes loads with plain
`AutoModelForCausalLM.from_pretrained` in a process where `alignment` cannot be imported, and computes what ours
computes (logits within 1e-5, the same greedy tokens, left-padded batches included); LoRA runs are merged first;
what cannot be exported gets one line, and nothing is ever overwritten.

All exports are checked by one subprocess (importing torch costs seconds), so the module shares its folders."""

import copy
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import transformers

from alignment.modeling import set_chat_template
from alignment.modeling.export import ExportError, export_stock_gpt2, main
from alignment.run.cli import run_cli
from tests.conftest import tiny_causal_lms

IDS = [[464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13], [40, 588, 2068, 11, 290, 345, 30, 50256, 50256, 3]]
PROMPTS = [[464, 2068, 7586], [40, 588, 2068, 11, 290]]  # different lengths: the batch is left-padded
NEW_TOKENS = 8
PAD = 50256  # the GPT-2 tokenizer's pad token (its EOS), which the stock side pads with

# Runs with `alignment` unimportable (and cwd outside the repo): only transformers reads the folders.
STOCK_LOADER = """
import sys; sys.modules["alignment"] = None
import json, torch, transformers
spec = json.loads(sys.argv[1])
out = {}
for name, folder in spec["folders"].items():
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        torch.save(model(torch.tensor(spec["ids"])).logits, f"{spec['logits_dir']}/{name}.pt")
    batch = tokenizer.pad({"input_ids": spec["prompts"]}, padding_side="left", return_tensors="pt")
    greedy = model.generate(**batch, max_new_tokens=spec["new_tokens"], do_sample=False, pad_token_id=spec["pad"])
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    out[name] = {"class": type(model).__name__, "model_type": model.config.model_type,
                 "greedy": greedy.tolist(), "chat": chat}
print(json.dumps(out))
"""


def ours_outputs(model):
    """Logits on IDS and greedy replies to the left-padded PROMPTS, from our model in this process."""
    model = model.eval()
    width = max(map(len, PROMPTS))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])
    with torch.no_grad():
        logits = model(torch.tensor(IDS)).logits
        greedy = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=PAD)
    return logits, greedy.tolist()


def tiny_ours(seed):
    torch.manual_seed(seed)
    return tiny_causal_lms()["ours"]().eval()


def save_like_a_run(model, tokenizer, folder):
    """What a run folder holds for the export: weights, config with auto_map, model code, tokenizer, recipe."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "recipe.yaml").write_text("model_config: gpt2\n", encoding="utf-8")
    (folder / "README.md").write_text("# a run\n\n![loss](plots/loss.png)\n", encoding="utf-8")
    (folder / "plots").mkdir()
    (folder / "plots" / "loss.png").write_bytes(b"not really a png")
    return folder


def lora_run(tmp, tokenizer):
    """A LoRA run as the pipeline saves one with the chatml template: the adapter (with the new tokens' rows as
    trainable tokens) and the tokenizer, over a base checkpoint saved elsewhere; no `merged/`."""
    from peft import LoraConfig, get_peft_model

    base_dir = save_like_a_run(tiny_ours(1), tokenizer, tmp / "base")
    tokenizer = copy.deepcopy(tokenizer)
    added = set_chat_template(tokenizer, "chatml")
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    base.resize_token_embeddings(len(tokenizer))
    config = LoraConfig(r=4, target_modules=["c_attn", "c_fc", "c_proj"], trainable_token_indices=added)
    model = get_peft_model(base, config)
    torch.manual_seed(2)
    with torch.no_grad():  # as after training: LoRA's B starts at zero, which would make the merge a no-op
        for name, param in model.named_parameters():
            if "lora_B" in name or "trainable_tokens" in name:
                param.normal_(std=0.05)
    folder = tmp / "lora-run"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model.eval(), tokenizer, folder


@pytest.fixture(scope="module")
def exported(tmp_path_factory, gpt2_tokenizer):
    """Each case's reference outputs (ours, in this process) and what transformers alone makes of its export."""
    tmp = tmp_path_factory.mktemp("export")
    tokenizer = copy.deepcopy(gpt2_tokenizer)
    set_chat_template(tokenizer, "hh")
    full = tiny_ours(0)
    run_dir = save_like_a_run(full, tokenizer, tmp / "run")
    lora_model, lora_tokenizer, lora_dir = lora_run(tmp, gpt2_tokenizer)
    cases = {
        "run": (ours_outputs(full), main([str(run_dir), str(tmp / "stock-run")])),
        "lora-run": (ours_outputs(lora_model), export_stock_gpt2(lora_dir, tmp / "stock-lora")),
        "lora-in-memory": (
            ours_outputs(lora_model),
            export_stock_gpt2(lora_model, tmp / "stock-mem", tokenizer=lora_tokenizer),
        ),
    }
    spec = {
        "folders": {name: str(folder) for name, (_, folder) in cases.items()},
        "ids": IDS,
        "prompts": PROMPTS,
        "new_tokens": NEW_TOKENS,
        "pad": PAD,
        "logits_dir": str(tmp),
    }
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    done = subprocess.run(
        [sys.executable, "-c", STOCK_LOADER, json.dumps(spec)],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    stock = json.loads(done.stdout.strip().splitlines()[-1])
    return {
        "tmp": tmp,
        "run_dir": run_dir,
        "lora_model": lora_model,
        "cases": {
            name: {"ours": ours, "folder": folder, **stock[name], "logits": torch.load(tmp / f"{name}.pt")}
            for name, (ours, folder) in cases.items()
        },
    }


@pytest.mark.parametrize("case", ["run", "lora-run", "lora-in-memory"])
def test_stock_transformers_computes_what_ours_computes(exported, case):
    result = exported["cases"][case]
    (logits, greedy) = result["ours"]
    assert (result["class"], result["model_type"]) == ("GPT2LMHeadModel", "gpt2")
    assert result["logits"].shape == logits.shape
    torch.testing.assert_close(result["logits"], logits, atol=1e-5, rtol=0)
    assert result["greedy"] == greedy


def test_export_is_the_stock_layout_with_nothing_of_ours(exported):
    folder = exported["cases"]["run"]["folder"]
    files = sorted(p.name for p in folder.iterdir())
    assert files == [
        "README.md",
        "chat_template.jinja",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "plots",
        "recipe.yaml",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["architectures"] == ["GPT2LMHeadModel"]
    assert "auto_map" not in config and config["activation_function"] == "gelu_new"
    assert (folder / "chat_template.jinja").read_bytes() == (exported["run_dir"] / "chat_template.jinja").read_bytes()
    assert "Human:" in exported["cases"]["run"]["chat"]  # the run's (HH) template, applied by transformers alone
    assert "<|im_start|>" in exported["cases"]["lora-run"]["chat"]
    assert not [p for p in folder.parent.iterdir() if ".partial-" in p.name]  # no staging folder left behind


def test_lora_run_with_merged_folder_exports_that(exported, tmp_path):
    """`merge_adapter_on_save` wrote the merged model: it is exported as it is, with the run's card and recipe."""
    run = tmp_path / "lora-run"
    shutil.copytree(
        exported["run_dir"], run / "merged", ignore=shutil.ignore_patterns("README.md", "recipe.*", "plots")
    )
    (run / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": None}))
    (run / "recipe.yaml").write_text("use_peft: true\n")
    out = export_stock_gpt2(run, tmp_path / "stock")
    same_run = exported["cases"]["run"]["folder"]
    assert (out / "model.safetensors").read_bytes() == (same_run / "model.safetensors").read_bytes()
    assert (out / "recipe.yaml").read_text() == "use_peft: true\n"


def test_in_memory_lora_model_is_not_merged_in_place(exported):
    from peft import PeftModel

    model = exported["lora_model"]
    assert isinstance(model, PeftModel)
    assert any("lora_B" in name for name, _ in model.named_parameters())


def error_line(capsys, argv):
    capsys.readouterr()  # what came before (progress bars of saving the test's models)
    with pytest.raises(SystemExit) as failed:
        run_cli(main, argv)
    assert failed.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), lines
    return lines[0]


def test_refuses_an_out_dir_that_holds_files(exported, capsys):
    out = exported["tmp"] / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    line = error_line(capsys, [str(exported["run_dir"]), str(out)])
    assert "already holds files" in line and str(out) in line
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_refuses_stock_models_as_already_stock(exported, capsys, tmp_path):
    llama = tmp_path / "llama"
    tiny_causal_lms()["transformers-llama"]().save_pretrained(llama)
    line = error_line(capsys, [str(llama), str(tmp_path / "out")])
    assert "'llama' model, already in transformers' stock format" in line
    line = error_line(capsys, [str(exported["cases"]["run"]["folder"]), str(tmp_path / "out")])
    assert "'gpt2' model, already in transformers' stock format" in line
    with pytest.raises(ExportError, match="already in transformers' stock format"):
        export_stock_gpt2(tiny_causal_lms()["transformers-gpt2"](), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_refuses_a_lora_run_whose_base_was_never_saved(tmp_path, capsys):
    run = tmp_path / "lora"
    run.mkdir()
    (run / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": None}))
    line = error_line(capsys, [str(run), str(tmp_path / "out")])
    assert "randomly initialised base" in line and "merge_adapter_on_save" in line


LM_EVAL_TASK = """
task: tiny_sums
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.mark.slow
def test_lm_eval_hf_model_scores_the_export(exported, tmp_path, monkeypatch):
    """lm-eval's `hf` model (no trust_remote_code) on a task of our own over a local file, offline."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    sums = [(1, 2), (3, 4), (2, 2), (5, 1)]
    rows = [{"question": f"What is {a} + {b}?", "choices": [str(a + b), str(a + b + 1)], "label": 0} for a, b in sums]
    data = tmp_path / "sums.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_sums.yaml").write_text(LM_EVAL_TASK.format(data=data), encoding="utf-8")
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={exported['cases']['run']['folder']}",
        tasks=["tiny_sums"],
        task_manager=TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False),
        device="cpu",
        batch_size=2,
        log_samples=False,
    )
    scores = results["results"]["tiny_sums"]
    assert scores["sample_len"] == len(rows)
    assert 0.0 <= scores["acc,none"] <= 1.0 and torch.isfinite(torch.tensor(scores["acc_stderr,none"]))
