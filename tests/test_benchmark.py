"""The TRL comparison (benchmarks/trl_comparison.py, run by scripts/benchmark.py) runs every side in its own process,
on the same weights and data, with agreeing losses; its FLOP count (benchmarks/flops.py) and profile groups
(benchmarks/step_profile.py)."""

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers

from alignment.data import split_hh_dialogue
from alignment.run.measure import ChildFailed, run_in_child
from alignment.training.layouts import trl_layout
from alignment.training.shared_prefix import SharedPrefixPreferenceCollator
from benchmarks.flops import (
    ModelShape,
    Work,
    dpo_batch_work,
    forward_flops,
    matmul_parameters,
    matmul_peak,
    sft_batch_work,
    step_flops,
    utilisation,
)
from benchmarks.step_profile import BETWEEN, DATA, ELEMENTWISE, OPTIMIZER, op_group, summarise
from benchmarks.trl_comparison import (
    DPO_SIDES,
    SFT_SIDES,
    Settings,
    bf16_against_fp32,
    cut_tokenizer,
    synthetic_pairs,
    with_utilisation,
)

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "benchmark.py"


def test_synthetic_pairs_are_hh_shaped_and_reproducible():
    pairs = synthetic_pairs(20)
    assert pairs == synthetic_pairs(20) and len(pairs) == 20
    for pair in pairs:
        assert split_hh_dialogue(pair["prompt"] + pair["chosen"]) == (pair["prompt"], pair["chosen"])
        assert pair["chosen"].startswith(" ") and pair["rejected"].startswith(" ")


def test_settings_pick_the_sides_and_refuse_no_timed_steps():
    assert Settings("dpo").sides == DPO_SIDES and Settings("sft").sides == SFT_SIDES
    with pytest.raises(ValueError, match="at least 1"):
        Settings("dpo", steps=0)
    with pytest.raises(ValueError, match="model must be one of"):
        Settings("dpo", model="gpt3")
    with pytest.raises(ValueError, match="dtype must be fp32 or bf16"):
        Settings("dpo", dtype="fp16")
    assert (
        Settings("dpo", warmup=2, steps=3).total_steps == 5
        and Settings("dpo", warmup=2, steps=3, profile=True).total_steps == 8
    )


# --- the FLOP count -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build",
    [
        lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4)),
        lambda: transformers.GPT2LMHeadModel(
            transformers.GPT2Config(vocab_size=97, n_embd=32, n_layer=3, n_head=4, n_inner=48)
        ),
        lambda: transformers.LlamaForCausalLM(  # grouped-query attention, explicit head size, untied head
            transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=16)
        ),
    ],
    ids=["gpt2", "gpt2-n_inner", "llama-gqa"],
)  # fmt: skip
def test_the_flop_formula_counts_every_matmul_weight_of_the_model(build):
    model = build()
    shape = ModelShape.of(model.config)
    assert (shape.block_params, shape.head_params) == matmul_parameters(model)
    heads = getattr(model.config, "num_attention_heads", getattr(model.config, "n_head", None))
    assert shape.attention_width == heads * (getattr(model.config, "head_dim", None) or 32 // heads)


def test_our_gpt2_has_the_shape_of_the_gpt2_it_converts():
    from alignment import AlignmentGPT2Config, AlignmentGPT2ForCausalLM

    ours = AlignmentGPT2ForCausalLM(AlignmentGPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4))
    assert (ModelShape.of(ours.config).block_params, ModelShape.of(ours.config).head_params) == matmul_parameters(ours)


def test_step_flops_are_six_n_tokens_plus_attention_and_two_n_for_the_reference():
    shape = ModelShape(layers=2, attention_width=8, block_params=100, head_params=30)
    work = Work(tokens=5, scored=5, attention=25)  # one row of 5 tokens, every token scored
    assert forward_flops(shape, work) == 2 * 130 * 5 + 4 * 2 * 8 * 25
    assert step_flops(shape, work) == 6 * 130 * 5 + 12 * 2 * 5 * 8 * 5  # PaLM's 6N + 12·L·T·d per token
    assert step_flops(shape, work, reference=True) == step_flops(shape, work) + forward_flops(shape, work)
    assert step_flops(shape, Work(tokens=5, scored=2)) == 6 * (100 * 5 + 30 * 2)  # the head on scored tokens only
    assert Work(1, 2, 3) + Work(10, 20, 30) == Work(11, 22, 33)
    assert utilisation(flops_per_step=6e9, seconds_per_step=2.0, peak_flops_per_second=4e9) == 0.75


def test_a_dpo_batch_is_the_same_model_work_in_both_layouts_and_the_stock_one_executes_its_padding():
    pairs = [
        {"prompt_ids": [1, 2, 3, 4], "chosen_ids": [5, 6], "rejected_ids": [7, 8, 9]},
        {"prompt_ids": [1, 2], "chosen_ids": [5], "rejected_ids": [7, 8]},
    ]
    stock, shared = trl_layout(pairs, pad_token_id=0), SharedPrefixPreferenceCollator(0)(pairs)
    # rows [prompt + chosen] 6, 3 and [prompt + rejected] 7, 4 tokens; replies 2 + 1 + 3 + 2 tokens
    expected = Work(tokens=6 + 3 + 7 + 4, scored=8, attention=36 + 9 + 49 + 16)
    (stock_model, stock_executed), (shared_model, shared_executed) = dpo_batch_work(stock), dpo_batch_work(shared)
    assert stock_model == shared_model == expected
    assert stock_executed == Work(tokens=4 * 7, scored=8, attention=4 * 49)  # 4 rows padded to 7
    assert dpo_batch_work(stock, head_on_every_position=True)[1].scored == 4 * 6  # TRL's head on CPU
    width = shared["input_ids"].size(1)
    assert shared_executed == Work(
        tokens=shared["input_ids"].numel(), scored=8, attention=len(shared["input_ids"]) * width**2
    )
    assert shared_executed.tokens == 2 * 9  # a row per pair here (9 + 5 > 9): 18 tokens against stock's 28
    free = SharedPrefixPreferenceCollator(0, padding_free=True)(pairs)  # our GPT-2: the tokens without padding
    assert dpo_batch_work(free) == (expected, Work(tokens=9 + 5, scored=8, attention=2 * 9**2))


def test_an_sft_batch_counts_its_documents_by_restarting_positions():
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])  # padding-free: documents of 3, 2 and 4 tokens
    labels = torch.tensor([[-100, 5, 6, -100, 7, -100, 8, 9, 10]])
    batch = {"input_ids": torch.ones(1, 9, dtype=torch.long), "position_ids": position_ids, "labels": labels}
    model, executed = sft_batch_work(batch)
    assert model == Work(tokens=9, scored=6, attention=9 + 4 + 16) and executed == Work(9, 6, 81)
    assert sft_batch_work(batch, head_on_every_position=True)[1].scored == 8
    assert sft_batch_work(batch, grouped_attention=True)[1].attention == 81  # 3 short rows of 4: no saving
    six_pairs = {"input_ids": torch.ones(1, 12, dtype=torch.long), "position_ids": torch.tensor([[0, 1] * 6]),
                 "labels": torch.tensor([[-100, 1] * 6])}  # fmt: skip
    assert sft_batch_work(six_pairs, grouped_attention=True)[1] == Work(12, 6, 6 * 2**2)  # our GPT-2's short rows
    padded = {"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]),
              "labels": torch.tensor([[1, 2, 3, -100], [1, 2, 3, 4]])}  # fmt: skip
    assert sft_batch_work(padded) == (Work(7, 5, 9 + 16), Work(8, 5, 2 * 16))


def test_the_matmul_peak_is_a_rate_with_this_process_threads():
    peak = matmul_peak("fp32", seconds=0.05, device="cpu")
    assert peak["size"] >= 512 and peak["threads"] == torch.get_num_threads() and peak["device"] == "cpu"
    assert 1e8 < peak["flops_per_second"] < 1e15  # from 0.1 GFLOP/s (a loaded machine) to a GPU's range
    with pytest.raises(KeyError):
        matmul_peak("fp16")


def test_utilisation_and_bf16_against_fp32_arithmetic():
    bf16 = [{"side": "ours", "tokens_per_second": 50.0, "peak_rss_gb": 1.0, "losses": [2.0, 1.5, 1.25],
             "model_flops_per_step": 8e9, "executed_flops_per_step": 4e9, "seconds_per_step": 2.0}]  # fmt: skip
    fp32 = [{"side": "ours", "tokens_per_second": 100.0, "peak_rss_gb": 2.0, "losses": [2.0, 1.25, 1.0]}]
    (row,) = bf16_against_fp32(bf16, fp32, "tokens_per_second")
    assert row == {"side": "ours", "speed": 0.5, "memory": 0.5, "steps": 3, "loss_difference_last": 0.25,
                   "loss_difference_max": 0.25}  # fmt: skip
    (result,) = with_utilisation(bf16, {"flops_per_second": 8e9})
    assert result["mfu"] == 0.5 and result["executed_utilisation"] == 0.25


def test_the_tokenizer_of_a_smaller_vocabulary_keeps_every_id_below_it(gpt2_tokenizer):
    cut, gpt2 = cut_tokenizer(gpt2_tokenizer, 49152), gpt2_tokenizer
    assert len(cut) == 49152 and cut.eos_token_id == 49151
    texts = [p["prompt"] + p["chosen"] for p in synthetic_pairs(20)] + [" Handling grids: schadenfreude! 😀"]
    for text in texts:
        ids = cut(text)["input_ids"]
        assert max(ids) < 49151 and cut.decode(ids) == text  # 49151 is end-of-text
    assert gpt2(" Handling grids")["input_ids"] == [49500, 50000]  # GPT-2's tokens past the cut: spelled shorter
    assert len(cut(" Handling grids")["input_ids"]) > 2
    assert cut(texts[0])["input_ids"] == gpt2(texts[0])["input_ids"]  # common words: GPT-2's own ids


# --- the profile groups ---------------------------------------------------------------------------------------------


def test_ops_are_grouped_by_kind_and_by_the_range_they_run_in():
    assert op_group("aten::mm") == op_group("aten::addmm") == "matmul"
    assert op_group("aten::_scaled_dot_product_flash_attention_for_cpu_backward") == "attention"
    assert op_group("aten::_log_softmax_backward_data") == "softmax / log-softmax"
    assert op_group("aten::tanh") == "norms and activations" and op_group("aten::t") == "copies, indexing, allocation"
    assert op_group("aten::threshold_backward") == op_group("aten::add_") == ELEMENTWISE
    assert op_group("aten::add_", ("Optimizer.step#AdamW.step", "ProfilerStep#4")) == OPTIMIZER
    assert op_group("aten::_foreach_norm") == OPTIMIZER  # gradient clipping
    assert op_group("aten::tril", ("enumerate(DataLoader)#_SingleProcessDataLoaderIter.__next__",)) == DATA
    assert op_group("ProfilerStep#4") == op_group("autograd::engine::evaluate_function: MmBackward0") == BETWEEN


def test_a_profile_summary_adds_up_to_the_steps_wall_time():
    def event(name, self_us, parent=None):
        return SimpleNamespace(name=name, self_cpu_time_total=self_us, cpu_parent=parent, device_type=None)

    step = event("ProfilerStep#3", 100)
    events = [step, event("aten::mm", 500, step), event("aten::addmm", 300, step), event("aten::add", 50, step)]
    rows = summarise(events, steps=2, wall_seconds=0.001)
    assert [r["group"] for r in rows] == ["matmul", BETWEEN, ELEMENTWISE, "not under any event"]
    assert rows[0]["top_ops"] == ["aten::mm", "aten::addmm"] and rows[0]["ms_per_step"] == pytest.approx(0.4)
    assert math.isclose(sum(r["share"] for r in rows), 1.0) and rows[-1]["ms_per_step"] == pytest.approx(0.025)


@pytest.mark.slow  # each child imports torch (the test preloads nothing)
def test_a_child_reports_its_result_time_and_peak_memory_and_a_failed_one_its_log(tmp_path):
    run = run_in_child(sorted, [3, 1, 2], log_path=tmp_path / "sorted.log")
    assert run.result == [1, 2, 3] and run.seconds > 0 and run.peak_rss_mib > 0
    assert run.log_path.is_file() and not (tmp_path / "sorted.log.stats.json").exists()
    with pytest.raises(ChildFailed, match=r"(?s)int failed \(exit code 1\); its log, .*invalid literal") as failure:
        run_in_child(int, "not a number", log_path=tmp_path / "int.log", what="int")
    assert failure.value.exitcode == 1 and "ValueError" in failure.value.log_tail


@pytest.mark.slow
@pytest.mark.parametrize(
    "task, model, rate, extra",
    [
        ("dpo", "tiny", "pairs_per_second", ["--profile"]),
        ("sft", "tiny-llama", "tokens_per_second", ["--dtype", "bf16", "--max_length", "48"]),
    ],
    ids=["dpo-profile", "sft-llama-bf16"],
)
def test_benchmark_sides_agree(tmp_path, task, model, rate, extra):
    """DPO on GPT-2 with the profile of our side; SFT on the Llama preset (the cut tokenizer's ids in range) in bf16
    (bf16 weights and autocast on both sides; short rows, as this CPU multiplies bf16 60-100x slower)."""
    dtype = "bf16" if "bf16" in extra else "fp32"
    out = tmp_path / "result.json"
    sides = "ours,trl,ours-precompute" if task == "dpo" else "ours,trl"
    command = [
        sys.executable,
        str(SCRIPT),
        task,
        "--model",
        model,
        "--batch_size",
        "2",
        "--max_length",
        "96",
        "--warmup",
        "1",
        "--steps",
        "2",
        "--sides",
        sides,
        "--peak_seconds",
        "0.2",
        "--output_json",
        str(out),
        *extra,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    results = {r["side"]: r for r in report["results"]}
    assert set(results) == set(sides.split(","))
    assert report["model_type"] == ("gpt2" if model == "tiny" else "llama")
    assert report["dtype"] == dtype and report["matmul_peak"][dtype]["flops_per_second"] > 0
    stock = results["trl"]
    for result in results.values():
        assert result[rate] > 0 and result["peak_rss_gb"] > 0 and len(result["losses"]) == 3
        for ours, theirs in zip(result["losses"], stock["losses"]):
            assert abs(ours - theirs) <= (1e-4 if dtype == "fp32" else 2e-3)  # the same work on every side
        assert result["mfu"] > 0 and result["executed_utilisation"] > 0 and result["cpu_seconds_per_step"] > 0
        assert result["mfu"] == pytest.approx(
            result["model_flops_per_step"]
            / result["seconds_per_step"]
            / report["matmul_peak"][dtype]["flops_per_second"]
        )
    # the same batches are the same model work on every side; stock TRL executes more (padding, its head everywhere)
    assert results["ours"]["model_flops_per_step"] == stock["model_flops_per_step"]
    assert stock["executed_flops_per_step"] > stock["model_flops_per_step"]
    assert "vs trl" in done.stdout and "MFU" in done.stdout
    if task == "dpo":  # no reference in the step: 3 of the 4 forward passes' worth
        assert results["ours-precompute"]["model_flops_per_step"] == pytest.approx(
            0.75 * results["ours"]["model_flops_per_step"]
        )
        profile = {row["group"]: row for row in results["ours"]["profile"]}
        assert {"matmul", OPTIMIZER, BETWEEN} <= set(profile) and "profile" not in stock
        assert math.isclose(sum(row["share"] for row in profile.values()), 1.0, rel_tol=1e-6)
        assert "where the time goes: ours" in done.stdout
