"""QLoRA: `load_in_4bit` / `load_in_8bit` load the base quantized by bitsandbytes (its CPU backend here), LoRA trains
only the adapter, and DPO's reference is the quantized base with the adapter off. What cannot work is refused in
one line before anything loads: quantization without LoRA, without bitsandbytes, of random weights, or of an
official GPT-2 checkpoint converted into our class in memory."""

import importlib.util
import json

import datasets
import pytest
import torch
import transformers
from peft import get_peft_model
from trl import get_peft_config

from alignment import AlignmentGPT2Config, AlignmentGPT2ForCausalLM
from alignment.modeling.loading import load_model
from alignment.run.arguments import ModelArguments
from alignment.run.cli import run_cli
from alignment.run.pipeline import model_loading, run_sft
from alignment.training import DPOConfig, DPOTrainer
from tests.conftest import preference_rows

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
needs_bnb = pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed (pip install bitsandbytes)")
TINY = dict(vocab_size=50257, n_positions=64, n_embd=32, n_layer=1, n_head=2)  # GPT-2's tokenizer fits


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    """A checkpoint of our GPT-2 class (nn.Linear projections)."""
    folder = tmp_path_factory.mktemp("ours")
    torch.manual_seed(0)
    AlignmentGPT2ForCausalLM(AlignmentGPT2Config(**TINY)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """A transformers GPT-2 checkpoint (Conv1D projections), the official checkpoints' layout."""
    folder = tmp_path_factory.mktemp("official")
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(**TINY)).save_pretrained(folder)
    return folder


def qlora_args(path, **settings):
    return ModelArguments(model_name_or_path=str(path), use_peft=True, lora_r=4, lora_alpha=8, **settings)


def quantized_model(model_args):
    model = load_model(model_args.model_name_or_path, **model_loading(model_args, False))
    model_args.lora_target_modules = model_args.lora_target_modules or ["c_attn", "c_proj", "c_fc"]
    return model


@needs_bnb
@pytest.mark.parametrize(
    ("bits", "implementation"), [("4", "alignment"), ("8", "alignment"), ("4", "transformers")], ids=str
)
def test_lora_on_a_quantized_base_trains_the_adapter_only(ours, official, bits, implementation):
    """Our GPT-2 class (nn.Linear) and transformers' GPT-2 (Conv1D) both quantize; the step is finite."""
    path = ours if implementation == "alignment" else official
    model_args = qlora_args(path, model_implementation=implementation, **{f"load_in_{bits}bit": True})
    model = quantized_model(model_args)
    assert getattr(model, f"is_loaded_in_{bits}bit")
    linear_class = {"4": "Linear4bit", "8": "Linear8bitLt"}[bits]
    assert {type(m).__name__ for m in model.modules()} >= {linear_class}
    assert not any(p.requires_grad for p in model.parameters())  # peft's k-bit preparation froze the base

    peft_model = get_peft_model(model, get_peft_config(model_args))
    ids = torch.randint(0, 50000, (2, 12))
    loss = peft_model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    with_grad = [name for name, p in peft_model.named_parameters() if p.grad is not None]
    assert with_grad and all("lora_" in name for name in with_grad)


@needs_bnb
def test_qlora_dpo_reference_is_the_quantized_base_with_the_adapter_off(ours, tmp_path, gpt2_tokenizer):
    model_args = qlora_args(ours, load_in_4bit=True)
    model = quantized_model(model_args)
    args = DPOConfig(
        str(tmp_path), per_device_train_batch_size=4, max_steps=1, max_length=48, learning_rate=1e-2,
        report_to="none", save_strategy="no", bf16=False, use_cpu=True, activation_checkpointing=False,
    )  # fmt: skip
    dataset = datasets.Dataset.from_list(preference_rows(8))
    trainer = DPOTrainer(
        model,
        args=args,
        train_dataset=dataset,
        processing_class=gpt2_tokenizer,
        peft_config=get_peft_config(model_args),
    )
    assert trainer.ref_model is None  # no second copy of the base: the adapter is switched off instead
    trainer.train()
    assert all(torch.isfinite(torch.tensor(log["loss"])) for log in trainer.state.log_history if "loss" in log)

    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        policy = trainer.scored_tokens(trainer.model, batch).reply_logps(None)
        with trainer.model.disable_adapter():
            base = trainer.scored_tokens(trainer.model, batch).reply_logps(None)
    reference = trainer.reference_logps(batch, policy)
    torch.testing.assert_close(reference.chosen, base.chosen)
    torch.testing.assert_close(reference.rejected, base.rejected)
    assert (policy.chosen - base.chosen).abs().max() > 1e-6  # the adapter trained, so "off" is a real difference


@needs_bnb
def test_qlora_sft_run_saves_an_adapter(ours, tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"text": r["prompt"] + r["chosen"]}) + "\n" for r in preference_rows(16)))
    out = tmp_path / "out"
    run_cli(
        run_sft,
        [
            f"--model_name_or_path={ours}", f"--dataset_name={data}", f"--output_dir={out}", "--load_in_4bit=true",
            "--use_peft=true", "--lora_r=4", "--max_length=32", "--max_steps=2", "--per_device_train_batch_size=4",
            "--report_to=none", "--save_strategy=no", "--logging_steps=1", "--test_size=4", "--eval_strategy=no",
            "--activation_checkpointing=false", "--debug",
        ],
    )  # fmt: skip
    assert (out / "adapter_model.safetensors").is_file()
    losses = [
        log["loss"] for log in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in log
    ]
    assert losses and all(torch.isfinite(torch.tensor(losses)))


# --- refused in one line, before anything loads (bitsandbytes not needed) ----------------------------------------


@pytest.mark.parametrize("bits", ["4", "8"])
def test_quantization_without_lora_is_refused(tmp_path, bits):
    model_args = ModelArguments(model_name_or_path=str(tmp_path / "nothing-here"), **{f"load_in_{bits}bit": True})
    with pytest.raises(ValueError, match=rf"^load_in_{bits}bit: a quantized model cannot be fully fine-tuned"):
        model_loading(model_args, False)


def test_quantization_without_bitsandbytes_is_refused(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    with pytest.raises(ValueError, match=r"^load_in_4bit: needs bitsandbytes, which is not installed"):
        model_loading(qlora_args(tmp_path / "nothing-here", load_in_4bit=True), False)


def test_a_refused_recipe_stops_before_loading_the_model(tmp_path):
    """The missing checkpoint would fail at load: the refusal comes first."""
    argv = [f"--model_name_or_path={tmp_path / 'nothing-here'}", "--dataset_name=unused.jsonl", "--load_in_4bit=true"]
    with pytest.raises(ValueError, match=r"^load_in_4bit: a quantized model cannot be fully fine-tuned"):
        run_sft([*argv, f"--output_dir={tmp_path / 'out'}", "--max_steps=1", "--report_to=none"])


def test_merging_into_a_quantized_base_is_refused(tmp_path):
    model_args = qlora_args(tmp_path, load_in_4bit=True, merge_adapter_on_save=True)
    with pytest.raises(ValueError, match=r"^merge_adapter_on_save: merging into the quantized base"):
        model_loading(model_args, False)


@needs_bnb
def test_random_weights_and_converted_official_gpt2_are_refused(official):
    random_init = ModelArguments(model_config="gpt2", use_peft=True, load_in_4bit=True)
    with pytest.raises(ValueError, match=r"^load_in_4bit quantizes a checkpoint's weights, but model_config"):
        load_model(None, **model_loading(random_init, False))
    converted = qlora_args(official, load_in_4bit=True)  # model_implementation: alignment converts it in memory
    with pytest.raises(ValueError, match=r"^load_in_4bit: the official GPT-2 checkpoint .* model_implementation"):
        load_model(converted.model_name_or_path, **model_loading(converted, False))
