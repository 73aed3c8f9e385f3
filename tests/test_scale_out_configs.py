"""The shipped FSDP and multi-node configs as accelerate reads them, the wrap policy they give each architecture,
the CPU-group promotion's refusals, and the SLURM example's launch lines (with stand-ins for srun and accelerate)."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

from alignment import AlignmentGPT2Config, AlignmentGPT2ForCausalLM
from alignment.training.sharding import fsdp_requested, shard_on_cpu

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["fsdp.yaml", "multi_node.yaml"])
def test_fsdp_configs_are_fsdp2_with_the_models_own_wrap_classes(name):
    config = load_config_from_file(str(REPO / "accelerate_configs" / name))
    assert config.distributed_type == DistributedType.FSDP
    assert str(config.fsdp_config["fsdp_version"]) == "2"
    assert config.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert "fsdp_transformer_layer_cls_to_wrap" not in config.fsdp_config  # follows `_no_split_modules`
    assert config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # the final save is one whole file
    if name == "multi_node.yaml":
        assert config.num_machines == 2 and config.num_processes == 16 and config.main_process_port == 29500


def wrapped_classes(model: torch.nn.Module) -> set[str]:
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
    plugin.set_auto_wrap_policy(model)
    return set(plugin.transformer_cls_names_to_wrap)


def test_the_wrap_policy_follows_each_architecture():
    ours = AlignmentGPT2ForCausalLM(AlignmentGPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    )
    llama = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
        )
    )
    assert wrapped_classes(ours) == {"Block"}
    assert wrapped_classes(gpt2) == {"GPT2Block"}
    assert wrapped_classes(llama) == {"LlamaDecoderLayer"}


class FakeState(SimpleNamespace):
    pass


def fake_accelerator(distributed_type, mixed_precision="no"):
    return SimpleNamespace(state=FakeState(distributed_type=distributed_type, mixed_precision=mixed_precision))


def test_promotion_happens_only_for_fsdp_asked_on_a_cpu_group(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    args = SimpleNamespace(fsdp_plugin_args=None)
    assert not fsdp_requested(args)
    assert not shard_on_cpu(fake_accelerator(DistributedType.MULTI_CPU), args)  # plain DDP stays DDP
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert not shard_on_cpu(fake_accelerator(DistributedType.NO), args)  # one process: nothing to shard
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ValueError, match="FSDP version 1 does not run on CPU process groups"):
        shard_on_cpu(fake_accelerator(DistributedType.MULTI_CPU), args)


def test_promotion_keeps_the_launchers_precision(monkeypatch):
    from accelerate import PartialState

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setitem(PartialState._shared_state, "distributed_type", DistributedType.MULTI_CPU)
    accelerator = fake_accelerator(DistributedType.MULTI_CPU, mixed_precision="bf16")
    assert shard_on_cpu(accelerator, SimpleNamespace(fsdp_plugin_args=None))
    assert accelerator.state.distributed_type == DistributedType.FSDP
    assert accelerator.state.fsdp_plugin.fsdp_version == 2
    assert accelerator.state.fsdp_plugin.mixed_precision_policy.param_dtype == torch.bfloat16


def fake_command(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/bin/bash\n" + body, encoding="utf-8")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_slurm_example_launches_one_accelerate_per_machine(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # more names than a pipe holds after the two machines: a script reading only the first would kill scontrol with
    # SIGPIPE, which pipefail turns into a failed job (with `head -n 1` it did, now and then, even with two names)
    fake_command(bin_dir, "scontrol", 'printf "node-a\\nnode-b\\n"\nseq -f "spare-%g" 20000\n')
    # srun runs its command once per machine, as SLURM would, with that machine's SLURM_NODEID
    fake_command(bin_dir, "srun", 'shift\nfor id in 0 1; do SLURM_NODEID=$id "$@"; done\n')
    fake_command(bin_dir, "accelerate", f'echo "$@" >> {tmp_path}/launches.txt\n')
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "SLURM_JOB_NODELIST": "node-[a-b]",
        "SLURM_NNODES": "2",
        "SLURM_GPUS_ON_NODE": "4",
    }
    script = REPO / "examples" / "slurm" / "dpo_multi_node.sbatch"
    subprocess.run(["bash", str(script), "recipes/gpt2_hh.yaml", "--beta=0.2"], check=True, env=env, cwd=REPO)
    launches = (tmp_path / "launches.txt").read_text().splitlines()
    assert len(launches) == 2
    for rank, line in enumerate(launches):
        assert f"--machine_rank {rank} " in line, line
        assert "--num_machines 2 --num_processes 8 " in line, line
        assert "--main_process_ip node-a " in line, line
        assert line.endswith("scripts/run_dpo.py recipes/gpt2_hh.yaml --beta=0.2"), line
