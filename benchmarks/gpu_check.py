"""The GPU check behind `scripts/check_gpu.py`: a few bf16 (or, with --dtype fp32, fp32) SFT and DPO steps on one
CUDA GPU with our trainers and with stock TRL, on the same weights and rows; asserts equal first losses and prints
tokens/s (SFT), pairs/s (DPO) and peak GPU memory of both.

    python scripts/check_gpu.py --prepare            # here, where PyPI answers: wheels + GPT-2's tokenizer in .whl/
    # then, on the GPU machine (no network needed), from the repo root with .whl/ beside it:
    python3 -m pip install -q --no-index --find-links .whl -r .whl/requirements.txt \
        || python3 -m pip install -q --no-index --no-deps .whl/*.whl    # when a dependency is older there
    python3 scripts/check_gpu.py --output_json gpu_check.json

The work is `benchmarks/trl_comparison.py`'s (each side in its own process, so its peak GPU memory,
torch.cuda.max_memory_allocated, is its own): a random GPT-2 small (12 layers, 768 wide, GPT-2's 50,257 tokens)
saved once and loaded by both sides in bf16, with the Trainer's bf16 on, gradient checkpointing off on both sides
(TRL turns it on by default), generated HH-RLHF-shaped rows, batch 8, max length 512, 2 warm-up and 5 timed steps.

Checks (bf16 keeps 8 significant bits, a relative step of 2^-8 = 0.4%; the two sides run different kernels through
12 layers, so first-step values are compared at a relative tolerance of TOLERANCE = 2%, i.e. |ours - trl| <=
0.02 * max(1, |trl|)): SFT's first loss; DPO's first loss (ln 2 on both sides, the policy being its reference) and
its first step's summed log-probs of the chosen and rejected replies, which is where the two implementations differ.

Exits with one line, before anything is measured, on a machine without a CUDA GPU, or without the libraries'
versions or GPT-2's tokenizer (run --prepare where PyPI answers, and carry .whl/). Takes about 2-3 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PREPARED = REPO / ".whl"  # ignored by git; carried to the GPU machine
TOKENIZER_CACHE = PREPARED / "alignment-cache"  # holds gpt2-tokenizer/, read through ALIGNMENT_CACHE
TOLERANCE = 0.02
TASKS = ("sft", "dpo")
# What the GPU machine's image may lack or hold in other versions: carried as wheels, pinned to this checkout's.
# pyarrow (datasets needs >= 24) is not carried: its wheel alone is over the 64 MiB a device call carries.
CARRIED = ("transformers", "trl", "datasets", "peft", "accelerate", "dill", "multiprocess", "fsspec", "regex")
NEEDED = {"transformers": "5.23", "trl": "1.16"}  # the versions the package is built on (setup.cfg)
WHEEL_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
NO_GPU = (
    "check_gpu: no CUDA GPU here (torch.cuda.is_available() is False); run it on a machine with an NVIDIA GPU "
    "(nothing was measured)"
)


def prepare(folder: Path = PREPARED) -> None:
    """Where PyPI answers: wheels of this checkout's versions of CARRIED for the GPU machine's Python 3.12, a
    requirements file naming them, and GPT-2's tokenizer (rebuilt offline, `alignment.modeling.tokenizer`)."""
    from alignment.modeling.tokenizer import build_gpt2_tokenizer

    folder.mkdir(exist_ok=True)
    pins = [f"{name}=={metadata.version(name)}" for name in CARRIED]
    platforms = [flag for platform in WHEEL_PLATFORMS for flag in ("--platform", platform)]
    command = [
        sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version",
        "3.12", "--implementation", "cp", *platforms, "--dest", str(folder), *pins,
    ]  # fmt: skip
    subprocess.run(command, check=True)
    (folder / "requirements.txt").write_text("".join(pin + "\n" for pin in pins), encoding="utf-8")
    target = TOKENIZER_CACHE / "gpt2-tokenizer"
    if not target.is_dir():
        shutil.copytree(build_gpt2_tokenizer(), target)
    size = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file()) / 2**20
    print(f"prepared {folder}: {len(pins)} wheels and GPT-2's tokenizer, {size:.0f} MiB; carry it to the GPU machine")


def ready_line(dtype: str = "bf16") -> str | None:
    """Why this machine cannot run the check in `dtype` (one line), or None."""
    import torch

    if not torch.cuda.is_available():
        return NO_GPU
    if dtype == "bf16" and not torch.cuda.is_bf16_supported():
        return f"check_gpu: {torch.cuda.get_device_name()} has no bf16; run it with --dtype fp32 (nothing was measured)"
    found = {name: metadata.version(name) for name in NEEDED}
    wrong = [f"{name} {version}" for name, version in found.items() if not version.startswith(NEEDED[name])]
    if wrong:
        return (
            f"check_gpu: needs transformers {NEEDED['transformers']} and trl {NEEDED['trl']}, found {', '.join(wrong)}; "
            f"install the wheels prepared by `python scripts/check_gpu.py --prepare` (see its docstring)"
        )
    from alignment.common import default_cache_dir

    if not (default_cache_dir() / "gpt2-tokenizer").is_dir():
        return (
            f"check_gpu: no GPT-2 tokenizer in {default_cache_dir()} and no network to rebuild it; run "
            "`python scripts/check_gpu.py --prepare` where PyPI answers and carry .whl/"
        )
    return None


def first_value_checks(task: str, ours: dict, trl: dict) -> list[dict]:
    """Ours against stock TRL at the first step, each within TOLERANCE relative (see the module docstring)."""
    pairs = [("loss", ours["losses"][0], trl["losses"][0])]
    if task == "dpo":
        pairs += [
            (key, ours["first_metrics"][key], trl["first_metrics"][key]) for key in ("logps/chosen", "logps/rejected")
        ]
    checks = []
    for what, a, b in pairs:
        limit = TOLERANCE * max(1.0, abs(b))
        checks.append({"task": task, "value": what, "ours": a, "trl": b, "limit": limit, "ok": abs(a - b) <= limit})
    return checks


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepare", action="store_true", help="download the wheels and tokenizer into .whl/")
    parser.add_argument("--output_json", default=None)
    parser.add_argument("--model", default="gpt2", help="a preset of benchmarks/trl_comparison.py (default gpt2)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument(
        "--dtype", choices=("bf16", "fp32"), default="bf16", help="both sides' precision (default bf16, as trained)"
    )
    parser.add_argument(
        "--tasks", nargs="+", choices=TASKS, default=list(TASKS), help="which to check (default both; one takes half)"
    )
    options = parser.parse_args(argv)
    if options.prepare:
        return prepare()
    if TOKENIZER_CACHE.is_dir():
        os.environ.setdefault("ALIGNMENT_CACHE", str(TOKENIZER_CACHE))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no Hub: fail at once rather than retry
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # the sides' fork server never initialises CUDA
    problem = ready_line(options.dtype)
    if problem is not None:
        raise SystemExit(problem)

    import torch

    from alignment.run.measure import ChildFailed
    from benchmarks.trl_comparison import Settings, compare

    reports, checks = {}, []
    for task in options.tasks:
        settings = Settings(
            task=task, model=options.model, dtype=options.dtype, batch_size=options.batch_size,
            max_length=options.max_length, warmup=options.warmup, steps=options.steps,
        )  # fmt: skip
        try:
            reports[task] = compare(settings, ["ours", "trl"], peak_seconds=0.5)
        except ChildFailed as error:
            raise SystemExit(f"check_gpu: {task.upper()} {error}") from None
        sides = {r["side"]: r for r in reports[task]["results"]}
        checks += first_value_checks(task, sides["ours"], sides["trl"])
    summary = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "dtype": options.dtype,
        "tolerance": f"|ours - trl| <= {TOLERANCE} * max(1, |trl|) at the first step ({options.dtype})",
        "checks": checks,
        "reports": reports,
    }
    print_summary(summary)
    if options.output_json:
        Path(options.output_json).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    failed = [c for c in checks if not c["ok"]]
    if failed:
        c = failed[0]
        raise SystemExit(
            f"check_gpu: {c['task'].upper()} first-step {c['value']} differs: ours {c['ours']:.6g}, stock TRL "
            f"{c['trl']:.6g} (limit {c['limit']:.3g})"
        )
    print("check_gpu: all first-step values agree")


def print_summary(summary: dict) -> None:
    """One row per task and side: rate, peak GPU memory (each against stock TRL's), first loss; then the checks."""
    print(f"\nGPU check · {summary['device']} · torch {summary['torch']} (CUDA {summary['cuda']}) · {summary['dtype']}")
    print(f"{'task':<6}{'side':<7}{'rate':>22}{'vs trl':>9}{'peak GPU GiB':>14}{'vs trl':>9}{'first loss':>12}")
    for task, report in summary["reports"].items():
        rate = "pairs_per_second" if task == "dpo" else "tokens_per_second"
        unit = "pairs/s" if task == "dpo" else "tokens/s"
        sides = {r["side"]: r for r in report["results"]}
        base = sides["trl"]
        for side, r in sides.items():
            gpu, base_gpu = r.get("peak_gpu_gb"), base.get("peak_gpu_gb")  # absent where no GPU was used
            memory = f"{gpu:>14.2f}{gpu / base_gpu:>8.2f}x" if gpu and base_gpu else f"{'n/a':>14}{'':>9}"
            print(
                f"{task:<6}{side:<7}{r[rate]:>14.1f} {unit:<7}{r[rate] / base[rate]:>8.2f}x{memory}"
                f"{r['losses'][0]:>12.4f}"
            )
    print(f"checks ({summary['tolerance']}):")
    for c in summary["checks"]:
        verdict = "ok" if c["ok"] else "DIFFERS"
        print(f"  {c['task']} {c['value']:<15} ours {c['ours']:>12.6g}  trl {c['trl']:>12.6g}  {verdict}")


if __name__ == "__main__":
    main()
