"""scripts/check_gpu.py (benchmarks/gpu_check.py), the prepared GPU check: on a machine without a GPU it stops in one line, before any work;
its checks and its report are exercised here on CPU with a tiny model (the GPU figures come from a GPU machine)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "check_gpu.py"


def load_script():
    from benchmarks import gpu_check

    return gpu_check


def test_without_a_gpu_it_stops_in_one_line(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--output_json", str(out)], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip() == load_script().NO_GPU  # the whole of its output: one line
    assert "no CUDA GPU here" in done.stderr and not out.exists()


def test_first_step_checks_use_the_stated_tolerance():
    script = load_script()
    ours = {"losses": [0.6931, 0.69], "first_metrics": {"logps/chosen": -100.0, "logps/rejected": -150.0}}
    trl = {"losses": [0.6931, 0.70], "first_metrics": {"logps/chosen": -101.9, "logps/rejected": -153.1}}
    checks = script.first_value_checks("dpo", ours, trl)
    assert [(c["value"], c["ok"]) for c in checks] == [
        ("loss", True),
        ("logps/chosen", True),  # 1.9 <= 0.02 * 101.9
        ("logps/rejected", False),  # 3.1 > 0.02 * 153.1
    ]
    assert [c["value"] for c in script.first_value_checks("sft", {"losses": [10.9]}, {"losses": [10.8]})] == ["loss"]
    assert script.first_value_checks("sft", {"losses": [11.1]}, {"losses": [10.8]})[0]["ok"] is False


@pytest.mark.slow
def test_the_check_runs_end_to_end_on_a_tiny_model(tmp_path, monkeypatch, capsys, gpt2_tokenizer):
    """The whole check, as on the GPU machine, with the GPU test lifted: DPO (`--tasks dpo`; SFT's one check is
    `first_value_checks` above, and its benchmark run is test_benchmark's), both sides, the report."""
    import torch

    from alignment.common import default_cache_dir

    script = load_script()
    for key, value in {"ALIGNMENT_CACHE": str(default_cache_dir()), "PYTORCH_NVML_BASED_CUDA_CHECK": "1"}.items():
        monkeypatch.setenv(key, value)  # main() only sets what is unset: these are restored after the test
    monkeypatch.setattr(script, "ready_line", lambda dtype: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "CPU (test)")
    out = tmp_path / "gpu.json"
    # fp32: this CPU multiplies bf16 60-100x slower (the benchmark in bf16: test_benchmark's sft-llama-bf16)
    tiny = ["--model", "tiny", "--batch_size", "2", "--max_length", "64", "--warmup", "1", "--steps", "1"]
    tiny += ["--dtype", "fp32", "--tasks", "dpo"]
    script.main([*tiny, "--output_json", str(out)])
    printed = capsys.readouterr().out
    assert "all first-step values agree" in printed and "pairs/s" in printed and "tokens/s" not in printed
    summary = json.loads(out.read_text())
    assert [(c["task"], c["value"]) for c in summary["checks"]] == [
        ("dpo", "loss"),
        ("dpo", "logps/chosen"),
        ("dpo", "logps/rejected"),
    ]
    assert all(c["ok"] for c in summary["checks"])
    assert list(summary["reports"]) == ["dpo"]
    assert [r["side"] for r in summary["reports"]["dpo"]["results"]] == ["ours", "trl"]
