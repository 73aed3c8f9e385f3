"""Chat templates: the built-in `hh` and `chatml` Jinja templates, choosing one for a tokenizer, rendering prompts.

`hh` writes a conversation as Anthropic HH-RLHF text, the assignment's format, so conversational data trains exactly
like the HH strings our data pipeline produces:

    [user "Hi", assistant "Hello!", user "Bye"] + generation prompt  ->  "\\n\\nHuman: Hi\\n\\nAssistant: Hello!\\n\\nHuman: Bye\\n\\nAssistant:"

* The generation prompt is "\\n\\nAssistant:" without a trailing space and each message's content is written after
  one space, so the prompt ends where `split_hh_dialogue` cuts and the reply starts with its space, as in the data.
  TRL renders a prompt with the generation prompt and takes the completion as the rest of prompt + completion's
  rendering; with `hh` that rest is " reply", exactly the string pipeline's completion.
* A conversation that ends with an assistant message ends with the tokenizer's `eos_token`, because TRL appends
  EOS to string completions (SFT and DPO) but not to conversational ones: both kinds of data then train the same
  tokens and the model learns to stop. Earlier assistant turns have no EOS, as in HH text. Prompts (generation prompt
  added, or `continue_final_message`) never carry it.
* HH has no system role: a leading system message is written verbatim before the first "\\n\\nHuman:" (the way the
  HHH context-distillation prompt preceded the dialogue); a system message anywhere else, or any other role, raises.
* `{% generation %}` marks each assistant reply together with what ends it (the next "\\n\\nHuman:" or the final
  EOS) for TRL's `assistant_only_loss`: an HH model ends its turn by starting the user's. TRL's check that the
  end-of-turn is trained looks for an added token, so for multi-turn data it still warns; the warning is harmless.

`chatml` is `<|im_start|>role\\ncontent<|im_end|>\\n` per message with `<|im_start|>assistant\\n` as generation prompt;
its two tokens are added to the tokenizer as special tokens when missing, so the model's embeddings must grow
(`fit_model_to_tokenizer`).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

# Jinja string literals understand "\n", so the templates are raw strings: Jinja, not Python, reads the escapes.
HH_TEMPLATE = r"""{#- Anthropic HH-RLHF text; see alignment/modeling/chat_templates.py -#}
{%- for message in messages -%}
    {%- if message['role'] == 'system' -%}
        {%- if not loop.first -%}
            {{- raise_exception('hh chat template: a system message may only come first') -}}
        {%- endif -%}
        {{- message['content'] -}}
    {%- elif message['role'] == 'user' -%}
        {%- if loop.first or loop.previtem['role'] != 'assistant' -%}
            {{- '\n\nHuman:' -}}
        {%- endif -%}
        {%- if message['content'] -%}
            {{- ' ' + message['content'] -}}
        {%- endif -%}
    {%- elif message['role'] == 'assistant' -%}
        {{- '\n\nAssistant:' -}}
        {%- generation -%}
            {%- if message['content'] -%}
                {{- ' ' + message['content'] -}}
            {%- endif -%}
            {%- if loop.last -%}
                {%- if not add_generation_prompt -%}
                    {{- eos_token -}}
                {%- endif -%}
            {%- elif loop.nextitem['role'] == 'user' -%}
                {{- '\n\nHuman:' -}}
            {%- endif -%}
        {%- endgeneration -%}
    {%- else -%}
        {{- raise_exception('hh chat template: roles are system, user and assistant, not ' + message['role']) -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '\n\nAssistant:' -}}
{%- endif -%}"""

CHATML_TEMPLATE = r"""{%- for message in messages -%}
    {{- '<|im_start|>' + message['role'] + '\n' -}}
    {%- if message['role'] == 'assistant' -%}
        {%- generation -%}
            {{- message['content'] + '<|im_end|>' -}}
        {%- endgeneration -%}
    {%- else -%}
        {{- message['content'] + '<|im_end|>' -}}
    {%- endif -%}
    {{- '\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\n' -}}
{%- endif -%}"""

CHAT_TEMPLATES = {"hh": HH_TEMPLATE, "chatml": CHATML_TEMPLATE}
KEEP_TOKENIZERS_TEMPLATE = "tokenizer"
# Tokens that end an assistant turn: generation stops at them as at EOS (when the tokenizer has them).
END_OF_TURN_TOKENS = ("<|im_end|>",)
# `<|name|>` literals in a template: control tokens that must be single tokens, not BPE pieces.
CONTROL_TOKEN = re.compile(r"<\|[A-Za-z0-9_]+\|>")


def resolve_chat_template(choice: str | os.PathLike | None) -> str | None:
    """The Jinja source for `choice`: a built-in name (`hh`, `chatml`) or a path to a Jinja file; None for None or
    "tokenizer", which mean keeping the tokenizer's own template."""
    if choice is None or choice == KEEP_TOKENIZERS_TEMPLATE:
        return None
    name = os.fspath(choice)
    if name in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[name]
    path = Path(name).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    known = ", ".join([*CHAT_TEMPLATES, KEEP_TOKENIZERS_TEMPLATE])
    raise ValueError(f"chat_template {name!r} is neither a built-in template ({known}) nor a Jinja file")


def set_chat_template(tokenizer: PreTrainedTokenizerBase, choice: str | os.PathLike | None) -> list[int]:
    """Give `tokenizer` the chat template `choice` (see `resolve_chat_template`) and return the ids of the tokens
    this added: the template's `<|name|>` control tokens missing from the vocabulary, added as special tokens so they
    stay single tokens. When the list is not empty the model's embeddings must grow (`fit_model_to_tokenizer`)."""
    template = resolve_chat_template(choice)
    if template is None:
        return []
    vocabulary = tokenizer.get_vocab()
    missing = [token for token in dict.fromkeys(CONTROL_TOKEN.findall(template)) if token not in vocabulary]
    if missing:
        logger.info("Chat template %s: adding the special tokens %s", choice, ", ".join(missing))
        tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
    tokenizer.chat_template = template
    return tokenizer.convert_tokens_to_ids(missing)


def fit_model_to_tokenizer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> bool:
    """Grow the model's token embeddings (and its LM head, tied or not) to `len(tokenizer)` when the tokenizer has
    more tokens, and make generation stop at the template's end-of-turn tokens too. Returns whether it resized.

    New rows start at the old embeddings' mean (transformers' `mean_resizing`), a neutral start for tokens to learn.
    Embeddings already larger than the tokenizer (e.g. padded to a multiple of 64) are left as they are.
    """
    resized = model.get_input_embeddings().num_embeddings < len(tokenizer)
    if resized:
        model.resize_token_embeddings(len(tokenizer))
    stops = stop_token_ids(tokenizer)
    if getattr(model, "generation_config", None) is not None and len(stops) > 1:
        current = model.generation_config.eos_token_id
        current = [] if current is None else [current] if isinstance(current, int) else list(current)
        model.generation_config.eos_token_id = current + [i for i in stops if i not in current]
    return resized


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """EOS, then the end-of-turn tokens (`<|im_end|>`) the tokenizer has: replies stop at any of them."""
    vocabulary = tokenizer.get_vocab()
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return ids + [vocabulary[t] for t in END_OF_TURN_TOKENS if t in vocabulary and vocabulary[t] not in ids]


def is_conversation(value: Any) -> bool:
    """A non-empty list of messages (mappings with a role), as TRL's conversational rows hold."""
    return (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and len(value) > 0
        and all(isinstance(message, Mapping) and "role" in message for message in value)
    )


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str | Sequence[Mapping[str, Any]]) -> str:
    """The text a model is prompted with: a string as it is; a conversation through the tokenizer's chat template
    (the `hh` template when it has none), as TRL renders a prompt: with the generation prompt, or continuing the
    final message when that is the assistant's."""
    if isinstance(prompt, str):
        return prompt
    if not is_conversation(prompt):
        raise ValueError("a prompt is a string or a list of messages, each with a 'role' and a 'content'")
    messages = [dict(message) for message in prompt]
    continues = messages[-1]["role"] == "assistant"
    return tokenizer.apply_chat_template(
        messages,
        chat_template=None if tokenizer.chat_template else HH_TEMPLATE,
        tokenize=False,
        add_generation_prompt=not continues,
        continue_final_message=continues,
    )


__all__ = [
    "CHATML_TEMPLATE",
    "CHAT_TEMPLATES",
    "HH_TEMPLATE",
    "fit_model_to_tokenizer",
    "is_conversation",
    "render_prompt",
    "resolve_chat_template",
    "set_chat_template",
    "stop_token_ids",
]
