"""DeepSpeed where the launcher asks for it, on machines without GPUs too, or one line saying why it cannot start.

`accelerate launch --config_file accelerate_configs/deepspeed_zero{2,3}.yaml` tells every process what to run through
its environment (ACCELERATE_USE_DEEPSPEED, ACCELERATE_DEEPSPEED_ZERO_STAGE, ACCELERATE_MIXED_PRECISION, WORLD_SIZE).
DeepSpeed runs on CPUs (its CPU accelerator, collectives over gloo), but accelerate 1.15 only gets there on a
machine without GPUs when the training arguments leave `use_cpu` off and name the `ddp_backend`:

* with `use_cpu: true` (the multi-process default on such machines, `alignment.run.machine`), accelerate's state
  never becomes DEEPSPEED and the run trains as plain DDP, without a word;
* with no `ddp_backend`, accelerate initialises DeepSpeed's process group but records no backend, so every process
  believes it is alone (1 process) and trains on its own.

`engine_defaults` gives the settings that make DeepSpeed start (for the machine defaults, which a recipe's own keys
override); `check_engine_request` stops a run in one line where what was asked for cannot start on this machine.
FSDP is not refused anywhere here: it runs on CPU process groups (`alignment.training.sharding`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch

CPU_BACKENDS = ("gloo", "ccl", "mpi")  # what DeepSpeed's CPU accelerator can run its collectives over


def is_true(value: str | None) -> bool:
    return str(value or "").strip().lower() in ("1", "true", "yes")


def deepspeed_requested(args: Any = None, environ: Mapping[str, str] | None = None) -> bool:
    """Whether the launcher (its environment) or the training arguments (`deepspeed`) ask for DeepSpeed."""
    environ = os.environ if environ is None else environ
    return is_true(environ.get("ACCELERATE_USE_DEEPSPEED")) or bool(getattr(args, "deepspeed", None))


def engine_defaults(environ: Mapping[str, str] | None = None, has_gpu: bool | None = None) -> dict[str, Any]:
    """Training-argument defaults that let the requested engine start on this machine: for DeepSpeed without a
    GPU, in a launched process, `use_cpu: false` and `ddp_backend: gloo` (see the module docstring); nothing
    otherwise (a `ddp_backend` outside a launch makes accelerate ask for a process group that does not exist)."""
    environ = os.environ if environ is None else environ
    has_gpu = torch.cuda.is_available() if has_gpu is None else has_gpu
    if deepspeed_requested(environ=environ) and not has_gpu and "LOCAL_RANK" in environ:
        return {"use_cpu": False, "ddp_backend": "gloo"}
    return {}


def check_engine_request(
    args: Any = None, environ: Mapping[str, str] | None = None, has_gpu: bool | None = None
) -> None:
    """Raise ValueError (one line, with the fix) where the engine the launcher or `args` asked for cannot start here.

    `args`: the training arguments (their `use_cpu`, `ddp_backend`, `fp16`), or None to check the environment alone.
    """
    environ = os.environ if environ is None else environ
    if not deepspeed_requested(args, environ):
        return
    if importlib.util.find_spec("deepspeed") is None:
        raise ValueError(
            "the launcher asked for DeepSpeed, which is not installed: pip install deepspeed (or pip install -e "
            "'.[deepspeed]'), or launch with a DDP or FSDP config"
        )
    has_gpu = torch.cuda.is_available() if has_gpu is None else has_gpu
    if has_gpu:
        return
    if getattr(args, "use_cpu", False) or is_true(environ.get("ACCELERATE_USE_CPU")):
        raise ValueError(
            "the launcher asked for DeepSpeed, but use_cpu is set and accelerate then runs plain DDP instead; on a "
            "machine without GPUs set use_cpu: false and ddp_backend: gloo (DeepSpeed runs on CPUs over gloo)"
        )
    world_size = int(environ.get("WORLD_SIZE") or 1)
    backend = getattr(args, "ddp_backend", None) if args is not None else "gloo"
    if world_size > 1 and backend not in CPU_BACKENDS:
        raise ValueError(
            f"the launcher asked for DeepSpeed on {world_size} processes without GPUs, but ddp_backend is {backend}: "
            f"each process would train alone; set ddp_backend: gloo"
        )
    fp16 = str(environ.get("ACCELERATE_MIXED_PRECISION") or "").lower() == "fp16" or getattr(args, "fp16", False)
    if fp16 and not torch.ops.mkldnn._is_mkldnn_fp16_supported():  # what DeepSpeed's CPU accelerator asks
        raise ValueError(
            "the launcher asked for DeepSpeed with fp16, which this CPU does not support; launch with "
            "--mixed_precision bf16 or no"
        )


@contextlib.contextmanager
def whole_weights_loading() -> Iterator[None]:
    """Models loaded inside it load whole on this process, even in a ZeRO-3 run. Under ZeRO-3 transformers builds
    every model it loads inside `deepspeed.zero.Init`, whose partitioning is a collective, so a model loaded by one
    process alone (the main process rereading the saved model to write it in the stock format) would wait for the
    others forever. Its partitioning is switched off inside and restored after."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved
