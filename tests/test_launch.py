"""`python -m alignment.run.launch` (accelerate launch with our exits): Ctrl-C on a two-process run gives one
`interrupted:` line, exit code 130 and a complete checkpoint, with no launcher traceback; a worker's error gives its
one `error:` line and exit code 1."""

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from alignment.training.checkpoints import incomplete_reason
from tests.test_distributed import CPU_CONFIG, free_port
from tests.test_reliability import COMMON, REPO, SLOW_WRAPPER, make_recipes, subprocess_env


def launch(tmp_path, *script_args, processes=2):
    command = [sys.executable, "-m", "alignment.run.launch"]
    if processes == 2:
        command += ["--config_file", str(CPU_CONFIG), "--main_process_port", str(free_port())]
    else:
        command += ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    env = {**subprocess_env(), "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen(
        command + [str(a) for a in script_args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, which the test then interrupts as a terminal's Ctrl-C does
    )


@pytest.mark.slow
def test_ctrl_c_on_two_processes_gives_one_line_and_exit_130(tmp_path, gpt2_tokenizer):
    recipe = make_recipes(tmp_path)["sft"]
    wrapper = tmp_path / "slow.py"
    wrapper.write_text(SLOW_WRAPPER, encoding="utf-8")
    out = tmp_path / "run"
    process = launch(tmp_path, wrapper, "scripts/run_sft.py", recipe, f"--output_dir={out}")
    deadline = time.time() + 300
    while not (out / "checkpoint-2").is_dir() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, process.communicate()[1][-3000:]
    os.killpg(process.pid, signal.SIGINT)  # every process of the group, launcher included
    _, err = process.communicate(timeout=300)
    assert process.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "SignalException" not in err, err[-3000:]
    assert err.count("interrupted: training stopped at step") == 1, err[-3000:]
    assert err.count("SIGINT received: saving a checkpoint") == 1, err[-3000:]
    saved = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert saved and incomplete_reason(saved[-1]) is None and not (out / "model.safetensors").exists()


def test_a_worker_error_gives_its_line_and_exit_1(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(yaml.safe_dump({**COMMON, "dataset_name": str(tmp_path / "missing.jsonl")}), encoding="utf-8")
    process = launch(tmp_path, "scripts/run_sft.py", recipe, f"--output_dir={tmp_path / 'run'}", processes=1)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 1, err[-3000:]
    assert "Traceback" not in err and "CalledProcessError" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "missing.jsonl: no such file or directory" in errors[0], err[-3000:]
