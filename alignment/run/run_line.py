"""No silent fallback: what the launcher asked for is what trains, and the first line of training says what that is.

`check_launch` compares the launch request (the environment `accelerate launch` / torchrun give each process:
ACCELERATE_USE_FSDP, FSDP_VERSION, ACCELERATE_USE_DEEPSPEED, ACCELERATE_DEEPSPEED_ZERO_STAGE,
ACCELERATE_MIXED_PRECISION, WORLD_SIZE; and the training config's own `fsdp` / `deepspeed`) with the accelerator the
trainer built, and stops the run in one line where they differ: accelerate drops an FSDP plugin it cannot use, and
processes that fail to form one group each train alone, without an error of their own.

`launch_line` is the run's first line, logged before anything loads, from the request and the config; `check_launch`
then guarantees it is what trains. `run_line` says the same from the built trainer, with the details it knows:

    launch: DDP on 2 processes · precision fp32 · effective batch 64 = 8 per device × 2 processes × 4 accumulation
    engine DDP (2 processes, gloo, cpu) · precision fp32 · effective batch 64 = 8 per device × 2 processes × 4 accumulation
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from accelerate.utils import DistributedType

PRECISIONS = ("fp16", "bf16", "fp8")  # a launcher's "no" is accelerate's default, not a request: it is not enforced
DTYPE_NAMES = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}


def processes(n: int) -> str:
    return f"{n} process{'es' if n != 1 else ''}"


def is_true(value: str | None) -> bool:
    return str(value or "").strip().lower() in ("1", "true", "yes")


def engine_name(state: Any) -> str:
    """FSDP2, DeepSpeed ZeRO-3, DDP or single process, from an `accelerate` state."""
    kind = state.distributed_type
    if kind == DistributedType.FSDP:
        plugin = getattr(state, "fsdp_plugin", None)
        return f"FSDP{getattr(plugin, 'fsdp_version', '')}"
    if kind == DistributedType.DEEPSPEED:
        plugin = getattr(state, "deepspeed_plugin", None)
        stage = getattr(plugin, "zero_stage", None)
        return "DeepSpeed" + (f" ZeRO-{stage}" if stage is not None else "")
    if kind == DistributedType.NO:
        return "single process"
    if str(kind.value).startswith("MULTI_"):
        return "DDP"
    return str(kind.value)


def weight_dtypes(model: Any) -> str:
    """The dtypes the model's parameters are held in, most elements first ("fp32", "bf16+fp32")."""
    counts: dict[str, int] = {}
    for parameter in model.parameters() if model is not None else ():
        name = DTYPE_NAMES.get(str(parameter.dtype), str(parameter.dtype).removeprefix("torch."))
        counts[name] = counts.get(name, 0) + parameter.numel()
    return "+".join(sorted(counts, key=lambda name: -counts[name])) or "unknown"


def precision_text(state: Any, model: Any) -> str:
    weights = weight_dtypes(model)
    mixed = str(getattr(state, "mixed_precision", "no") or "no")
    if mixed == "no":
        return f"precision {weights}" if weights == "fp32" else f"precision {weights} weights, no mixed precision"
    how = "mixed" if state.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED) else "autocast"
    return f"precision {mixed} {how} ({weights} weights)"


def effective_batch(trainer: Any) -> tuple[int, str]:
    """Rows per optimizer step over all processes, and how it is made up."""
    args = trainer.args
    n = trainer.accelerator.state.num_processes
    per_device, accumulation = args.per_device_train_batch_size, args.gradient_accumulation_steps
    if getattr(trainer.accelerator, "split_batches", False):  # each batch is split over the processes
        return (
            per_device * accumulation,
            f"{per_device} per step split over {processes(n)} × {accumulation} accumulation",
        )
    return per_device * n * accumulation, f"{per_device} per device × {processes(n)} × {accumulation} accumulation"


def run_line(trainer: Any) -> str:
    """The one line saying how this run trains: engine, world size, precision, effective batch."""
    state = trainer.accelerator.state
    device = getattr(getattr(state, "device", None), "type", None)
    details = (processes(state.num_processes), getattr(state, "backend", None), device)
    if state.distributed_type == DistributedType.NO:  # "single process (cpu)"
        details = (device,)
    engine = f"engine {engine_name(state)} ({', '.join(str(x) for x in details if x)})"
    total, made_of = effective_batch(trainer)
    batch = f"effective batch {total} = {made_of}"
    if getattr(trainer.args, "global_batch_size", None) is not None:
        batch += " (from global_batch_size)"
    return " · ".join((engine, precision_text(state, trainer.model), batch))


def requested(args: Any, environ: Mapping[str, str]) -> dict[str, Any]:
    """What the launch asked for: engine ("FSDP", "DeepSpeed" or None), its version/stage, precision, processes."""
    fsdp = is_true(environ.get("ACCELERATE_USE_FSDP")) or bool(getattr(args, "fsdp", None))
    deepspeed = is_true(environ.get("ACCELERATE_USE_DEEPSPEED")) or bool(getattr(args, "deepspeed", None))
    precision = str(environ.get("ACCELERATE_MIXED_PRECISION") or "no").lower()
    world = environ.get("WORLD_SIZE")
    return {
        "engine": "DeepSpeed" if deepspeed else "FSDP" if fsdp else None,
        "fsdp_version": environ.get("FSDP_VERSION") if fsdp else None,
        "zero_stage": environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") if deepspeed else None,
        "precision": precision if precision in PRECISIONS else None,
        "processes": int(world) if world else None,
    }


def launch_line(args: Any, environ: Mapping[str, str] | None = None) -> str:
    """The first line of a run, before the model and data load: the engine, processes, precision and effective
    batch this launch asks for (`check_launch` stops the run later if the accelerator runs anything else)."""
    asked = requested(args, os.environ if environ is None else environ)
    n = asked["processes"] or 1
    if asked["engine"] == "FSDP":
        engine = f"FSDP{asked['fsdp_version'] or ''}"
    elif asked["engine"] == "DeepSpeed":
        engine = "DeepSpeed" + (f" ZeRO-{asked['zero_stage']}" if asked["zero_stage"] else "")
    else:
        engine = "DDP" if n > 1 else "single process"
    recipe_precision = "bf16" if getattr(args, "bf16", False) else "fp16" if getattr(args, "fp16", False) else None
    precision = recipe_precision or asked["precision"]
    per_device, accumulation = args.per_device_train_batch_size, args.gradient_accumulation_steps
    batch = f"effective batch {per_device * n * accumulation} = {per_device} per device × {processes(n)} × {accumulation} accumulation"
    if getattr(args, "global_batch_size", None) is not None:
        batch += " (from global_batch_size)"
    return " · ".join(
        (
            f"launch: {engine}" + (f" on {processes(n)}" if n > 1 else ""),
            f"precision {precision + ' mixed' if precision else 'fp32'}",
            batch,
        )
    )


def check_launch(trainer: Any, environ: Mapping[str, str] | None = None) -> None:
    """Raise ValueError (one line) where the accelerator runs something other than what the launch asked for."""
    environ = os.environ if environ is None else environ
    args, state = trainer.args, trainer.accelerator.state
    asked = requested(args, environ)
    running = engine_name(state)
    on_cpu = bool(getattr(args, "use_cpu", False))
    if asked["engine"] == "FSDP" and state.distributed_type != DistributedType.FSDP:
        hint = " (accelerate drops the FSDP plugin when use_cpu is set, as on CPU process groups)" if on_cpu else ""
        raise ValueError(
            f"the launcher asked for FSDP but accelerate runs {running}{hint}; no sharding would happen, so the run "
            "stops: launch with a DDP config (accelerate_configs/multi_gpu.yaml, cpu_2proc.yaml) or where FSDP runs"
        )
    if asked["engine"] == "DeepSpeed" and state.distributed_type != DistributedType.DEEPSPEED:
        raise ValueError(
            f"the launcher asked for DeepSpeed but accelerate runs {running}; launch with a DDP or FSDP config instead"
        )
    if asked["engine"] is None and state.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise ValueError(f"accelerate runs {running} though the launcher asked for no sharding engine")
    version = getattr(getattr(state, "fsdp_plugin", None), "fsdp_version", None)
    if asked["fsdp_version"] and version is not None and str(version) != str(asked["fsdp_version"]):
        raise ValueError(f"the launcher asked for FSDP version {asked['fsdp_version']} but accelerate runs {running}")
    stage = getattr(getattr(state, "deepspeed_plugin", None), "zero_stage", None)
    if asked["zero_stage"] and stage is not None and str(stage) != str(asked["zero_stage"]):
        raise ValueError(f"the launcher asked for DeepSpeed ZeRO-{asked['zero_stage']} but accelerate runs {running}")
    mixed = str(getattr(state, "mixed_precision", "no") or "no")
    if asked["precision"] is not None and mixed != asked["precision"]:
        raise ValueError(
            f"the launcher asked for {asked['precision']} mixed precision but the run uses "
            f"{mixed if mixed != 'no' else 'none'} (the recipe's "
            f"bf16/fp16); make them agree: set {asked['precision']}: true in the recipe, or launch with "
            f"--mixed_precision {mixed}"
        )
    if asked["processes"] is not None and asked["processes"] != state.num_processes:
        hint = " (on a machine without GPUs the processes need use_cpu: true)" if not on_cpu else ""
        raise ValueError(
            f"the launcher started {processes(asked['processes'])} (WORLD_SIZE) but accelerate runs "
            f"{processes(state.num_processes)}{hint}: each would train alone"
        )
    total, made_of = effective_batch(trainer)
    global_batch = getattr(args, "global_batch_size", None)
    if global_batch is not None and total != global_batch:
        raise ValueError(f"global_batch_size {global_batch}, but this run trains with {total} = {made_of}")
