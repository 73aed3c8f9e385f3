"""FSDP2 over CPU process groups (gloo), launched as users launch it, against one process doing the same work.

    accelerate launch --config_file accelerate_configs/fsdp.yaml --num_processes 2 scripts/run_dpo.py RECIPE.yaml

Every run here trains a tiny random GPT-2 for 4 steps with an effective batch of 4 pairs: one process with 4 per
device, or two processes with 2 each. Sharded, each rank must hold about half of every parameter of the policy and
of TRL's reference model; the losses and the saved (gathered) weights must equal the single process's. The
two-process runs are also launched as two "machines" on this host (`--num_machines 2 --machine_rank 0/1`, one
process each), for FSDP and for DDP, and must end with identical weights on both.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from alignment.training.checkpoints import incomplete_reason
from tests.distributed_runs import (
    CONFIGS,
    REPO,
    environment,
    free_port,
    launch_command,
    losses,
    rank_infos,
    run_stage,
    write_recipe,
)

pytestmark = pytest.mark.slow
FSDP = ["--config_file", str(CONFIGS / "fsdp.yaml"), "--mixed_precision", "no"]
DDP = ["--config_file", str(CONFIGS / "cpu_2proc.yaml")]


def fsdp_on_one_machine() -> list[str]:
    return [*FSDP, "--num_processes", "2", "--main_process_port", str(free_port())]


def run_on_two_machines(tmp_path, config: list[str], stage: str, recipe, *args: str) -> None:
    """Two launches on this host, one process each, joined as machines 0 and 1 of one run."""
    port = str(free_port())
    common = [*config, "--num_processes", "2", "--num_machines", "2", "--main_process_ip", "127.0.0.1"]
    processes = [
        subprocess.Popen(
            launch_command(
                tmp_path,
                stage,
                recipe,
                *args,
                launcher=[*common, "--machine_rank", str(rank), "--main_process_port", port],
            ),
            cwd=REPO,
            env=environment(tmp_path),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [process.communicate(timeout=600) for process in processes]
    for rank, (process, (out, err)) in enumerate(zip(processes, outputs)):
        assert process.returncode == 0, f"machine {rank} failed ({process.returncode}):\n{out[-2000:]}\n{err[-6000:]}"


def assert_sharded(held: dict[str, list[list[int]]], what: str) -> None:
    """Every parameter split between the two ranks, about half each (FSDP2 shards dim 0; odd rows differ by one)."""
    assert held, f"no parameters recorded for the {what}"
    for name, ((local0, full), (local1, _)) in held.items():
        assert local0 + local1 == full, f"{what} {name}: ranks hold {local0} + {local1} of {full} elements"
        assert 0.4 * full <= local0 <= 0.6 * full, f"{what} {name}: rank 0 holds {local0} of {full}"


def by_parameter(infos: list[dict], key: str) -> dict[str, list[list[int]]]:
    return {name: [info[key][name] for info in infos] for name in infos[0][key]}


def assert_close_weights(actual: dict, expected: dict, atol: float = 1e-5) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        assert torch.allclose(actual[name], expected[name], atol=atol, rtol=0), (
            f"{name}: max difference {(actual[name] - expected[name]).abs().max():.2e}"
        )


@pytest.fixture(scope="module")
def dpo_runs(tmp_path_factory, gpt2_tokenizer):
    """One process (4 pairs a step), and FSDP on two machines of one process each (2 pairs a step each), with
    checkpoints at steps 2 and 4. gpt2_tokenizer builds the offline tokenizer cache first, so the ranks only read
    it."""
    tmp_path = tmp_path_factory.mktemp("fsdp-dpo")
    recipe = write_recipe(tmp_path)
    one = tmp_path / "one"
    run_stage(tmp_path, "dpo", recipe, f"--output_dir={one}", "--per_device_train_batch_size=4")
    sharded = tmp_path / "fsdp"
    save = ["--save_strategy=steps", "--save_steps=2"]
    run_on_two_machines(
        tmp_path, FSDP, "dpo", recipe, f"--output_dir={sharded}", "--per_device_train_batch_size=2", *save
    )
    return tmp_path, recipe, one, sharded


def test_fsdp_dpo_shards_policy_and_reference_and_matches_one_process(dpo_runs):
    _, _, one, sharded = dpo_runs
    infos = rank_infos(sharded, 2)
    for info in infos:
        assert info["backend"] == "gloo" and info["world_size"] == 2, info
        assert info["distributed_type"] == "DistributedType.FSDP" and info["is_fsdp2"], info
    assert_sharded(by_parameter(infos, "policy"), "policy")
    assert_sharded(by_parameter(infos, "reference"), "reference")  # TRL's prepare_fsdp, not a whole copy per rank

    single = rank_infos(one, 1)[0]
    assert single["distributed_type"] == "DistributedType.NO"
    assert len(losses(single)) == 4
    assert losses(infos[0]) == losses(infos[1]) == pytest.approx(losses(single), abs=1e-5)
    assert losses(single)[0] == pytest.approx(0.6931, abs=1e-4)  # policy == reference at step 0

    # the final save is gathered whole, in the stock format, and equals the single process's
    assert_close_weights(load_file(sharded / "model.safetensors"), load_file(one / "model.safetensors"))
    for step in (2, 4):
        assert incomplete_reason(sharded / f"checkpoint-{step}") is None


def test_fsdp_resumes_a_sharded_checkpoint_exactly(dpo_runs):
    tmp_path, recipe, _, sharded = dpo_runs
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(sharded / "checkpoint-2", resumed / "checkpoint-2")
    run = run_stage(
        tmp_path,
        "dpo",
        recipe,
        f"--output_dir={resumed}",
        "--per_device_train_batch_size=2",
        "--resume_from_checkpoint=true",
        launcher=fsdp_on_one_machine(),  # the README's command: two processes on one machine
    )
    first = next(line for line in run.stderr.splitlines() if line.startswith("INFO "))
    assert first.startswith("INFO alignment.run.pipeline: launch: FSDP2 on 2 processes · precision fp32"), first
    assert "engine FSDP2 (2 processes, gloo, cpu)" in run.stderr
    whole, again = rank_infos(sharded, 2)[0], rank_infos(resumed, 2)[0]
    assert again["steps_run"] == 2 and whole["steps_run"] == 4  # steps 3 and 4, after the checkpoint's two
    assert losses(again) == pytest.approx(losses(whole), abs=1e-6)
    assert_close_weights(load_file(resumed / "model.safetensors"), load_file(sharded / "model.safetensors"), 1e-6)


def test_ddp_on_two_machines_keeps_identical_weights(dpo_runs, tmp_path):
    _, recipe, one, _ = dpo_runs
    out = tmp_path / "ddp"
    run_on_two_machines(tmp_path, DDP, "dpo", recipe, f"--output_dir={out}", "--per_device_train_batch_size=2")
    infos = rank_infos(out, 2)
    assert [info["distributed_type"] for info in infos] == ["DistributedType.MULTI_CPU"] * 2
    for name, ((local0, full), (local1, _)) in by_parameter(infos, "policy").items():
        assert local0 == local1 == full, name  # DDP: every rank holds every parameter whole
    ranks = [load_file(out / f"rank{rank}.safetensors") for rank in (0, 1)]
    assert_close_weights(ranks[1], ranks[0], atol=0)  # identical on both machines
    assert_close_weights(load_file(out / "model.safetensors"), load_file(one / "model.safetensors"))
    assert losses(infos[0]) == pytest.approx(losses(rank_infos(one, 1)[0]), abs=1e-5)


def test_fsdp_two_machines_hold_identical_gathered_weights(dpo_runs):
    _, _, _, sharded = dpo_runs
    ranks = [load_file(sharded / f"rank{rank}.safetensors") for rank in (0, 1)]
    assert_close_weights(ranks[1], ranks[0], atol=0)


def test_fsdp_sft_matches_one_process(tmp_path, gpt2_tokenizer):
    recipe = write_recipe(tmp_path, max_steps=3)
    one, sharded = tmp_path / "one", tmp_path / "fsdp"
    run_stage(tmp_path, "sft", recipe, f"--output_dir={one}", "--per_device_train_batch_size=4")
    run_stage(
        tmp_path, "sft", recipe, f"--output_dir={sharded}", "--per_device_train_batch_size=2",
        launcher=fsdp_on_one_machine(),
    )  # fmt: skip
    infos = rank_infos(sharded, 2)
    assert all(info["is_fsdp2"] for info in infos)
    assert_sharded(by_parameter(infos, "policy"), "policy")
    assert losses(infos[0]) == pytest.approx(losses(rank_infos(one, 1)[0]), abs=1e-5)
    assert_close_weights(load_file(sharded / "model.safetensors"), load_file(one / "model.safetensors"))


def test_fsdp_dpo_with_lora(tmp_path, gpt2_tokenizer):
    recipe = write_recipe(tmp_path, max_steps=2, use_peft=True, lora_r=4, lora_alpha=8)
    out = tmp_path / "lora"
    run_stage(
        tmp_path, "dpo", recipe, f"--output_dir={out}", "--per_device_train_batch_size=2",
        launcher=fsdp_on_one_machine(),
    )  # fmt: skip
    infos = rank_infos(out, 2)
    assert all(info["is_fsdp2"] for info in infos)
    held = by_parameter(infos, "policy")
    adapters = {name: shards for name, shards in held.items() if "lora_" in name}
    assert adapters, sorted(held)[:5]
    assert_sharded(adapters, "LoRA adapter")
    first = losses(infos[0])[0]
    assert first == pytest.approx(0.6931, abs=1e-4)  # the reference is the base model, with the adapter disabled
    assert losses(infos[0]) == losses(infos[1])
    assert (out / "adapter_model.safetensors").is_file() or (out / "model.safetensors").is_file()
