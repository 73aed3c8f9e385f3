"""scripts/benchmark.py runs every side in its own process, on the same weights and data, with agreeing losses."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "benchmark.py"


@pytest.mark.slow
@pytest.mark.parametrize("task, rate", [("dpo", "pairs_per_second"), ("sft", "tokens_per_second")])
def test_benchmark_sides_agree(tmp_path, task, rate):
    out = tmp_path / "result.json"
    sides = "ours,trl,ours-precompute" if task == "dpo" else "ours,trl"
    command = [sys.executable, str(SCRIPT), task, "--model", "tiny", "--batch_size", "2", "--max_length", "96",
               "--warmup", "1", "--steps", "2", "--sides", sides, "--output_json", str(out)]
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
