"""FlexAttention against today's SDPA path, for the packed shared-prefix rows DPO trains and scores on.

    python benchmarks/flex_attention.py                          # lengths 512, 1024, 2048; GPT-2 small's heads
    python benchmarks/flex_attention.py --lengths 4096 --rows 1 --repeats 3

A row holds several sequences [prompt, r1, r2] back to back (HH-RLHF's proportions: a prompt of about 60% of the
sequence and two replies), then padding. Visibility is the rule `alignment.training.shared_prefix` builds: causal,
within one sequence, and a reply never sees another reply. Two ways to apply it:

* ``sdpa``: today's path. The rule is a dense boolean (rows, 1, L, L) mask built for the batch and handed to
  PyTorch's fused `scaled_dot_product_attention` (`alignment.modeling.attention.sdpa_attention`).
* ``flex``: `torch.nn.attention.flex_attention`, compiled, with a `BlockMask` built from per-token labels (sequence
  and reply ids); blocks wholly hidden are skipped instead of computed and masked.

Reported per length: the largest difference of each side to `reference_attention` (the formula), forward time, the
time to build the mask, and the peak resident memory the forward adds (Linux's VmHWM, reset before each side).
Backward is tried on `flex` too: torch 2.13 refuses it on CPU, which the script prints rather than hides.
Timings are the best of `repeats` (other processes only ever slow a run down); the first compiled call (its
compile time) is reported apart.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, when run as a script

from alignment.modeling.attention import reference_attention, sdpa_attention  # noqa: E402


def token_labels(rows: int, length: int, sequences: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, L) sequence ids and reply ids (0 = prompt, 1, 2 = replies) of packed rows. As in the collator, each
    padding column is a sequence of its own, so it sees itself only and no query row is empty."""
    rng = random.Random(seed)
    sequence_ids = torch.arange(sequences, sequences + length).repeat(rows, 1)
    reply_ids = torch.zeros((rows, length), dtype=torch.long)
    for row in range(rows):
        column = 0
        for sequence in range(sequences):
            size = int(length / sequences * rng.uniform(0.8, 0.95))
            prompt = int(size * 0.6)
            reply = (size - prompt) // 2
            parts = [(0, prompt), (1, reply), (2, size - prompt - reply)]
            for reply_id, width in parts:
                sequence_ids[row, column : column + width] = sequence
                reply_ids[row, column : column + width] = reply_id
                column += width
    return sequence_ids, reply_ids


def visible_rule(sequence_ids, reply_ids, batch, query, key):
    """True where `query` may see `key`: causal, same sequence, and not another reply (the collator's rule)."""
    same_sequence = sequence_ids[batch, query] == sequence_ids[batch, key]
    own_reply = (reply_ids[batch, key] == 0) | (reply_ids[batch, key] == reply_ids[batch, query])
    return (key <= query) & same_sequence & own_reply


def dense_mask(sequence_ids: torch.Tensor, reply_ids: torch.Tensor) -> torch.Tensor:
    """The (rows, 1, L, L) boolean mask the SDPA path attends under (the rule, broadcast over all pairs)."""
    length = sequence_ids.size(1)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    same_sequence = sequence_ids[:, :, None] == sequence_ids[:, None, :]
    key_reply = reply_ids[:, None, :]
    own_reply = (key_reply == 0) | (key_reply == reply_ids[:, :, None])
    return (causal & same_sequence & own_reply)[:, None]


def block_mask(sequence_ids: torch.Tensor, reply_ids: torch.Tensor, block_size: int):
    """FlexAttention's BlockMask for the same rule, built once per batch and shared by every layer. The builder is
    compiled, as torch advises: uncompiled it evaluates the rule over every (query, key) pair through vmap."""
    from torch.nn.attention.flex_attention import create_block_mask

    rows, length = sequence_ids.shape

    def mask_mod(batch, head, query, key):
        return visible_rule(sequence_ids, reply_ids, batch, query, key)

    global _compiled_create_block_mask
    if _compiled_create_block_mask is None:
        _compiled_create_block_mask = torch.compile(create_block_mask)
    return _compiled_create_block_mask(mask_mod, rows, None, length, length, device="cpu", BLOCK_SIZE=block_size)


_compiled_create_block_mask = None


def peak_rss_reset() -> None:
    """Start a new peak-memory window (Linux: writing 5 to clear_refs resets VmHWM)."""
    Path("/proc/self/clear_refs").write_text("5")


def status_mib(field: str) -> float:
    """A memory line of /proc/self/status (VmHWM: the peak resident set, VmRSS: the current one), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def best_seconds(work, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - start)
    return best


def measured_peak(work) -> float:
    """MiB of resident memory `work` adds at its peak, over what the process held before."""
    before = status_mib("VmRSS")
    peak_rss_reset()
    work()
    return status_mib("VmHWM") - before


def flex_backward_refusal(query, key, value, mask) -> str:
    """What flex_attention says when asked for gradients on this device ('' when it gives them)."""
    from torch.nn.attention.flex_attention import flex_attention

    leaf = query.detach().requires_grad_(True)
    try:
        flex_attention(leaf, key, value, block_mask=mask).sum().backward()
    except Exception as error:  # torch raises NotImplementedError on CPU; say whatever it says
        return f"{type(error).__name__}: {error}"
    return ""


def measure(length: int, args) -> dict:
    from torch.nn.attention.flex_attention import flex_attention

    generator = torch.Generator().manual_seed(0)
    shape = (args.rows, args.heads, length, args.head_dim)
    query, key, value = (torch.randn(shape, generator=generator) for _ in range(3))
    sequence_ids, reply_ids = token_labels(args.rows, length, args.sequences)

    visible = dense_mask(sequence_ids, reply_ids)
    mask = block_mask(sequence_ids, reply_ids, args.block_size)
    compiled = torch.compile(flex_attention, dynamic=False)

    start = time.perf_counter()
    with torch.no_grad():
        flex_out = compiled(query, key, value, block_mask=mask)
    compile_seconds = time.perf_counter() - start

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the eager flex call below is deliberate: it checks the unfused path too
        expected = reference_attention(query, key, value, visible)
        sdpa_out = sdpa_attention(query, key, value, visible)
        eager_out = flex_attention(query, key, value, block_mask=mask)

    def run_sdpa():
        with torch.no_grad():
            sdpa_attention(query, key, value, dense_mask(sequence_ids, reply_ids))

    def run_flex():
        with torch.no_grad():
            compiled(query, key, value, block_mask=block_mask(sequence_ids, reply_ids, args.block_size))

    run_sdpa(), run_flex()  # warm both
    return {
        "length": length,
        "sparsity": mask.sparsity(),
        "sdpa_error": (sdpa_out - expected).abs().max().item(),
        "flex_error": (flex_out - expected).abs().max().item(),
        "flex_eager_error": (eager_out - expected).abs().max().item(),
        "sdpa_ms": best_seconds(run_sdpa, args.repeats) * 1e3,
        "flex_ms": best_seconds(run_flex, args.repeats) * 1e3,
        "dense_mask_ms": best_seconds(lambda: dense_mask(sequence_ids, reply_ids), args.repeats) * 1e3,
        "block_mask_ms": best_seconds(lambda: block_mask(sequence_ids, reply_ids, args.block_size), args.repeats) * 1e3,
        "compile_s": compile_seconds,
        "sdpa_peak_mib": measured_peak(run_sdpa),
        "flex_peak_mib": measured_peak(run_flex),
        "backward": flex_backward_refusal(query, key, value, mask),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--sequences", type=int, default=4, help="sequences [prompt, r1, r2] packed into a row")
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head_dim", type=int, default=64)
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"{args.rows} rows x {args.sequences} sequences [prompt, r1, r2], {args.heads} heads x {args.head_dim}, "
        f"fp32, {torch.get_num_threads()} threads, forward without gradients, best of {args.repeats}"
    )
    header = (
        "length  skipped  sdpa ms  flex ms  speed-up  dense-mask ms  block-mask ms  compile s"
        "  sdpa MiB  flex MiB  max|sdpa-ref|  max|flex-ref|"
    )
    print(header)
    backward = ""
    for length in args.lengths:
        m = measure(length, args)
        backward = m["backward"]
        print(
            f"{m['length']:6d}  {m['sparsity']:6.1f}%  {m['sdpa_ms']:7.1f}  {m['flex_ms']:7.1f}  "
            f"{m['sdpa_ms'] / m['flex_ms']:7.2f}x  {m['dense_mask_ms']:13.2f}  {m['block_mask_ms']:13.2f}  "
            f"{m['compile_s']:9.1f}  {m['sdpa_peak_mib']:8.1f}  {m['flex_peak_mib']:8.1f}  "
            f"{m['sdpa_error']:13.2e}  {max(m['flex_error'], m['flex_eager_error']):13.2e}"
        )
    print("flex backward on cpu: " + (backward or "supported"))


if __name__ == "__main__":
    main()
