"""The first line of training (`alignment.run.run_line.run_line`) and the no-silent-fallback check (`check_launch`):
unit tests on simulated accelerator states, then on a real trainer's accelerator. That the line is logged by real
runs, on 1 process and on a 2-process launch, is asserted in tests/test_global_batch.py."""

from types import SimpleNamespace

import datasets
import pytest
import torch
from accelerate.utils import DistributedType

from alignment.run.run_line import check_launch, run_line
from alignment.training import DPOConfig, DPOTrainer
from tests.conftest import preference_rows, tiny_causal_lms


def simulated(kind=DistributedType.MULTI_GPU, n=2, mixed="no", backend="nccl", device="cuda", per_device=8,
              accumulation=4, global_batch=None, weights=torch.float32, fsdp_version=2, zero_stage=3, split=False,
              use_cpu=False):  # fmt: skip
    """A trainer as run_line and check_launch see it: accelerator state, arguments, model."""
    state = SimpleNamespace(
        distributed_type=kind,
        num_processes=n,
        mixed_precision=mixed,
        backend=backend,
        device=torch.device(device),
        fsdp_plugin=SimpleNamespace(fsdp_version=fsdp_version) if kind == DistributedType.FSDP else None,
        deepspeed_plugin=SimpleNamespace(zero_stage=zero_stage) if kind == DistributedType.DEEPSPEED else None,
    )
    args = SimpleNamespace(
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation,
        global_batch_size=global_batch,
        use_cpu=use_cpu,
        fsdp=None,
        deepspeed=None,
    )
    model = torch.nn.Linear(4, 4).to(weights)
    return SimpleNamespace(accelerator=SimpleNamespace(state=state, split_batches=split), args=args, model=model)


LINES = [
    (dict(kind=DistributedType.FSDP, mixed="bf16", backend="gloo", device="cpu", global_batch=64),
     "engine FSDP2 (2 processes, gloo, cpu) · precision bf16 mixed (fp32 weights) · effective batch 64 = 8 per device "
     "× 2 processes × 4 accumulation (from global_batch_size)"),
    (dict(),
     "engine DDP (2 processes, nccl, cuda) · precision fp32 · effective batch 64 = 8 per device × 2 processes × 4 "
     "accumulation"),
    (dict(kind=DistributedType.MULTI_CPU, mixed="bf16", backend="gloo", device="cpu"),
     "engine DDP (2 processes, gloo, cpu) · precision bf16 autocast (fp32 weights) · effective batch 64 = 8 per device "
     "× 2 processes × 4 accumulation"),
    (dict(kind=DistributedType.NO, n=1, backend=None, device="cpu", accumulation=8),
     "engine single process (cpu) · precision fp32 · effective batch 64 = 8 per device × 1 process × 8 accumulation"),
    (dict(kind=DistributedType.DEEPSPEED, n=8, mixed="bf16", weights=torch.bfloat16, accumulation=1),
     "engine DeepSpeed ZeRO-3 (8 processes, nccl, cuda) · precision bf16 mixed (bf16 weights) · effective batch 64 = "
     "8 per device × 8 processes × 1 accumulation"),
    (dict(kind=DistributedType.NO, n=1, backend=None, weights=torch.bfloat16, per_device=4, accumulation=2),
     "engine single process (cuda) · precision bf16 weights, no mixed precision · effective batch 8 = 4 per device × "
     "1 process × 2 accumulation"),
    (dict(split=True, per_device=16),
     "engine DDP (2 processes, nccl, cuda) · precision fp32 · effective batch 64 = 16 per step split over 2 processes "
     "× 4 accumulation"),
]  # fmt: skip


@pytest.mark.parametrize(("settings", "line"), LINES, ids=lambda x: str(x)[:40])
def test_the_line_states_engine_world_size_precision_and_batch(settings, line):
    assert run_line(simulated(**settings)) == line


FSDP_ASKED = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "WORLD_SIZE": "2"}
MISMATCHES = [
    (dict(kind=DistributedType.MULTI_CPU, backend="gloo", use_cpu=True), FSDP_ASKED,
     "the launcher asked for FSDP but accelerate runs DDP (accelerate drops the FSDP plugin when use_cpu is set"),
    (dict(), {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"},
     "the launcher asked for DeepSpeed but accelerate runs DDP"),
    (dict(kind=DistributedType.DEEPSPEED, zero_stage=2), {"ACCELERATE_USE_DEEPSPEED": "true",
     "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, "the launcher asked for DeepSpeed ZeRO-3 but accelerate runs DeepSpeed "
     "ZeRO-2"),
    (dict(kind=DistributedType.FSDP, fsdp_version=1), FSDP_ASKED,
     "the launcher asked for FSDP version 2 but accelerate runs FSDP1"),
    (dict(kind=DistributedType.FSDP), {}, "accelerate runs FSDP2 though the launcher asked for no sharding engine"),
    (dict(mixed="fp16"), {"ACCELERATE_MIXED_PRECISION": "bf16"},
     "the launcher asked for bf16 mixed precision but the run uses fp16"),
    (dict(), {"ACCELERATE_MIXED_PRECISION": "bf16"}, "the launcher asked for bf16 mixed precision but the run uses none"),
    (dict(kind=DistributedType.NO, n=1), {"WORLD_SIZE": "2"},
     "the launcher started 2 processes (WORLD_SIZE) but accelerate runs 1 process (on a machine without GPUs the "
     "processes need use_cpu: true): each would train alone"),
    (dict(split=True, global_batch=64), {}, "global_batch_size 64, but this run trains with 32 = 8 per step split"),
]  # fmt: skip


@pytest.mark.parametrize(("settings", "environ", "line"), MISMATCHES, ids=lambda x: str(x)[:40])
def test_what_the_launcher_asked_for_runs_or_the_run_stops_in_one_line(settings, environ, line):
    with pytest.raises(ValueError) as error:
        check_launch(simulated(**settings), environ)
    assert str(error.value).startswith(line), str(error.value)
    assert "\n" not in str(error.value)


MATCHES = [
    (dict(kind=DistributedType.FSDP, mixed="bf16"), {**FSDP_ASKED, "ACCELERATE_MIXED_PRECISION": "bf16"}),
    (dict(kind=DistributedType.DEEPSPEED), {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}),
    (dict(mixed="bf16"), {"ACCELERATE_MIXED_PRECISION": "no", "WORLD_SIZE": "2"}),  # "no": accelerate's default
    (dict(kind=DistributedType.NO, n=1), {}),  # plain `python scripts/run_dpo.py`
    (dict(global_batch=64), {"WORLD_SIZE": "2", "ACCELERATE_USE_FSDP": "false"}),
]  # fmt: skip


@pytest.mark.parametrize(("settings", "environ"), MATCHES, ids=lambda x: str(x)[:40])
def test_a_launch_that_runs_as_asked_passes(settings, environ):
    check_launch(simulated(**settings), environ)


# --- a real trainer's accelerator -----------------------------------------------------------------------------------


def real_trainer(tmp_path, tokenizer, **settings):
    torch.manual_seed(0)
    args = DPOConfig(
        str(tmp_path / "run"), per_device_train_batch_size=2, global_batch_size=4, max_steps=1, report_to="none",
        bf16=False, save_strategy="no", **settings,
    )  # fmt: skip
    data = datasets.Dataset.from_list(preference_rows(4))
    return DPOTrainer(tiny_causal_lms()["ours"](), args=args, train_dataset=data, processing_class=tokenizer)


def test_a_real_accelerator_runs_the_launchers_precision(tmp_path, gpt2_tokenizer, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    trainer = real_trainer(tmp_path, gpt2_tokenizer)
    check_launch(trainer, {})
    batch = "effective batch 4 = 2 per device × 1 process × 2 accumulation (from global_batch_size)"
    assert run_line(trainer) == f"engine single process (cpu) · precision fp32 · {batch}"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch --mixed_precision bf16` sets
    trainer = real_trainer(tmp_path, gpt2_tokenizer)
    check_launch(trainer)
    assert run_line(trainer) == f"engine single process (cpu) · precision bf16 autocast (fp32 weights) · {batch}"


def test_processes_that_do_not_form_a_group_are_caught_on_a_real_accelerator(tmp_path, gpt2_tokenizer, monkeypatch):
    """WORLD_SIZE 2 without the process group (no LOCAL_RANK here, as when a launcher's processes cannot join)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    trainer = real_trainer(tmp_path, gpt2_tokenizer)
    assert trainer.accelerator.num_processes == 1
    with pytest.raises(
        ValueError, match="^the launcher started 2 processes .WORLD_SIZE. but accelerate runs 1 process"
    ):
        check_launch(trainer)


@pytest.mark.parametrize(("launcher", "bf16"), [(None, True), ("no", True), ("bf16", True), ("fp16", False)])
def test_the_bf16_default_follows_the_launchers_mixed_precision(monkeypatch, launcher, bf16):
    """On a bf16 GPU the default is bf16, unless the launcher asked for fp16 (which then runs, not bf16)."""
    from alignment.run.machine import machine_defaults

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    if launcher is None:
        monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    else:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launcher)
    assert machine_defaults()["bf16"] is bf16


LAUNCH_LINES = [
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "ACCELERATE_MIXED_PRECISION": "bf16", "WORLD_SIZE": "2"},
     dict(global_batch_size=64),
     "launch: FSDP2 on 2 processes · precision bf16 mixed · effective batch 64 = 8 per device × 2 processes × 4 "
     "accumulation (from global_batch_size)"),
    ({"WORLD_SIZE": "2"}, dict(),
     "launch: DDP on 2 processes · precision fp32 · effective batch 64 = 8 per device × 2 processes × 4 accumulation"),
    ({}, dict(bf16=True, gradient_accumulation_steps=1),
     "launch: single process · precision bf16 mixed · effective batch 8 = 8 per device × 1 process × 1 "
     "accumulation"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3", "WORLD_SIZE": "8"}, dict(fp16=True),
     "launch: DeepSpeed ZeRO-3 on 8 processes · precision fp16 mixed · effective batch 256 = 8 per device × 8 "
     "processes × 4 accumulation"),
]  # fmt: skip


@pytest.mark.parametrize(("environ", "settings", "line"), LAUNCH_LINES, ids=lambda x: str(x)[:40])
def test_the_first_line_states_what_the_launch_asks_for(environ, settings, line):
    from alignment.run.run_line import launch_line

    args = SimpleNamespace(
        per_device_train_batch_size=8, gradient_accumulation_steps=4, global_batch_size=None, bf16=False, fp16=False,
        fsdp=None, deepspeed=None,
    )  # fmt: skip
    for key, value in settings.items():
        setattr(args, key, value)
    assert launch_line(args, environ) == line
