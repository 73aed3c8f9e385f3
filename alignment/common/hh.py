"""The Anthropic HH-RLHF dialogue format: `\n\nHuman: ... \n\nAssistant: ...`, the assignment's prompt format."""

from __future__ import annotations

HH_HUMAN = "\n\nHuman:"
HH_ASSISTANT = "\n\nAssistant:"


def split_hh_dialogue(text: str) -> tuple[str, str]:
    """Split an hh-rlhf dialogue into the prompt (through the last "\\n\\nAssistant:") and the final reply, which
    keeps its leading space so prompt + reply == text. Raises ValueError when there is no assistant turn."""
    cut = text.rfind(HH_ASSISTANT)
    if cut < 0:
        raise ValueError(f"no {HH_ASSISTANT!r} turn in dialogue: {text[:80]!r}")
    cut += len(HH_ASSISTANT)
    return text[:cut], text[cut:]
