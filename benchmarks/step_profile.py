"""Where a training step's time goes: torch.profiler's self CPU time of every op, in a few groups.

An event's self time excludes the events it calls, so the groups add up to the steps' wall time. The self time of
events that are not aten ops (autograd nodes, record_function ranges such as ProfilerStep#) is the Python and
framework code run between ops (the Trainer, TRL, accelerate, our trainers' Python): its own line. Ops run under the
optimizer's step or the data loader's `__next__` are counted there, whatever they are. The profiler's own overhead
inflates small ops, so the shares are a guide, not a measurement of the unprofiled step.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

OPTIMIZER, DATA = "optimizer (and gradient clipping)", "data collation"
ELEMENTWISE, BETWEEN = "elementwise and reductions", "between ops (Python, framework)"
# (group, pattern of op names), the first match wins; ops under the optimizer or the data loader are sorted first
GROUPS = (
    ("matmul", r"aten::(mm|addmm|bmm|baddbmm|addbmm|linear|matmul|_addmm_activation|dot|mv|\w*mkldnn\w*)"),
    ("attention", r".*attention.*"),
    ("softmax / log-softmax", r".*(softmax|logsumexp|cross_entropy|nll_loss).*"),
    ("norms and activations", r".*(layer_norm|rms_norm|gelu|silu|tanh|sigmoid).*|aten::(rsqrt|pow)\w*"),
    ("embedding", r".*embedding.*"),
    (
        "copies, indexing, allocation",
        r"aten::(copy_|_to_copy|to|clone|contiguous|cat|stack|index\w*|gather\w*|"
        r"scatter\w*|masked_\w+|where|empty\w*|zeros\w*|ones\w*|full\w*|new_\w+|fill_|zero_|repeat\w*|"
        r"constant_pad_nd|pad|slice\w*|select\w*|narrow|view|_unsafe_view|reshape|flatten|expand\w*|transpose|"
        r"permute|t|split\w*|chunk|unbind|squeeze_?|unsqueeze_?|as_strided\w*|resize_|detach_?|alias|lift_fresh|"
        r"nonzero|arange|tril\w*|triu\w*)",
    ),
    (ELEMENTWISE, r"aten::\w+"),  # every other aten op: add, mul, sum, exp, comparisons, ...
)


def op_group(name: str, ancestors: tuple[str, ...] = ()) -> str:
    """The group of an op named `name`, run inside the record_function ranges or ops `ancestors` (innermost first).
    Events that are not aten ops (autograd nodes, record_function ranges such as ProfilerStep#) have as self time
    the Python and framework code they run between ops."""
    scopes = (name, *ancestors)
    if any(scope.startswith("Optimizer.") for scope in scopes) or "_foreach_" in name:
        return OPTIMIZER  # torch's "Optimizer.step#AdamW.step" and "Optimizer.zero_grad#..."; clipping's foreach norms
    if any("DataLoader" in scope for scope in scopes):
        return DATA  # "enumerate(DataLoader)#_SingleProcessDataLoaderIter.__next__": the collator runs inside
    for group, pattern in GROUPS:
        if re.fullmatch(pattern, name):
            return group
    return BETWEEN


def summarise(events: Any, steps: int, wall_seconds: float, top: int = 2) -> list[dict[str, Any]]:
    """Per group: milliseconds per step, share of the steps' wall time and the `top` costliest ops, costliest group
    first, then the wall time under no event. `events`: a profiler's `events()` (FunctionEvents with `cpu_parent`)."""
    totals: dict[str, float] = defaultdict(float)
    by_op: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for event in events:
        if getattr(event, "device_type", None) is not None and "CPU" not in str(event.device_type):
            continue
        ancestors, parent = [], event.cpu_parent
        while parent is not None:
            ancestors.append(parent.name)
            parent = parent.cpu_parent
        group = op_group(event.name, tuple(ancestors))
        self_us = event.self_cpu_time_total
        totals[group] += self_us
        by_op[group][event.name] += self_us
    inside = sum(totals.values()) / 1e6
    rows = [
        {
            "group": group,
            "ms_per_step": 1e3 * us / 1e6 / steps,
            "share": us / 1e6 / wall_seconds,
            "top_ops": [name for name, _ in sorted(by_op[group].items(), key=lambda item: -item[1])[:top]],
        }
        for group, us in sorted(totals.items(), key=lambda item: -item[1])
    ]
    outside = wall_seconds - inside  # not under any profiled event: the step boundaries' own code
    rows.append({"group": "not under any event", "ms_per_step": 1e3 * outside / steps, "share": outside / wall_seconds,
                 "top_ops": []})  # fmt: skip
    return rows


def print_profile(title: str, rows: list[dict[str, Any]]) -> None:
    print(f"\nwhere the time goes: {title}")
    print(f"{'group':<34}{'ms/step':>10}{'share':>8}  top ops (self CPU time)")
    for row in rows:
        ops = ", ".join(name.removeprefix("aten::")[:40] for name in row["top_ops"])
        print(f"{row['group']:<34}{row['ms_per_step']:>10.1f}{row['share']:>8.1%}  {ops}")
