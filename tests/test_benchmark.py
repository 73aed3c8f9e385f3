"""The TRL comparison (benchmarks/trl_comparison.py, run by scripts/benchmark.py) runs every side in its own process,
on the same weights and data, with agreeing losses."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from alignment.data import split_hh_dialogue
from alignment.run.measure import ChildFailed, run_in_child
from benchmarks.trl_comparison import DPO_SIDES, SFT_SIDES, Settings, synthetic_pairs

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


@pytest.mark.slow  # each child imports torch (the test preloads nothing)
def test_a_child_reports_its_result_time_and_peak_memory_and_a_failed_one_its_log(tmp_path):
    run = run_in_child(sorted, [3, 1, 2], log_path=tmp_path / "sorted.log")
    assert run.result == [1, 2, 3] and run.seconds > 0 and run.peak_rss_mib > 0
    assert run.log_path.is_file() and not (tmp_path / "sorted.log.stats.json").exists()
    with pytest.raises(ChildFailed, match=r"(?s)int failed \(exit code 1\); its log, .*invalid literal") as failure:
        run_in_child(int, "not a number", log_path=tmp_path / "int.log", what="int")
    assert failure.value.exitcode == 1 and "ValueError" in failure.value.log_tail


@pytest.mark.slow
@pytest.mark.parametrize("task, rate", [("dpo", "pairs_per_second"), ("sft", "tokens_per_second")])
def test_benchmark_sides_agree(tmp_path, task, rate):
    out = tmp_path / "result.json"
    sides = "ours,trl,ours-precompute" if task == "dpo" else "ours,trl"
    command = [
        sys.executable,
        str(SCRIPT),
        task,
        "--model",
        "tiny",
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
        "--output_json",
        str(out),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    results = {r["side"]: r for r in report["results"]}
    assert set(results) == set(sides.split(","))
    for result in results.values():
        assert result[rate] > 0 and result["peak_rss_gb"] > 0 and len(result["losses"]) == 3
        for ours, stock in zip(result["losses"], results["trl"]["losses"]):
            assert abs(ours - stock) <= 1e-4  # the same work on every side
    assert "vs trl" in done.stdout
