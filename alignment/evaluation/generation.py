"""Replies to prompts with the KV cache, greedy or sampled, stopping at end-of-text (or at a stop text). A prompt is
a string, used as it is, or a conversation (a list of messages), rendered through the tokenizer's chat template."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..modeling.chat_templates import render_prompt, stop_token_ids


def cut_at(text: str, stop: str | None) -> str:
    """`text` up to the first `stop` (e.g. HH_HUMAN: the model starting the user's next turn)."""
    return text.split(stop, 1)[0] if stop else text


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str | Sequence[Mapping[str, Any]]],
    *,
    max_new_tokens: int = 50,
    do_sample: bool = False,
    temperature: float = 0.9,
    top_k: int = 200,
    top_p: float = 1.0,
    num_return_sequences: int = 1,
    batch_size: int = 32,
    stop_at: str | None = None,
    progress: bool = False,
) -> list[list[str]]:
    """Replies to each prompt (left-padded batches, KV cache, stop at end-of-text or at the chat template's
    end-of-turn token such as `<|im_end|>`); one list per prompt. Conversations go through `render_prompt`.

    `stop_at` cuts each reply at the first occurrence of that text (e.g. `HH_HUMAN`); `progress` shows a tqdm bar.
    Greedy decoding gives one reply per prompt whatever `num_return_sequences` says. Seed with
    `transformers.set_seed` for reproducible samples.
    """
    model.eval()
    device = next(model.parameters()).device
    if not do_sample:
        num_return_sequences = 1
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    stops = stop_token_ids(tokenizer)
    settings = dict(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        num_return_sequences=num_return_sequences,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=stops if len(stops) > 1 else tokenizer.eos_token_id,
        use_cache=True,
    )
    if do_sample:
        settings.update(temperature=temperature, top_k=top_k, top_p=top_p)
    else:  # a checkpoint's generation_config may ask for sampling settings; greedy ignores them without warnings
        settings.update(temperature=None, top_k=None, top_p=None)
    prompts = [render_prompt(tokenizer, prompt) for prompt in prompts]
    replies: list[list[str]] = []
    starts = range(0, len(prompts), batch_size)
    try:
        for start in tqdm(starts, desc="generating", unit="batch", disable=not progress, leave=False):
            batch = tokenizer(list(prompts[start : start + batch_size]), return_tensors="pt", padding=True)
            output = model.generate(**batch.to(device), **settings)
            texts = tokenizer.batch_decode(output[:, batch["input_ids"].size(1) :], skip_special_tokens=True)
            texts = [cut_at(text, stop_at) for text in texts]
            replies += [texts[i : i + num_return_sequences] for i in range(0, len(texts), num_return_sequences)]
    finally:
        tokenizer.padding_side = padding_side
    return replies
