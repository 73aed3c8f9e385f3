"""Defaults that depend on the machine a run starts on, decided once, in run setup, before the configs are built.

* bf16: TRL turns it on when unset, which fails without a bf16 GPU; the default here is bf16 only where a bf16 GPU
  is (and neither the recipe nor the launcher's mixed_precision asked for fp16 or fp8), fp32 elsewhere.
* use_cpu: accelerate's multi-GPU launcher, which is how several processes start on a machine without GPUs, does
  not pass `use_cpu` on to them; without it they never join one process group and each trains alone. DeepSpeed is
  the exception: accelerate runs it only without `use_cpu`, over gloo (`alignment.run.engine.engine_defaults`).

A recipe or command line that sets either key wins over these defaults.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from typing import Any

import torch

from .engine import engine_defaults


def machine_defaults(explicit_keys: Collection[str] = ()) -> dict[str, Any]:
    """Parser defaults for this machine; `explicit_keys` are the settings the user gave (they are left alone)."""
    has_bf16_gpu = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    launcher_asks_other = os.environ.get("ACCELERATE_MIXED_PRECISION", "no") in ("fp16", "fp8")  # it is honoured
    defaults: dict[str, Any] = {"bf16": has_bf16_gpu and "fp16" not in explicit_keys and not launcher_asks_other}
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        defaults["use_cpu"] = True
    defaults.update(engine_defaults())  # DeepSpeed without GPUs: use_cpu off, gloo (see alignment.run.engine)
    return {key: value for key, value in defaults.items() if key not in explicit_keys}
