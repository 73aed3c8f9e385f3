"""The run's model card and what a push uploads: the base model a lineage started from, data as Hub ids or file
names, tags, license, a quick start in the training format, and no local path anywhere; `push_folder` with a
private repo, a branch, and a LoRA adapter pointing at a Hub model. Offline: a fake HfApi records the calls."""

import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from alignment.run.cli import run_cli
from alignment.run.integrations import push_folder
from alignment.run.model_card import HUB_RECORD, data_sources, prompt_style, trace_lineage
from alignment.run.pipeline import run_dpo, run_sft

TINY_MODEL = {"n_layer": 1, "n_head": 2, "n_embd": 16, "n_positions": 64}
COMMON = {
    "max_length": 32,
    "max_steps": 2,
    "per_device_train_batch_size": 4,
    "activation_checkpointing": False,
    "report_to": "none",
    "save_strategy": "no",
    "eval_strategy": "no",
    "logging_steps": 1,
    "learning_rate": 1e-3,
    "test_size": 4,
    "seed": 0,
}


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n", 2)[1])


def quick_start_code(card: str) -> str:
    section = card.split("## Quick start", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny SFT run from random weights; a copy of it posing as a fine-tune of openai-community/gpt2 (its recipe
    says so); a LoRA DPO run from that copy, checkpointing at every step (TRL writes its card at each save)."""
    root = tmp_path_factory.mktemp("cards")
    sft_rows = [{"text": f"\n\nHuman: What is {i % 7} + {i % 5}?\n\nAssistant: {i % 7 + i % 5}"} for i in range(16)]
    dpo_rows = [
        {"prompt": f"\n\nHuman: What is {i % 7} + 1?\n\nAssistant:", "chosen": f" {i % 7 + 1}", "rejected": " No."}
        for i in range(16)
    ]
    (root / "hh_sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft_rows))
    (root / "hh_dpo.jsonl").write_text("".join(json.dumps(r) + "\n" for r in dpo_rows))
    recipe = root / "common.yaml"
    recipe.write_text(yaml.safe_dump(COMMON))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("WANDB_MODE", "disabled")
        sft = root / "sft"
        run_cli(
            run_sft,
            [str(recipe), "--model_config=gpt2", f"--model_config_overrides={json.dumps(TINY_MODEL)}",
             f"--dataset_name={root / 'hh_sft.jsonl'}", f"--output_dir={sft}", "--debug"],
        )  # fmt: skip
        from_hub = root / "sft_of_gpt2"
        shutil.copytree(sft, from_hub)
        sft_recipe = yaml.safe_load((from_hub / "recipe.yaml").read_text())
        sft_recipe.update(model_name_or_path="openai-community/gpt2", model_config=None)
        (from_hub / "recipe.yaml").write_text(yaml.safe_dump(sft_recipe))
        dpo = root / "dpo"
        run_cli(
            run_dpo,
            [str(recipe), f"--model_name_or_path={from_hub}", f"--dataset_name={root / 'hh_dpo.jsonl'}",
             "--use_peft=true", "--lora_r=4", "--lora_alpha=8", "--save_strategy=steps", "--save_steps=1",
             "--hub_model_id=someone/gpt2-dpo", f"--output_dir={dpo}", "--debug"],
        )  # fmt: skip
    return SimpleNamespace(root=root, sft=sft, from_hub=from_hub, dpo=dpo)


def assert_no_local_path(text: str, root: Path) -> None:
    for path in {str(root), str(root.resolve()), str(Path.home())}:
        assert path not in text


def test_card_of_a_run_from_random_weights(runs):
    card = (runs.sft / "README.md").read_text()
    meta = front_matter(card)
    assert "base_model" not in meta and "datasets" not in meta  # no Hub base; a local file is no Hub dataset id
    assert "license" not in meta and "licence" not in meta  # nothing known to claim
    assert set(meta["tags"]) == {"alignment", "trl", "sft", "gpt2"}
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert "random weights" in card and "- base model: `gpt2` (random initialisation)" in card
    assert "- data: `hh_sft.jsonl` (local)" in card and "- method: SFT" in card
    assert "### Final train metrics" in card and "| train_loss |" in card and "(plots/" in card
    assert "None" not in card and "huggingface.co/datasets/" not in card
    assert_no_local_path(card, runs.root)


def test_card_of_a_lora_dpo_run_from_a_local_fine_tune_of_a_hub_model(runs):
    card = (runs.dpo / "README.md").read_text()
    meta = front_matter(card)
    assert meta["base_model"] == "openai-community/gpt2"  # followed through the local folder's recipe.yaml
    assert meta["license"] == "mit" and meta["library_name"] == "peft"
    assert set(meta["tags"]) == {"alignment", "trl", "dpo", "gpt2", "lora"}
    assert "datasets" not in meta
    assert "`sft_of_gpt2` (local)" in card and "- method: DPO" in card and "- data: `hh_dpo.jsonl` (local)" in card
    assert "# gpt2-dpo" in card and 'from_pretrained("someone/gpt2-dpo"' in card
    assert "Direct Preference Optimization" in card  # the method's citation, as TRL's card has it
    assert "trained on top of the local checkpoint `sft_of_gpt2`, which is not on the Hub" in card
    assert "[None]" not in card and "licence" not in card and "generated_from_trainer" not in card
    assert_no_local_path(card, runs.root)
    assert list(runs.dpo.glob("checkpoint-*")), "TRL's card writing at checkpoint saves was exercised"


def test_quick_start_runs_as_written_in_the_training_format(runs):
    """HH text data: the quick start prompts with Human:/Assistant: turns; with the repo id pointed at the local
    folder it runs (trust_remote_code only when the folder holds our model code: config.json's auto_map)."""
    for folder, repo_id in ((runs.sft, "sft"), (runs.dpo, "someone/gpt2-dpo")):
        code = quick_start_code((folder / "README.md").read_text())
        assert "Human:" in code and "apply_chat_template" not in code
        config = folder / "config.json"  # a LoRA run has none: its base is the SFT run's, saved stock
        remote_code = config.is_file() and "auto_map" in json.loads(config.read_text())  # save_format: alignment
        assert ("trust_remote_code=True" in code) == remote_code
        scope = {}
        exec(code.replace(f'"{repo_id}"', repr(str(folder))).replace("max_new_tokens=64", "max_new_tokens=2"), scope)
        assert isinstance(scope["output"], torch.Tensor)


def test_quick_start_follows_the_data_and_the_saved_format(runs, tmp_path):
    """A conversational run gets the chat template; a stock-format folder (no auto_map) no trust_remote_code."""
    from alignment.run.model_card import quick_start

    tokenizer = SimpleNamespace(chat_template="{% for m in messages %}{{ m.content }}{% endfor %}")
    card = SimpleNamespace(trainer=SimpleNamespace(processing_class=tokenizer), prompt_style="chat")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    code = quick_start(card, tmp_path, "someone/x")
    assert "apply_chat_template" in code and "Human:" not in code and "trust_remote_code" not in code
    assert 'AutoModelForCausalLM.from_pretrained("someone/x")' in code


def test_prompt_style_of_the_training_rows():
    assert prompt_style({"messages": [{"role": "user", "content": "hi"}]}) == "chat"
    assert prompt_style({"prompt": "\n\nHuman: hi\n\nAssistant:", "chosen": " a", "rejected": " b"}) == "hh"
    assert prompt_style({"text": "Once upon a time"}) == "text"


# --- lineage and data sources ---------------------------------------------------------------------------------------


def write_run(folder: Path, **recipe) -> Path:
    folder.mkdir(parents=True)
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return folder


def test_lineage_follows_local_checkpoints_to_the_hub(tmp_path):
    a = write_run(tmp_path / "a", model_name_or_path="openai-community/gpt2", model_revision="main")
    b = write_run(tmp_path / "b", model_name_or_path=str(a))
    lineage = trace_lineage(str(b))
    assert (lineage.hub_id, lineage.local_steps) == ("openai-community/gpt2", ("a", "b"))
    assert str(tmp_path) not in lineage.describe()

    (a / HUB_RECORD).write_text(json.dumps({"repo_id": "me/a", "revision": "v1"}))  # `a` was pushed
    lineage = trace_lineage(str(b))
    assert (lineage.hub_id, lineage.revision, lineage.local_steps) == ("me/a", "v1", ("b",))

    random = write_run(tmp_path / "r", model_name_or_path=None, model_config="gpt2")
    assert trace_lineage(str(random)).random_init == "`gpt2`" and trace_lineage(str(random)).hub_id is None
    assert trace_lineage("openai-community/gpt2").hub_id == "openai-community/gpt2"
    assert trace_lineage(None, "gpt2").random_init == "`gpt2`"


def test_lineage_of_untraceable_folders(tmp_path):
    loop_a, loop_b = tmp_path / "x", tmp_path / "y"
    write_run(loop_a, model_name_or_path=str(loop_b))
    write_run(loop_b, model_name_or_path=str(loop_a))
    assert trace_lineage(str(loop_a)).hub_id is None and trace_lineage(str(loop_a)).unknown in ("x", "y")
    bare = tmp_path / "bare"
    bare.mkdir()
    assert trace_lineage(str(bare)).unknown == "bare"
    assert trace_lineage(str(tmp_path / "gone")).unknown == "gone"
    cached = tmp_path / "hub" / "models--openai-community--gpt2" / "snapshots" / "abc123"
    cached.mkdir(parents=True)
    assert trace_lineage(str(cached)).hub_id == "openai-community/gpt2"


def test_data_sources_name_local_files_by_their_base_name(tmp_path):
    local = tmp_path / "pairs.jsonl"
    local.write_text("{}\n")
    specs = [
        {"path": "Anthropic/hh-rlhf", "name": "harmless-base"},
        {"path": str(local)},
        {"path": "json", "data_files": {"train": str(tmp_path / "more.json")}},
    ]
    sources = data_sources(specs)
    assert [(s.name, s.on_hub) for s in sources] == [
        ("Anthropic/hh-rlhf", True),
        ("pairs.jsonl", False),
        ("more.json", False),
    ]
    assert "(harmless-base)" in sources[0].describe()


# --- pushing --------------------------------------------------------------------------------------------------------


class RecordingHub:
    """A fake HfApi: records each call; `uploaded` holds the committed files' contents."""

    calls: list = []
    uploaded: dict = {}

    def __init__(self, token=None):
        self.calls.append(("init", {"token": token}))

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return SimpleNamespace(repo_id=repo_id if "/" in repo_id else f"me/{repo_id}")

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))

    def create_commit(self, repo_id, operations, **kwargs):
        self.calls.append(("create_commit", {"repo_id": repo_id, **kwargs}))
        for op in operations:
            source = op.path_or_fileobj
            self.uploaded[op.path_in_repo] = source if isinstance(source, bytes) else Path(source).read_bytes()


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub

    RecordingHub.calls, RecordingHub.uploaded = [], {}
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingHub)
    return RecordingHub


def adapter_run(tmp_path: Path, base: Path) -> Path:
    folder = tmp_path / "adapter-run"
    (folder / "checkpoint-1").mkdir(parents=True)
    (folder / "checkpoint-1" / "adapter_model.safetensors").write_bytes(b"old")
    (folder / ".alignment.lock").write_text("")
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base), "r": 4}))
    recipe = {"model_name_or_path": str(base), "output_dir": str(folder), "datasets": [{"path": "/data/x.jsonl"}]}
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return folder


def test_push_to_a_private_repo_on_a_branch_rewrites_the_adapter_base(tmp_path, hub, caplog):
    base = write_run(tmp_path / "sft", model_name_or_path="openai-community/gpt2")
    folder = adapter_run(tmp_path, base)
    local_before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    caplog.set_level(logging.WARNING, logger="alignment.run.integrations")

    assert push_folder(folder, "someone/x", token="hf_fake", private=True, revision="dpo-v1") is True
    calls = dict(hub.calls)
    assert calls["create_repo"]["private"] is True and calls["create_repo"]["repo_id"] == "someone/x"
    assert calls["create_branch"] == {"repo_id": "someone/x", "branch": "dpo-v1", "exist_ok": True}
    assert calls["create_commit"]["revision"] == "dpo-v1"
    assert sorted(hub.uploaded) == ["adapter_config.json", "adapter_model.safetensors", "recipe.yaml"]
    uploaded_config = json.loads(hub.uploaded["adapter_config.json"])
    assert uploaded_config["base_model_name_or_path"] == "openai-community/gpt2" and uploaded_config["r"] == 4
    recipe = yaml.safe_load(hub.uploaded["recipe.yaml"])
    assert recipe["output_dir"] == "adapter-run" and recipe["datasets"] == [{"path": "x.jsonl"}]
    assert str(tmp_path).encode() not in b"".join(hub.uploaded.values())
    # the local folder is as it was (still loadable on this machine), plus the record of where it went
    assert {p: p.read_bytes() for p in local_before} == local_before
    assert json.loads((folder / HUB_RECORD).read_text()) == {"repo_id": "someone/x", "revision": "dpo-v1"}
    # trained on a local fine-tune that is not on the Hub: one line says the Hub id names where the lineage began
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "`sft`" in messages[0] and "openai-community/gpt2" in messages[0]


def test_push_of_an_adapter_whose_base_is_on_the_hub(tmp_path, hub, caplog):
    base = write_run(tmp_path / "sft", model_name_or_path=None, model_config="gpt2")
    (base / HUB_RECORD).write_text(json.dumps({"repo_id": "me/sft", "revision": None}))
    folder = adapter_run(tmp_path, base)
    (folder / "README.md").write_text('model = AutoPeftModelForCausalLM.from_pretrained("x")\n')
    caplog.set_level(logging.WARNING, logger="alignment.run.integrations")
    assert push_folder(folder, "x") is True
    assert b'from_pretrained("me/x")' in hub.uploaded["README.md"]  # the quick start names the repo it is in
    calls = dict(hub.calls)
    assert calls["create_repo"]["private"] is None and "create_branch" not in calls
    assert calls["create_commit"]["revision"] is None
    assert json.loads(hub.uploaded["adapter_config.json"])["base_model_name_or_path"] == "me/sft"
    assert json.loads((folder / HUB_RECORD).read_text())["repo_id"] == "me/x"  # the namespace the Hub gave it
    assert not caplog.records


def test_push_of_an_adapter_whose_base_is_nowhere_on_the_hub(tmp_path, hub, caplog):
    base = write_run(tmp_path / "scratch", model_name_or_path=None, model_config="gpt2")
    folder = adapter_run(tmp_path, base)
    caplog.set_level(logging.WARNING, logger="alignment.run.integrations")
    assert push_folder(folder, "someone/x") is True
    assert json.loads(hub.uploaded["adapter_config.json"])["base_model_name_or_path"] == "scratch"
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "not on the Hub" in messages[0] and "\n" not in messages[0]
