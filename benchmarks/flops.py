"""Model FLOPs of a training step, and the matmul peak they are divided by (model FLOP utilisation, MFU).

A forward pass of a decoder costs, in multiply-adds counted as 2 FLOPs:

    2 · N_blocks · tokens          every linear layer of the transformer blocks, for every token through them
  + 2 · N_head · scored            the LM head (hidden × vocab), for the tokens whose log-prob the loss needs
  + 4 · L · d_attn · Σ_rows T²     Q·Kᵀ and attention·V, 2 · T · d_attn each per token and layer

N_blocks counts the weights of every linear layer of the blocks (biases, norms and the embedding lookup are left out:
together well under 1% of the FLOPs), N_head = hidden × vocab, d_attn = heads × head size. The attention term counts
every (query, key) pair of a row of length T, not half of them for the causal mask: PaLM's convention (Chowdhery et
al. 2022, appendix B: 6·N + 12·L·H·Q·T per token for training), which is what a dense-mask kernel computes. A training
step is 3 forward passes' worth (the backward pass costs two: gradients of inputs and of weights), the frozen
reference of DPO one more (forward only, no backward): 6·N·tokens + 2·N·tokens with N split as above. Recomputation
(gradient checkpointing, a head that recomputes its softmax in the backward pass) is not counted: it is work done
twice, not work the step needs.

Two counts per step (`Work`):

* model FLOPs (the numerator of MFU): the work as stock TRL lays it out, without its padding: for DPO the rows
  [prompt + chosen] and [prompt + rejected] (the prompt twice), the head on the reply tokens; for SFT the packed
  documents, each attending within itself, the head on the labelled tokens. Every side of a comparison is given the
  same figure for the same batch, so MFU ratios are speed ratios, and a side that does less work for the same result
  (a prompt computed once for both replies) shows it as a higher MFU: the utilisation a stock implementation would
  need to match its speed.
* executed FLOPs: what the side's own layout feeds the model, padding included (its rows × their width through the
  blocks and the attention; our GPT-2's attention over short rows of whole documents where it regroups a packed
  row, and its DPO batches' tokens without padding, attending in their `attention_layout` rows), and the rows its
  LM head projects (stock TRL's fused head projects every position on
  a CPU and masks afterwards; ours only the scored ones). Executed ÷ time ÷ peak is how busy the side keeps the matmul units
  (at most about 100%); model ÷ executed is what its layout saves.

The peak is the best rate of a large square `torch.matmul` in the run's dtype, timed in the same run on the same
machine (the GPU where the sides train on one), with the thread count of the sides (`matmul_peak`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

IGNORE_INDEX = -100


@dataclass(frozen=True)
class ModelShape:
    """What the FLOP count needs of a decoder: layers, attention width, and the weights of its matmuls."""

    layers: int
    attention_width: int  # heads × head size
    block_params: int  # weights of every linear layer of the blocks
    head_params: int  # hidden × vocab

    @classmethod
    def of(cls, config: Any) -> ModelShape:
        """From a GPT-2 (ours or transformers') or a Llama-style config (grouped-query attention, gated MLP)."""
        if hasattr(config, "n_layer"):  # GPT-2: qkv (3d²) + output (d²) + MLP (2 · d · inner)
            d, layers = config.n_embd, config.n_layer
            inner = getattr(config, "n_inner", None) or 4 * d
            return cls(layers, d, layers * (4 * d * d + 2 * d * inner), d * config.vocab_size)
        d, layers = config.hidden_size, config.num_hidden_layers
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or d // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        attention = 2 * d * heads * head_dim + 2 * d * kv_heads * head_dim  # q and o, k and v
        mlp = 3 * d * config.intermediate_size  # gate, up, down
        return cls(layers, heads * head_dim, layers * (attention + mlp), d * config.vocab_size)


def matmul_parameters(model: Any) -> tuple[int, int]:
    """(block weights, head weights) counted from the model's modules: the check of `ModelShape.of`'s formulas."""
    import torch

    head = model.get_output_embeddings()
    blocks = 0
    for module in model.modules():
        is_linear = isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"  # GPT-2's transposed one
        if is_linear and module is not head:
            blocks += module.weight.numel()
    return blocks, head.weight.numel()


@dataclass(frozen=True)
class Work:
    """The sizes of one forward pass: tokens through the blocks, rows through the head, Σ of attention rows' T²."""

    tokens: int = 0
    scored: int = 0
    attention: int = 0

    def __add__(self, other: Work) -> Work:
        return Work(self.tokens + other.tokens, self.scored + other.scored, self.attention + other.attention)


def forward_flops(shape: ModelShape, work: Work) -> int:
    return (
        2 * shape.block_params * work.tokens
        + 2 * shape.head_params * work.scored
        + 4 * shape.layers * shape.attention_width * work.attention
    )


def step_flops(shape: ModelShape, work: Work, reference: bool = False) -> int:
    """A training step on `work`: forward and backward (3 forwards' worth), and the reference's forward if any."""
    return (3 + int(reference)) * forward_flops(shape, work)


def dpo_batch_work(batch: dict[str, Any], head_on_every_position: bool = False) -> tuple[Work, Work]:
    """(model, executed) work of a DPO batch in either layout (stock TRL's rows, or our shared-prefix packed rows).

    `head_on_every_position`: the side's LM head projects every position of every row but the last, padding
    included, and masks afterwards (TRL's fused head off Triton devices, so on CPU); else only the scored ones."""
    rows, width = batch["input_ids"].shape
    if "score_targets" in batch:  # shared prefix: each pair one [prompt, chosen, rejected] block of a packed row
        pairs = batch["pair_lengths"].numel()
        rejected = batch["score_rejected"]
        chosen_n = batch["score_pairs"][~rejected].bincount(minlength=pairs)
        rejected_n = batch["score_pairs"][rejected].bincount(minlength=pairs)
        prompt_n = batch["pair_lengths"] - chosen_n - rejected_n
        row_lengths = [*(prompt_n + chosen_n).tolist(), *(prompt_n + rejected_n).tolist()]
        scored = int(batch["score_targets"].numel())
        # merged prompts: the head runs once per distinct reply token (`score_unique`), each pair reads its copy
        head_scored = int(batch["score_unique"].numel()) if "score_unique" in batch else scored
    else:  # stock: [prompt + chosen; prompt + rejected] rows, right-padded; the loss scores the completion tokens
        row_lengths = batch["attention_mask"].sum(dim=1).tolist()
        scored = head_scored = int(batch["completion_mask"][:, 1:].sum())
    model = Work(sum(row_lengths), scored, sum(n * n for n in row_lengths))
    head_rows = rows * (width - 1) if head_on_every_position else head_scored
    # padding-free: the tokens are one row, attention runs over the rows of `attention_layout`
    attention_rows, attention_width = batch.get("attention_layout", batch["input_ids"]).shape
    return model, Work(rows * width, head_rows, attention_rows * attention_width**2)


def sft_batch_work(
    batch: dict[str, Any], head_on_every_position: bool = False, grouped_attention: bool = False
) -> tuple[Work, Work]:
    """(model, executed) work of an SFT batch: documents are the runs of restarting `position_ids` (padding-free
    packing), else each row's real tokens; the loss scores the labelled next tokens (`head_on_every_position`: as
    `dpo_batch_work`). `grouped_attention`: the side's model attends within short rows of whole documents where
    that saves work (our GPT-2, `alignment.modeling.attention.plan_document_groups`), else over each whole row."""
    import torch

    from alignment.modeling.attention import plan_document_groups
    from alignment.modeling.modeling_gpt2 import segments_from_positions

    rows, width = batch["input_ids"].shape
    scored = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    groups = None
    if "position_ids" in batch:
        starts = batch["position_ids"] == 0
        starts[:, 0] = True  # a row never continues the row before it
        first = starts.flatten().nonzero().flatten()
        documents = torch.diff(first, append=first.new_tensor([rows * width])).tolist()
        segments = segments_from_positions(batch["position_ids"]) if grouped_attention else None
        groups = plan_document_groups(segments) if segments is not None else None  # the count, not the tensors
    else:
        mask = batch.get("attention_mask")
        documents = mask.sum(dim=1).tolist() if mask is not None else [width] * rows
    model = Work(sum(documents), scored, sum(n * n for n in documents))
    head_rows = rows * (width - 1) if head_on_every_position else scored
    if groups is not None:
        attention = len(groups) * max(sum(n for _, n in group) for group in groups) ** 2
    else:
        attention = rows * width * width
    return model, Work(rows * width, head_rows, attention)


def matmul_peak(
    dtype: str = "fp32", seconds: float = 2.0, max_size: int | None = None, device: str | None = None
) -> dict[str, Any]:
    """The best FLOP/s of `torch.matmul` on square matrices in `dtype` ("fp32" or "bf16") on `device` (default: the
    GPU where there is one, as the sides train there, else the CPU with this process's threads).

    The size doubles from 512 while one product takes under an eighth of `seconds` (so a slow dtype, bf16 on a CPU
    without bf16 instructions, stays at a small size), up to `max_size` (4096 on a CPU, 16384 on a GPU), then that
    size is timed for about `seconds`."""
    import torch

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    max_size = max_size or (16384 if device.type == "cuda" else 4096)
    generator = torch.Generator().manual_seed(0)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(a, b) -> float:
        synchronize()
        start = time.perf_counter()
        torch.matmul(a, b)
        synchronize()
        return time.perf_counter() - start

    size = 512
    while True:
        a, b = (torch.randn(size, size, generator=generator).to(device, torch_dtype) for _ in range(2))
        timed(a, b)  # warm-up: first-call set-up, page faults
        one = timed(a, b)
        if one >= seconds / 8 or size >= max_size:
            break
        size *= 2
    best, start = one, time.perf_counter()
    while time.perf_counter() - start < seconds:
        best = min(best, timed(a, b))
    return {
        "dtype": dtype,
        "device": device.type,
        "size": size,
        "threads": torch.get_num_threads(),
        "flops_per_second": 2 * size**3 / best,
    }


def utilisation(flops_per_step: float, seconds_per_step: float, peak_flops_per_second: float) -> float:
    """The share of the peak a step uses: its FLOPs per second ÷ the peak."""
    return flops_per_step / seconds_per_step / peak_flops_per_second
