"""Our trainers against stock TRL on the same work: throughput, peak memory, model FLOP utilisation and the first
losses (behind `scripts/benchmark.py`).

Each side runs in its own process (`alignment.run.measure`), so its peak resident memory is its own, on the same data
and the same weights: a random model of the preset saved once and loaded by both sides (a GPT-2: ours converts it
into our class, stock TRL uses transformers' GPT2LMHeadModel; a Llama: transformers' LlamaForCausalLM on both
sides, ours under our trainer), on sdpa, with the same batch size, max length and number of steps, after warm-up
steps that are not timed. Gradient checkpointing is off on every side unless asked for (TRL turns it on by default;
it trades speed for memory).

Model FLOP utilisation (`benchmarks/flops.py`): each side counts the work of the batches it trained on; the step's
model FLOPs are those of stock TRL's layout, the executed FLOPs those of the side's own; both are divided by the
matmul peak measured in the same run, in a child process of its own with the sides' thread count.

`--dtype bf16` gives both sides the same thing: bf16 weights (`from_pretrained(dtype=torch.bfloat16)`, the policy
and its frozen reference copy) and the Trainer's `bf16=True`, which on CPU is accelerate's bf16 autocast around
every forward (what a recipe with `dtype: bfloat16` and `bf16: true` trains with). The optimizer then updates bf16
weights. `compare(..., compare_fp32=True)` runs every side again in fp32 on the same rows and reports speed, memory
and losses against it.

With `profile`, every side trains `PROFILED_STEPS` more steps after the timed ones (a second pass over the rows; the
learning rate is constant, so the losses of the first steps are those of a run without it), and the `ours` side runs
them under torch.profiler (`benchmarks/step_profile.py`); peak memory and time are taken at the end of the timed
steps, before the profiler starts.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from alignment.run.measure import peak_rss_mib, run_in_child
from benchmarks.flops import ModelShape, Work, dpo_batch_work, sft_batch_work, step_flops, utilisation

SMOLLM2_135M = {  # HuggingFaceTB/SmolLM2-135M's shape
    "hidden_size": 576,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "intermediate_size": 1536,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
    "rope_theta": 100000.0,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 8192,
}
MODELS = {  # name -> model_type and config fields
    "tiny": {"model_type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 64},  # for smoke tests
    "small": {"model_type": "gpt2", "n_layer": 4, "n_head": 4, "n_embd": 256},
    "gpt2": {"model_type": "gpt2", "n_layer": 12, "n_head": 12, "n_embd": 768},
    "tiny-llama": {"model_type": "llama", **SMOLLM2_135M, "hidden_size": 64, "num_hidden_layers": 2,
                   "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128},  # smoke tests
    "smollm2-135m": {"model_type": "llama", **SMOLLM2_135M},
}  # fmt: skip
DPO_SIDES = ("ours", "trl", "trl-precompute", "ours-precompute")
SFT_SIDES = ("ours", "trl")
DTYPES = ("fp32", "bf16")
PROFILED_SIDE = "ours"
PROFILED_STEPS = 3  # the profiler's warm-up step, then 2 recorded ones
# the words of generated pairs (a sentence, split, reads better than 25 quoted words)
WORDS = "the a to of and is in that it you for what can be this have with are not on your do as but they".split()  # noqa: SIM905
# Set for the side processes, before their fork server imports the Hugging Face libraries (which read them then).
SIDE_ENVIRONMENT = {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
SIDE_PRELOAD = ("datasets", "transformers", "trl", "alignment.training")  # imported once by the fork server


@dataclass(frozen=True)
class Settings:
    """One comparison: the task, the model preset, and the work every side does."""

    task: str  # "dpo" or "sft"
    model: str = "small"  # a key of MODELS
    dtype: str = "fp32"  # or "bf16"
    batch_size: int = 8
    max_length: int = 512
    warmup: int = 2  # untimed steps first
    steps: int = 5  # timed steps
    data: str | None = None  # HH-RLHF-shaped jsonl(.gz); None: generated pairs
    gradient_checkpointing: bool = False  # on every side
    profile: bool = False  # PROFILED_STEPS more steps, the PROFILED_SIDE under torch.profiler

    def __post_init__(self):
        if self.task not in ("dpo", "sft"):
            raise ValueError(f"task must be dpo or sft, got {self.task!r}")
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {', '.join(MODELS)}, got {self.model!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be fp32 or bf16, got {self.dtype!r}")
        if self.warmup < 1 or self.steps < 1:
            raise ValueError("--warmup and --steps must be at least 1")

    @property
    def sides(self) -> tuple[str, ...]:
        return DPO_SIDES if self.task == "dpo" else SFT_SIDES

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps + (PROFILED_STEPS if self.profile else 0)


# --- the data ---------------------------------------------------------------------------------------------------


def synthetic_pairs(n: int, seed: int = 0) -> list[dict[str, str]]:
    """HH-RLHF-shaped pairs: multi-turn prompts of ~85 words (median ~62, long tail), replies of ~30-40 words."""
    rng = random.Random(seed)

    def text(words: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(max(1, words)))

    rows = []
    for _ in range(n):
        prompt_words = min(int(rng.lognormvariate(4.1, 0.6)), 670)
        turns = max(1, prompt_words // 40)
        prompt = (
            "".join(
                f"\n\nHuman: {text(prompt_words // (2 * turns))}\n\nAssistant: {text(prompt_words // (2 * turns))}"
                for _ in range(turns - 1)
            )
            + f"\n\nHuman: {text(prompt_words // (2 * turns))}\n\nAssistant:"
        )
        rows.append(
            {
                "prompt": prompt,
                "chosen": " " + text(int(rng.gauss(31, 12))),
                "rejected": " " + text(int(rng.gauss(39, 15))),
            }
        )
    return rows


def load_pairs(path: str | None, n: int) -> list[dict[str, str]]:
    """The first n preference pairs of a file (any format the library reads), or n generated ones without a path."""
    if path is None:
        return synthetic_pairs(n)
    from datasets import load_dataset

    from alignment.data import normalize_dataset

    data, _ = normalize_dataset(load_dataset("json", data_files=path, split="train"), "preference", source=path)
    return [data[i] for i in range(min(n, len(data)))]


def training_rows(settings: Settings) -> list[dict[str, str]]:
    """Every side's training rows: pairs for DPO; for SFT, prompt + chosen texts (4x, as packing needs more rows)."""
    pairs = load_pairs(settings.data, settings.batch_size * (settings.warmup + settings.steps))  # profiled: 2nd epoch
    return pairs if settings.task == "dpo" else [{"text": p["prompt"] + p["chosen"]} for p in pairs * 4]


# --- the model and its tokenizer --------------------------------------------------------------------------------


def save_random_model(model: str, folder: Path) -> Path:
    """A random transformers model of the preset and its tokenizer, in `folder`.

    GPT-2 without dropout (the assignment's "gpt2" preset): attention dropout would push PyTorch's CPU attention onto
    its unfused path, which stores every attention matrix of a 4,000-token packed row (both sides alike)."""
    import torch
    import transformers

    fields = dict(MODELS[model])
    model_type = fields.pop("model_type")
    torch.manual_seed(0)
    if model_type == "gpt2":
        config = transformers.GPT2Config(**fields, n_positions=1024, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
        network = transformers.GPT2LMHeadModel(config)
    else:
        eos = fields["vocab_size"] - 1  # the tokenizer's end-of-text (`save_tokenizer`)
        config = transformers.LlamaConfig(**fields, bos_token_id=eos, eos_token_id=eos)
        network = transformers.LlamaForCausalLM(config)
    network.save_pretrained(folder)
    save_tokenizer(config.vocab_size, folder)
    return folder


def save_tokenizer(vocab_size: int, folder: Path) -> None:
    """GPT-2's tokenizer, cut to `vocab_size` tokens when that is fewer (`cut_tokenizer`), into `folder`."""
    from alignment.modeling.tokenizer import load_tokenizer

    tokenizer = load_tokenizer("gpt2")
    if vocab_size < len(tokenizer):
        tokenizer = cut_tokenizer(tokenizer, vocab_size)
    tokenizer.save_pretrained(folder)


def cut_tokenizer(tokenizer: Any, vocab_size: int) -> Any:
    """GPT-2's byte-level BPE tokenizer with `vocab_size` tokens: its first vocab_size - 1 (the 256 bytes and the
    merges that made the others, in GPT-2's order), then end-of-text as the last id. Every id stays below the
    vocabulary (text that would use a dropped token is spelled with shorter ones), and text is cut as GPT-2 cuts it
    wherever no dropped token is involved, so a 49,152-token model (SmolLM2's vocabulary size) sees HH-RLHF at
    about GPT-2's token counts (0.04% more tokens on the 1,500-row sample)."""
    from tokenizers import Tokenizer

    from alignment.modeling.tokenizer import EOS_TOKEN

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    eos = vocab_size - 1
    bpe = spec["model"]
    bpe["vocab"] = {token: i for token, i in bpe["vocab"].items() if i < eos} | {EOS_TOKEN: eos}
    bpe["merges"] = [merge for merge in bpe["merges"] if "".join(merge) in bpe["vocab"]]
    for added in spec["added_tokens"]:
        if added["content"] == EOS_TOKEN:
            added["id"] = eos
    cut = type(tokenizer)(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        model_max_length=tokenizer.model_max_length,
    )
    if len(cut) != vocab_size or cut.eos_token_id != eos:
        raise RuntimeError(f"the cut tokenizer has {len(cut)} tokens and end-of-text {cut.eos_token_id}")
    return cut


def load_side_model(model: str, weights: str, ours: bool, dtype: Any) -> Any:
    import transformers

    import alignment

    if MODELS[model]["model_type"] == "gpt2":
        if ours:
            return alignment.AlignmentGPT2ForCausalLM.from_pretrained(weights, dtype=dtype)
        return transformers.GPT2LMHeadModel.from_pretrained(weights, dtype=dtype, attn_implementation="sdpa")
    return transformers.AutoModelForCausalLM.from_pretrained(weights, dtype=dtype, attn_implementation="sdpa")


def stock_head_scores_every_position(device: Any) -> bool:
    """TRL's fused LM head projects only the scored positions on Triton devices and every position elsewhere (CPU)."""
    try:
        from trl.kernels.chunked_logprob import _use_triton
    except ImportError:  # moved: assume the CPU behaviour, as measured with TRL 1.16
        return device.type == "cpu"
    return not _use_triton(device)


# --- one side, in its own process -------------------------------------------------------------------------------


def run_side(settings: dict[str, Any], side: str, weights: str, rows: list[dict[str, str]]) -> dict[str, Any]:
    """Train one side for its steps: time per step, set-up time, peak RSS, losses, rate, FLOPs (and a profile)."""
    import datasets
    import torch
    import trl
    from transformers import TrainerCallback

    from alignment.modeling import AlignmentGPT2PreTrainedModel
    from alignment.modeling.tokenizer import load_tokenizer
    from alignment.training import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer
    from alignment.training.dpo import frozen_copy
    from benchmarks.step_profile import summarise

    options = Settings(**settings)
    torch.manual_seed(0)
    ours = side.startswith("ours")
    model = load_side_model(options.model, weights, ours, torch.bfloat16 if options.dtype == "bf16" else torch.float32)
    tokenizer = load_tokenizer(weights)
    timed_end = options.warmup + options.steps  # steps [warmup, timed_end) are timed
    common = dict(
        output_dir=tempfile.mkdtemp(
            prefix=f"{side}-output-", dir=Path(weights).parent
        ),  # removed with the run's folder
        per_device_train_batch_size=options.batch_size,
        max_steps=options.total_steps if side == PROFILED_SIDE else timed_end,  # the profiled steps: one side's
        max_length=options.max_length,
        learning_rate=1e-6,
        lr_scheduler_type="constant",  # so the losses do not depend on the number of steps (--steps, --profile)
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        gradient_checkpointing=options.gradient_checkpointing,
        bf16=options.dtype == "bf16",
        use_cpu=not torch.cuda.is_available(),
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )

    class Clock(TrainerCallback):
        """The end time of every step (after the GPU finished it) and the process's CPU time then, the peak RSS at
        the end of the timed steps, and the profiler's step."""

        def __init__(self):
            self.marks, self.cpu_marks, self.peak_rss_mib, self.profiler = [], [], None, None

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.marks.append(time.perf_counter())
            self.cpu_marks.append(time.process_time())
            if len(self.marks) == timed_end:
                self.peak_rss_mib = peak_rss_mib()
            if self.profiler is not None:
                self.profiler.step()

    clock = Clock()
    start = time.perf_counter()
    if options.task == "dpo":
        precompute = side.endswith("precompute")
        config_class, trainer_class = (DPOConfig, DPOTrainer) if ours else (trl.DPOConfig, trl.DPOTrainer)
        args = config_class(**common, precompute_ref_log_probs=precompute, beta=0.1)
        ref_model = None if precompute else frozen_copy(model)
        trainer = trainer_class(
            model,
            ref_model,
            args=args,
            train_dataset=datasets.Dataset.from_list(rows),
            processing_class=tokenizer,
            callbacks=[clock],
        )
    else:
        config_class, trainer_class = (SFTConfig, SFTTrainer) if ours else (trl.SFTConfig, trl.SFTTrainer)
        args = config_class(**common, packing=True, packing_strategy="bfd")  # TRL's default, so batches are equal
        trainer = trainer_class(
            model,
            args=args,
            train_dataset=datasets.Dataset.from_list(rows),
            processing_class=tokenizer,
            callbacks=[clock],
        )
    setup_seconds = time.perf_counter() - start

    # the work of every batch trained on, (model, executed), counted as the step starts
    head_on_every_position = not ours and stock_head_scores_every_position(trainer.accelerator.device)
    if options.task == "dpo":
        batch_work = functools.partial(dpo_batch_work, head_on_every_position=head_on_every_position)
    else:  # our GPT-2 attends within short rows of whole documents
        grouped = isinstance(trainer.accelerator.unwrap_model(trainer.model), AlignmentGPT2PreTrainedModel)
        batch_work = functools.partial(
            sft_batch_work, head_on_every_position=head_on_every_position, grouped_attention=grouped
        )
    works: list[tuple[Work, Work]] = []
    training_step = trainer.training_step

    def counted_training_step(model, inputs, *args, **kwargs):
        works.append(batch_work(inputs))
        return training_step(model, inputs, *args, **kwargs)

    trainer.training_step = counted_training_step
    profiled = options.profile and side == PROFILED_SIDE
    with _profiler(timed_end) if profiled else contextlib.nullcontext() as profiler:
        clock.profiler = profiler
        trainer.train()

    seconds = clock.marks[timed_end - 1] - clock.marks[options.warmup - 1]  # from the end of the last warm-up step
    model_work = sum((work[0] for work in works[options.warmup : timed_end]), Work())
    executed_work = sum((work[1] for work in works[options.warmup : timed_end]), Work())
    shape = ModelShape.of(trainer.accelerator.unwrap_model(trainer.model).config)
    reference = options.task == "dpo" and not side.endswith("precompute")  # the reference's forward is in the step
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    result = {
        "side": side,
        "seconds_per_step": seconds / options.steps,
        # CPU time of all the process's threads: less sensitive than wall time to other work on a shared machine
        "cpu_seconds_per_step": (clock.cpu_marks[timed_end - 1] - clock.cpu_marks[options.warmup - 1]) / options.steps,
        "setup_seconds": setup_seconds,
        "peak_rss_gb": clock.peak_rss_mib / 1024,
        "losses": losses[:timed_end],
        "threads": torch.get_num_threads(),
        "model_flops_per_step": step_flops(shape, model_work, reference) / options.steps,
        "executed_flops_per_step": step_flops(shape, executed_work, reference) / options.steps,
        "first_metrics": {k: v for k, v in trainer.state.log_history[0].items() if isinstance(v, int | float)},
    }
    if torch.cuda.is_available():  # this side's own peak: each side is a process of its own
        result["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30
    if options.task == "dpo":
        result["pairs_per_second"] = options.batch_size * options.steps / seconds
    else:
        result["tokens_per_second"] = model_work.tokens / seconds
    if profiled:
        recorded = timed_end + 1  # the first recorded step (after the profiler's warm-up step)
        wall = clock.marks[recorded + PROFILED_STEPS - 2] - clock.marks[recorded - 1]
        result["profile"] = summarise(profiler.events(), PROFILED_STEPS - 1, wall)
    return result


def _profiler(wait: int):
    """torch.profiler over the steps after `wait` steps: one warm-up step (not recorded), then the rest."""
    import torch

    activities = [torch.profiler.ProfilerActivity.CPU]
    schedule = torch.profiler.schedule(wait=wait, warmup=1, active=PROFILED_STEPS - 1, repeat=1)
    return torch.profiler.profile(activities=activities, schedule=schedule)


# --- the comparison ---------------------------------------------------------------------------------------------


def matmul_peaks(dtypes: list[str], seconds: float) -> dict[str, dict[str, float]]:
    """`benchmarks.flops.matmul_peak` of every dtype (run in a child, with the sides' thread count)."""
    from benchmarks.flops import matmul_peak

    return {dtype: matmul_peak(dtype, seconds) for dtype in dtypes}


def run_sides(settings: Settings, sides: list[str], weights: Path, rows: list, work: Path) -> list[dict[str, Any]]:
    results = []
    for side in sides:
        run = run_in_child(
            run_side,
            asdict(settings),
            side,
            str(weights),
            rows,
            log_path=work / f"{side}-{settings.dtype}.log",
            what=f"side {side} ({settings.dtype})",
            preload=SIDE_PRELOAD,
        )
        results.append(run.result)
        print(f"  {side} ({settings.dtype}): done", file=sys.stderr)
    return results


def compare(
    settings: Settings, sides: list[str] | None = None, *, compare_fp32: bool = False, peak_seconds: float = 2.0
) -> dict[str, Any]:
    """Every side (default: all for the task) on the same weights and rows, one process each; the report.

    `compare_fp32` (with dtype bf16): every side again in fp32, on the same rows and weights. `peak_seconds`: how
    long the matmul peak of each dtype is timed. The temporary folder is removed after a run, kept after a failure."""
    if compare_fp32 and settings.dtype != "bf16":
        raise ValueError("compare_fp32 compares a bf16 run with fp32: set --dtype bf16")
    os.environ.update(SIDE_ENVIRONMENT)
    work = Path(tempfile.mkdtemp(prefix="alignment-benchmark-"))
    try:
        report = compare_in(work, settings, sides, compare_fp32, peak_seconds)
    except BaseException:
        print(f"the benchmark's weights and logs are kept in {work}", file=sys.stderr)
        raise
    shutil.rmtree(work, ignore_errors=True)  # weights, side logs and output folders: nothing is left in /tmp
    return report


def compare_in(work: Path, settings: Settings, sides, compare_fp32: bool, peak_seconds: float) -> dict[str, Any]:
    """`compare`'s work, in the folder `work` (the random weights, the side logs and output folders)."""
    import torch
    import transformers

    weights = save_random_model(settings.model, work / "weights")
    shape = ModelShape.of(transformers.AutoConfig.from_pretrained(weights))
    rows = training_rows(settings)
    dtypes = sorted({"fp32", settings.dtype})
    peaks = run_in_child(
        matmul_peaks, dtypes, peak_seconds, log_path=work / "matmul-peak.log", what="the matmul peak",
        preload=(*SIDE_PRELOAD, __name__),
    ).result  # fmt: skip
    sides = list(sides or settings.sides)
    results = with_utilisation(run_sides(settings, sides, weights, rows, work), peaks[settings.dtype])
    report = {
        "task": settings.task,
        "model": settings.model,
        "model_type": MODELS[settings.model]["model_type"],
        "model_shape": asdict(shape),
        "dtype": settings.dtype,
        "batch_size": settings.batch_size,
        "max_length": settings.max_length,
        "steps": settings.steps,
        "warmup": settings.warmup,
        "gradient_checkpointing": settings.gradient_checkpointing,
        "data": settings.data or "generated",
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "cpus": os.cpu_count(),
        "matmul_peak": peaks,
        "results": results,
    }
    if compare_fp32:
        fp32 = with_utilisation(run_sides(replace(settings, dtype="fp32"), sides, weights, rows, work), peaks["fp32"])
        report["fp32_results"] = fp32
        report["bf16_vs_fp32"] = bf16_against_fp32(results, fp32, rate_key(settings.task))
    return report


def with_utilisation(results: list[dict[str, Any]], peak: dict[str, float]) -> list[dict[str, Any]]:
    """Each result with its MFU (model FLOPs) and executed utilisation, against the matmul peak of its dtype."""
    for r in results:
        r["mfu"] = utilisation(r["model_flops_per_step"], r["seconds_per_step"], peak["flops_per_second"])
        r["executed_utilisation"] = utilisation(
            r["executed_flops_per_step"], r["seconds_per_step"], peak["flops_per_second"]
        )
    return results


def rate_key(task: str) -> str:
    return "pairs_per_second" if task == "dpo" else "tokens_per_second"


def bf16_against_fp32(bf16: list[dict], fp32: list[dict], rate: str) -> list[dict[str, Any]]:
    """Per side: bf16's speed and peak memory as multiples of fp32's, and how far its losses are from fp32's (at the
    last logged step, and the largest difference over all of them)."""
    base = {r["side"]: r for r in fp32}
    rows = []
    for r in bf16:
        f = base[r["side"]]
        differences = [abs(a - b) for a, b in zip(r["losses"], f["losses"], strict=True)]
        rows.append(
            {
                "side": r["side"],
                "speed": r[rate] / f[rate],
                "memory": r["peak_rss_gb"] / f["peak_rss_gb"],
                "steps": len(differences),
                "loss_difference_last": differences[-1],
                "loss_difference_max": max(differences),
            }
        )
    return rows


def print_table(report: dict[str, Any]) -> None:
    """Rate, peak RSS (each against stock TRL's), MFU and executed utilisation of every side, and its first losses;
    then bf16 against fp32 and the profiles, where the report has them."""
    from benchmarks.step_profile import print_profile

    rate = rate_key(report["task"])
    results = {r["side"]: r for r in report["results"]}
    base = results.get("trl")
    shape = report["model_shape"]
    weights = (shape["block_params"] + shape["head_params"]) / 1e6
    checkpointing = " · gradient checkpointing" if report.get("gradient_checkpointing") else ""
    print(
        f"\n{report['task'].upper()} · {report['model']} ({report['model_type']}, {weights:.1f}M matmul weights) · "
        f"{report['dtype']} · batch {report['batch_size']} · max_length {report['max_length']} · "
        f"{report['steps']} timed steps{checkpointing} · {report['device']}"
    )
    peaks = " · ".join(
        f"{p['dtype']} {p['flops_per_second'] / 1e9:.1f} GFLOP/s ({p['size']}², "
        + (f"{p['threads']} threads)" if p.get("device", "cpu") == "cpu" else f"{p['device']})")
        for p in report["matmul_peak"].values()
    )
    print(f"matmul peak: {peaks}; MFU = model FLOPs (stock layout) / s / peak, exec = the side's executed FLOPs")
    print(
        f"{'side':<18}{rate.replace('_', ' '):>18}{'vs trl':>9}{'peak RSS GB':>13}{'vs trl':>9}"
        f"{'GFLOP/step':>12}{'MFU':>8}{'exec':>8}  first losses"
    )
    for side, r in results.items():
        speed = f"{r[rate] / base[rate]:.2f}x" if base else ""
        memory = f"{r['peak_rss_gb'] / base['peak_rss_gb']:.2f}x" if base else ""
        losses = " ".join(f"{x:.4f}" for x in r["losses"][:3])
        print(
            f"{side:<18}{r[rate]:>18.2f}{speed:>9}{r['peak_rss_gb']:>13.2f}{memory:>9}"
            f"{r['model_flops_per_step'] / 1e9:>12.4g}{r['mfu']:>8.1%}{r['executed_utilisation']:>8.1%}  {losses}"
        )
    if "bf16_vs_fp32" in report:
        print("\nbf16 against fp32 (the same sides, weights and rows)")
        print(f"{'side':<18}{'speed':>9}{'memory':>9}  |loss difference| at the last of N steps, largest")
        for r in report["bf16_vs_fp32"]:
            print(
                f"{r['side']:<18}{r['speed']:>8.2f}x{r['memory']:>8.2f}x  "
                f"{r['loss_difference_last']:.2e} at step {r['steps']}, {r['loss_difference_max']:.2e}"
            )
    for side, r in results.items():
        if "profile" in r:
            print_profile(f"{side}, {report['task'].upper()}, {PROFILED_STEPS - 1} steps", r["profile"])
