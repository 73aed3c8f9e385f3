"""FSDP on CPU process groups: the sharding the launcher asked for, on machines without GPUs too.

accelerate 1.15 builds an FSDP plugin from the launcher's settings (`ACCELERATE_USE_FSDP`, `FSDP_*`) or from
`fsdp`/`fsdp_config`, but its state keeps the plugin only for GPU-like process groups. Several processes on a
machine without GPUs need `use_cpu` (see `alignment.run.machine`), the state then says MULTI_CPU, the plugin is
dropped, and the run trains as plain DDP without a word. torch's FSDP2 (`fully_shard`) runs over gloo on CPU, so
`shard_on_cpu` puts the plugin back and marks the state FSDP, right after the Trainer has built its accelerator
and before anything is prepared: the model, the optimizer and TRL's reference model are then sharded exactly as
on GPUs. FSDP version 1 needs a device per process and is refused on CPU with one line.

`ShardingMixin` does this inside both trainers, so a run from a script, `accelerate launch` or Python gets it.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from accelerate import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

logger = logging.getLogger(__name__)


def fsdp_requested(args: Any) -> bool:
    """Whether the launcher (its environment) or the training arguments ask for FSDP."""
    from_launcher = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    return from_launcher or getattr(args, "fsdp_plugin_args", None) is not None


def shard_on_cpu(accelerator: Any, args: Any) -> bool:
    """Make a CPU process group run the FSDP the launcher or `args` asked for; True when it did.

    Raises ValueError for FSDP version 1, which torch runs only with a device per process."""
    state = accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU or not fsdp_requested(args):
        return False
    if args.fsdp_plugin_args is not None:  # as transformers builds it from `fsdp_config`
        plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
    else:  # as accelerate builds it from the launcher's FSDP_* variables
        plugin = FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        raise ValueError(
            "FSDP version 1 does not run on CPU process groups (it needs a GPU per process); set fsdp_version: 2 "
            "in the accelerate config (accelerate_configs/fsdp.yaml does)"
        )
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as AcceleratorState records it
    return True


class ShardingMixin:
    """Trainer mixin: FSDP on CPU process groups (see the module docstring); nothing changes elsewhere."""

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        if shard_on_cpu(self.accelerator, self.args):
            self.is_fsdp_enabled = True
            plugin = self.accelerator.state.fsdp_plugin
            if plugin.activation_checkpointing and self.args.activation_checkpointing:  # transformers' own check
                raise ValueError(
                    "fsdp_activation_checkpointing and the activation_checkpointing training argument are both on; "
                    "keep FSDP's (set activation_checkpointing: false)"
                )
            logger.info("FSDP2 on %d CPU processes (gloo)", self.accelerator.num_processes)
