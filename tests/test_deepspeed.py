"""DeepSpeed ZeRO-2 and ZeRO-3: the shipped accelerate configs, the engine check, the DPO reference under ZeRO-3's
partitioned weights, and two-process DPO runs on CPU process groups against one process doing the same work.

DeepSpeed runs on CPUs (its CPU accelerator, collectives over gloo) when the training arguments say `use_cpu: false`
and `ddp_backend: gloo` (`alignment.run.engine`), so the runs here are launched as users launch them:

    accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml --num_processes 2 \\
        --mixed_precision no scripts/run_dpo.py RECIPE.yaml
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from safetensors.torch import load_file

from alignment import AlignmentGPT2Config, AlignmentGPT2ForCausalLM
from alignment.run.engine import check_engine_request, engine_defaults, whole_weights_loading
from alignment.training.dpo import first_difference, starting_reference, weights_partitioned
from tests.conftest import TINY
from tests.distributed_runs import CONFIGS, REPO, environment, free_port, write_recipe

ZERO_CONFIGS = {2: CONFIGS / "deepspeed_zero2.yaml", 3: CONFIGS / "deepspeed_zero3.yaml"}


# --- the shipped configs, as accelerate's launcher reads them ----------------------------------------------------


def launch_environment(config: Path, *extra: str) -> dict[str, str]:
    """The environment `accelerate launch --config_file CONFIG` gives every process (accelerate's own parsing)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    parser = launch_command_parser()
    args = parser.parse_args(["--config_file", str(config), *extra, "train.py"])
    args, defaults, mixed_precision_from_config = _validate_launch_command(args)
    assert args.use_deepspeed and not args.cpu  # accelerate's launch_command then takes its DeepSpeed launcher
    fields = list(defaults.deepspeed_config) + ["mixed_precision"] * bool(mixed_precision_from_config)
    args.deepspeed_fields_from_accelerate_config = ",".join(fields)  # as launch_command sets it
    _, env = prepare_deepspeed_cmd_env(args)
    return env


@pytest.mark.parametrize("stage", [2, 3])
def test_shipped_deepspeed_configs_parse_into_accelerates_plugin(stage, monkeypatch):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DeepSpeedPlugin

    stated = load_config_from_file(str(ZERO_CONFIGS[stage])).deepspeed_config
    assert stated["zero_stage"] == stage
    env = launch_environment(ZERO_CONFIGS[stage], "--num_processes", "2")
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true" and env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    assert env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == str(stage)
    for key in [k for k in env if k.startswith("ACCELERATE_")]:
        monkeypatch.setenv(key, env[key])
    plugin = DeepSpeedPlugin()  # as accelerate's Accelerator builds it in every process
    plugin.set_mixed_precision(env["ACCELERATE_MIXED_PRECISION"])
    zero = plugin.deepspeed_config["zero_optimization"]
    assert plugin.zero_stage == zero["stage"] == stage
    assert zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "none"
    assert plugin.zero3_init_flag is (stage == 3) is stated["zero3_init_flag"]
    assert plugin.deepspeed_config["bf16"]["enabled"] is True
    if stage == 3:
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True  # a whole model.safetensors at the end
    # the configs' --mixed_precision no (the CPU runs below) turns bf16 off
    assert launch_environment(ZERO_CONFIGS[stage], "--mixed_precision", "no")["ACCELERATE_MIXED_PRECISION"] == "no"


# --- what the launcher asked for, against this machine ------------------------------------------------------------


ASKS_DEEPSPEED = {
    "ACCELERATE_USE_DEEPSPEED": "true",
    "WORLD_SIZE": "2",
    "LOCAL_RANK": "0",
    "ACCELERATE_MIXED_PRECISION": "no",
}


class Args:
    def __init__(self, **fields):
        self.use_cpu, self.ddp_backend, self.fp16, self.deepspeed = False, "gloo", False, None
        self.__dict__.update(fields)


def test_engine_defaults_let_deepspeed_start_without_a_gpu():
    assert engine_defaults(ASKS_DEEPSPEED, has_gpu=False) == {"use_cpu": False, "ddp_backend": "gloo"}
    assert engine_defaults(ASKS_DEEPSPEED, has_gpu=True) == {}
    assert engine_defaults({"ACCELERATE_USE_FSDP": "true", "WORLD_SIZE": "2"}, has_gpu=False) == {}
    not_launched = {k: v for k, v in ASKS_DEEPSPEED.items() if k != "LOCAL_RANK"}
    assert engine_defaults(not_launched, has_gpu=False) == {}  # no process group: a ddp_backend would break it
    check_engine_request(Args(), ASKS_DEEPSPEED, has_gpu=False)  # the defaults start it: nothing raised


@pytest.mark.parametrize(
    "args, environ, message",
    [
        (Args(use_cpu=True), ASKS_DEEPSPEED, r"use_cpu is set and accelerate then runs plain DDP.*use_cpu: false"),
        (Args(), {**ASKS_DEEPSPEED, "ACCELERATE_USE_CPU": "true"}, r"use_cpu is set"),
        (Args(ddp_backend=None), ASKS_DEEPSPEED, r"ddp_backend is None: each process would train alone"),
        (Args(fp16=True), ASKS_DEEPSPEED, r"fp16, which this CPU does not support"),
    ],
)
def test_deepspeed_that_cannot_start_here_stops_in_one_line(args, environ, message, monkeypatch):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_fp16_supported", lambda: False)
    with pytest.raises(ValueError, match=message) as error:
        check_engine_request(args, environ, has_gpu=False)
    assert "\n" not in str(error.value)
    check_engine_request(args, environ, has_gpu=True)  # on a GPU machine all of these start


def test_missing_deepspeed_and_what_is_never_refused(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "deepspeed" else find_spec(name))
    with pytest.raises(ValueError, match=r"DeepSpeed, which is not installed: pip install deepspeed"):
        check_engine_request(Args(), ASKS_DEEPSPEED, has_gpu=True)
    # FSDP on CPU process groups, DDP, and a run from a script are not DeepSpeed's business
    for environ in ({"ACCELERATE_USE_FSDP": "true", "WORLD_SIZE": "2"}, {"WORLD_SIZE": "2"}, {}):
        check_engine_request(Args(use_cpu=True, ddp_backend=None), environ, has_gpu=False)


def test_whole_weights_loading_lifts_zero3_inside_only(saved_policy):
    from transformers.integrations import HfDeepSpeedConfig, is_deepspeed_zero3_enabled

    config = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
    try:
        assert is_deepspeed_zero3_enabled()  # from_pretrained would partition inside zero.Init, a collective
        with whole_weights_loading():
            assert not is_deepspeed_zero3_enabled()
            model = transformers.GPT2LMHeadModel.from_pretrained(saved_policy)
            assert not weights_partitioned(model)
        assert is_deepspeed_zero3_enabled()
    finally:
        del config  # the weak reference transformers keeps dies with it


# --- the DPO reference when the policy's weights are partitioned ----------------------------------------------------


class DPOArgs:
    """What `starting_reference` reads of a DPOConfig, on one process."""

    def __init__(self, **model_init_kwargs):
        from accelerate.utils import DistributedType

        self.model_init_kwargs = model_init_kwargs or None
        self.trust_remote_code = False
        self.distributed_state = type("State", (), {"distributed_type": DistributedType.NO})()


@pytest.fixture
def saved_policy(tmp_path):
    torch.manual_seed(0)
    config = transformers.GPT2Config(**TINY, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "policy")
    return tmp_path / "policy"


def zero3_placeholders(model: torch.nn.Module, rank: int = 0, world_size: int = 2) -> torch.nn.Module:
    """The policy as `deepspeed.zero.Init` leaves it on one process: every parameter an empty placeholder carrying
    `ds_id`, `ds_shape`, `ds_numel` and this process's flat, padded slice in `ds_tensor`."""
    for index, (_, parameter) in enumerate(model.named_parameters()):
        flat = parameter.detach().flatten()
        part = -(-flat.numel() // world_size)
        padded = torch.cat([flat, flat.new_zeros(part * world_size - flat.numel())])
        parameter.ds_id, parameter.ds_shape, parameter.ds_numel = index, parameter.shape, flat.numel()
        parameter.ds_tensor = padded[rank * part : (rank + 1) * part].clone()
        parameter.data = parameter.data.new_empty(0)
    return model


def fsdp_meta(model: torch.nn.Module) -> torch.nn.Module:
    """The policy as FSDP's cpu_ram_efficient_loading leaves it on the processes after the first: built on the meta
    device (its tied weights tied), its config the loaded one."""
    with torch.device("meta"):
        return type(model)(model.config)


def test_whole_weights_are_copied(saved_policy):
    policy = transformers.GPT2LMHeadModel.from_pretrained(saved_policy)
    assert not weights_partitioned(policy)
    reference = starting_reference(policy, DPOArgs())
    assert reference is not policy and not reference.training
    for (name, p), r in zip(policy.named_parameters(), reference.parameters()):
        assert torch.equal(p, r) and p.data_ptr() != r.data_ptr() and not r.requires_grad, name


@pytest.mark.parametrize("partition", [zero3_placeholders, fsdp_meta])
def test_partitioned_weights_are_reloaded_from_the_policys_folder(saved_policy, partition, monkeypatch):
    import alignment.training.dpo as dpo

    calls = []
    create = dpo.create_model_from_path
    monkeypatch.setattr(dpo, "create_model_from_path", lambda *a, **k: calls.append((a, k)) or create(*a, **k))
    policy = partition(transformers.GPT2LMHeadModel.from_pretrained(saved_policy, attn_implementation="eager"))
    assert weights_partitioned(policy)
    assert all(p.numel() == 0 or p.is_meta for p in policy.parameters())  # a deepcopy would copy no weights

    reference = starting_reference(policy, DPOArgs(revision="main"))
    (path,), kwargs = calls[0]
    assert path == str(saved_policy) and kwargs["architecture"] is transformers.GPT2LMHeadModel
    assert kwargs["dtype"] == torch.float32 and kwargs["attn_implementation"] == "eager"
    assert kwargs["revision"] == "main"  # model_init_kwargs, as TRL passes them
    saved = load_file(saved_policy / "model.safetensors")
    weights = reference.state_dict()
    assert saved.keys() <= weights.keys()
    for name, tensor in saved.items():
        assert torch.equal(weights[name], tensor), name
    assert not reference.training and not any(p.requires_grad for p in reference.parameters())


@pytest.mark.parametrize("partition", [zero3_placeholders, fsdp_meta])
def test_a_partitioned_policy_without_a_folder_stops_in_one_line(partition):
    torch.manual_seed(0)
    policy = partition(transformers.GPT2LMHeadModel(transformers.GPT2Config(**TINY)))
    policy.config._name_or_path = ""  # built from a config in memory
    with pytest.raises(ValueError, match=r"no folder or Hub id to reload them from; load the model from a saved"):
        starting_reference(policy, DPOArgs())


def test_a_reload_that_is_not_the_policy_is_refused(saved_policy):
    torch.manual_seed(1)  # random weights of the same shapes, claiming the folder as their origin
    policy = transformers.GPT2LMHeadModel(transformers.GPT2Config(**TINY, embd_pdrop=0.0))
    policy.config._name_or_path = str(saved_policy)
    with pytest.raises(ValueError, match=r"is not the starting policy \(transformer\.wte\.weight holds other values"):
        starting_reference(zero3_placeholders(policy), DPOArgs())
    resized = transformers.GPT2LMHeadModel.from_pretrained(saved_policy)
    resized.resize_token_embeddings(TINY["vocab_size"] + 3)  # e.g. a chat template's new tokens
    with pytest.raises(ValueError, match=r"transformer\.wte\.weight is \(97, 32\) torch\.float32, not \(100, 32\)"):
        starting_reference(fsdp_meta(resized), DPOArgs())
    # both partitioned (as under a real zero.Init): this process's partitions are compared
    policy, reloaded = (transformers.GPT2LMHeadModel.from_pretrained(saved_policy) for _ in range(2))
    assert first_difference(zero3_placeholders(policy, rank=1), zero3_placeholders(reloaded, rank=1)) is None
    reloaded.transformer.h[1].mlp.c_proj.bias.ds_tensor[-1] += 1.0
    assert first_difference(policy, reloaded) == "transformer.h.1.mlp.c_proj.bias holds other values"


# --- two-process ZeRO-2 and ZeRO-3 DPO on CPU process groups --------------------------------------------------------

WRAPPER = """
import json, sys

import torch.distributed as dist

import alignment.run.pipeline as pipeline
import alignment.training.dpo as dpo

seen = {}
starting_reference, train_and_save = dpo.starting_reference, pipeline.train_and_save


def spy(model, args):  # how the reference was made, from what
    seen["policy_partitioned"] = dpo.weights_partitioned(model)
    reference = starting_reference(model, args)
    seen["reference_partitioned"] = dpo.weights_partitioned(reference)
    return reference


def capture(trainer, *args, **kwargs):
    seen["trainer"], seen["steps_run"] = trainer, 0
    training_step = trainer.training_step

    def counted(*args, **kwargs):  # the steps this launch trains (a resumed run: those after its checkpoint)
        seen["steps_run"] += 1
        return training_step(*args, **kwargs)

    trainer.training_step = counted
    return train_and_save(trainer, *args, **kwargs)


def held(module):  # elements of each parameter this rank holds, and the parameter's full size
    return {
        name: [p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel(), int(getattr(p, "ds_numel", p.numel()))]
        for name, p in module.named_parameters()
    }


dpo.starting_reference, pipeline.train_and_save = spy, capture
output_dir = pipeline.run_dpo(sys.argv[1:])
trainer = seen.pop("trainer")
engine, optimizer = trainer.model_wrapped, trainer.model_wrapped.optimizer
partitions = getattr(optimizer, "single_partition_of_fp32_groups", None) or optimizer.fp32_partitioned_groups_flat
info = {
    "world_size": dist.get_world_size() if dist.is_initialized() else 1,
    "backend": dist.get_backend() if dist.is_initialized() else None,
    "distributed_type": str(trainer.accelerator.distributed_type),
    "zero_stage": trainer.accelerator.state.deepspeed_plugin.zero_stage,
    "engine": type(engine).__name__,
    "reference_engine": type(trainer.ref_model).__name__,
    "policy": held(engine.module),
    "reference": held(trainer.ref_model.module),
    "optimizer_elements": sum(t.numel() for t in partitions),  # this rank's fp32 master weights (Adam's state alike)
    "global_step": trainer.state.global_step,
    "log_history": trainer.state.log_history,
    **seen,
}
rank = dist.get_rank() if dist.is_initialized() else 0
(output_dir / f"rank{rank}.json").write_text(json.dumps(info))
"""
ONE_PROCESS = """
import json, sys

import alignment.run.pipeline as pipeline

seen = {}
train_and_save = pipeline.train_and_save
pipeline.train_and_save = lambda trainer, *a, **k: seen.setdefault("trainer", trainer) and train_and_save(trainer, *a, **k)
output_dir = pipeline.run_dpo(sys.argv[1:])
state = seen["trainer"].state
(output_dir / "rank0.json").write_text(json.dumps({"log_history": state.log_history, "global_step": state.global_step}))
"""


def launch(tmp_path: Path, script: str, recipe: Path, *args: str, stage: int | None = None) -> None:
    """The script on one process, or on two under `accelerate launch` with the ZeRO-`stage` config, to the end."""
    path = tmp_path / f"{'one' if stage is None else 'zero'}.py"
    path.write_text(script, encoding="utf-8")
    command = [sys.executable, str(path), str(recipe), *args]
    if stage is not None:  # DeepSpeed on CPUs: what `alignment.run.engine.engine_defaults` gives such a launch
        command += ["--use_cpu=false", "--ddp_backend=gloo"]
        launcher = ["--config_file", str(ZERO_CONFIGS[stage]), "--num_processes", "2", "--mixed_precision", "no"]
        command[1:1] = ["-m", "accelerate.commands.launch", *launcher, "--main_process_port", str(free_port())]
    run = subprocess.run(command, cwd=REPO, env=environment(tmp_path), capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, f"launch failed ({run.returncode}):\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}"


def ranks(output_dir: Path, n: int = 2) -> list[dict]:
    return [json.loads((output_dir / f"rank{rank}.json").read_text()) for rank in range(n)]


def losses(info: dict) -> list[float]:
    return [entry["loss"] for entry in info["log_history"] if "loss" in entry]


def assert_same_weights(actual: Path, expected: Path, atol: float, tied_copy: bool = False) -> None:
    """The saved models hold the same weights; `tied_copy`: `actual` may also hold the tied output embedding written
    out as a copy of the input one (what ZeRO-2's save does; loading ties them again)."""
    actual, expected = load_file(actual / "model.safetensors"), load_file(expected / "model.safetensors")
    if tied_copy and "lm_head.weight" in actual and "lm_head.weight" not in expected:  # our format's save
        assert torch.equal(actual.pop("lm_head.weight"), actual["transformer.wte.weight"])
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert actual[name].shape == tensor.shape, name
        assert torch.allclose(actual[name], tensor, atol=atol, rtol=0), f"{name}: {(actual[name] - tensor).abs().max()}"


@pytest.fixture(scope="module")
def deepspeed_runs(tmp_path_factory, gpt2_tokenizer):
    """Our tiny GPT-2 saved in its own format (loaded by from_pretrained, so ZeRO-3's zero3_init_flag builds it
    partitioned; an official-format GPT-2 is converted in memory and loads whole), trained 4 DPO steps of 4 pairs:
    on one process, and on two (2 pairs each) under ZeRO-3 with checkpoints at steps 2 and 4. gpt2_tokenizer builds
    the offline tokenizer cache first, so the ranks only read it."""
    pytest.importorskip("deepspeed")
    tmp_path = tmp_path_factory.mktemp("deepspeed")
    torch.manual_seed(0)
    config = AlignmentGPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    AlignmentGPT2ForCausalLM(config).save_pretrained(tmp_path / "start")
    recipe = yaml.safe_load(write_recipe(tmp_path).read_text())
    del recipe["model_config"], recipe["model_config_overrides"]
    # the default save format: the stock export rereads the model on the main process alone, which ZeRO-3 would
    # partition collectively (a hang) but for engine.whole_weights_loading in pipeline.save_in_stock_format
    recipe.update(model_name_or_path=str(tmp_path / "start"))
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    one, zero3 = tmp_path / "one", tmp_path / "zero3"
    launch(tmp_path, ONE_PROCESS, tmp_path / "recipe.yaml", f"--output_dir={one}", "--per_device_train_batch_size=4")
    save = ["--save_strategy=steps", "--save_steps=2"]
    launch(tmp_path, WRAPPER, tmp_path / "recipe.yaml", f"--output_dir={zero3}", "--per_device_train_batch_size=2",
           *save, stage=3)  # fmt: skip
    return tmp_path, one, zero3


@pytest.mark.slow
def test_zero3_dpo_partitions_policy_and_reference_and_matches_one_process(deepspeed_runs):
    _, one, zero3 = deepspeed_runs
    infos = ranks(zero3)
    for info in infos:
        assert info["world_size"] == 2 and info["backend"] == "gloo", info
        assert info["distributed_type"] == "DistributedType.DEEPSPEED" and info["zero_stage"] == 3
        assert info["engine"] == info["reference_engine"] == "DeepSpeedEngine"  # TRL's prepare_deepspeed
        assert info["policy_partitioned"] and info["reference_partitioned"]  # zero.Init: reloaded, not copied
        for what in ("policy", "reference"):
            for name, (local, full) in info[what].items():
                assert local == -(-full // 2), f"{what} {name}: rank holds {local} of {full}"  # half, padded
    expected = losses(ranks(one, 1)[0])
    assert len(expected) == 4 and expected[0] == pytest.approx(0.6931, abs=1e-4)  # policy == reference at step 0
    assert losses(infos[0]) == losses(infos[1]) == pytest.approx(expected, abs=1e-5)
    assert_same_weights(zero3, one, atol=1e-5)  # gathered whole at the end (zero3_save_16bit_model)


@pytest.mark.slow
def test_zero3_resumes_from_its_checkpoint_exactly(deepspeed_runs):
    tmp_path, _, zero3 = deepspeed_runs
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(zero3 / "checkpoint-2", resumed / "checkpoint-2")
    launch(tmp_path, WRAPPER, tmp_path / "recipe.yaml", f"--output_dir={resumed}", "--per_device_train_batch_size=2",
           "--resume_from_checkpoint=true", stage=3)  # fmt: skip
    again, whole = ranks(resumed)[0], ranks(zero3)[0]
    assert again["global_step"] == whole["global_step"] == 4
    assert again["steps_run"] == 2 and whole["steps_run"] == 4  # steps 3 and 4, after the checkpoint's two
    assert losses(again) == pytest.approx(losses(whole), abs=1e-6)  # 1-2 from the checkpoint, 3-4 trained again
    assert_same_weights(resumed, zero3, atol=1e-6)


@pytest.mark.slow
def test_zero2_dpo_partitions_the_optimizer_and_matches_one_process(deepspeed_runs):
    tmp_path, one, _ = deepspeed_runs
    zero2 = tmp_path / "zero2"
    launch(tmp_path, WRAPPER, tmp_path / "recipe.yaml", f"--output_dir={zero2}", "--per_device_train_batch_size=2",
           stage=2)  # fmt: skip
    infos = ranks(zero2)
    total = sum(full for _, full in infos[0]["policy"].values())
    for info in infos:
        assert info["distributed_type"] == "DistributedType.DEEPSPEED" and info["zero_stage"] == 2
        assert info["engine"] == info["reference_engine"] == "DeepSpeedEngine"
        assert not info["policy_partitioned"]  # ZeRO-2 keeps whole weights: the reference is a copy
        assert all(local == full for local, full in info["policy"].values())
        assert 0.45 * total <= info["optimizer_elements"] <= 0.55 * total  # Adam's fp32 state: half a rank
    assert losses(infos[0]) == losses(infos[1]) == pytest.approx(losses(ranks(one, 1)[0]), abs=1e-5)
    assert_same_weights(zero2, one, atol=1e-5, tied_copy=True)
