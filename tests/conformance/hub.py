"""An offline stand-in for the Hub repositories TRL's trainer tests use, so our adaptation of those tests can name
the same `trl-internal-testing/...` ids and run with no network.

- Models: each tiny model is built here (random weights, TRL's tiny sizes) and written into a Hugging Face cache
  folder in the Hub's own layout (`models--owner--name/refs/main`, `snapshots/<commit>/`), so `from_pretrained` on
  the id goes through the real Hub code path in offline mode. The tokenizer is GPT-2's (rebuilt offline, cut to its
  first 16,384 tokens: `VOCABULARY`) with the model family's special tokens added and the family's chat template as
  TRL ships it (`trl/chat_templates`), so TRL's template detection (e.g. for `assistant_only_loss`) behaves as it
  does on the real tiny models.
- Datasets: `load_dataset` answers the `trl-internal-testing/zen` configs from rows built here from the Zen of
  Python, split 17 train / 2 test as TRL's are; any other name goes to `datasets.load_dataset`.
"""

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
import transformers
from huggingface_hub import constants

from benchmarks.trl_comparison import cut_tokenizer

OWNER = "trl-internal-testing"
TEMPLATES = Path(__import__("trl").__file__).parent / "chat_templates"
CHATML = TEMPLATES / "qwen2_5.jinja"
# Special tokens as chat templates write them: <|im_start|>, <｜User｜> (DeepSeek), <start_of_turn>, [INST], ...
SPECIAL_TOKEN = re.compile(
    r"<\|[A-Za-z0-9_]{1,40}\|>|<｜[^｜<>]{1,40}｜>|</?(?:start_of_turn|end_of_turn|bos|eos|think|tool_call|sop)>"
    r"|\[/?INST\]|\[gMASK\]"
)
# GPT-2's first 16,383 tokens (the bytes and the merges that made the most common words) and end-of-text: the
# models' output layer, most of what a model 8 wide computes, is 3x narrower than over GPT-2's 50,257 tokens. Text
# is spelled in a few more, shorter tokens (Zen: 179 against 164); 16,384 is the smallest power of two at which TRL's
# packing tests pack the Zen rows into the 3 rows of 64 tokens they expect (2,048 made 4). TRL's own tiny models keep
# their families' tokenizers, whose output layers are wider still.
VOCABULARY = 16384
SMALL = dict(hidden_size=8, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, intermediate_size=32)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)


@dataclass
class TinyModel:
    """How one `trl-internal-testing/tiny-*` repository is rebuilt: config class and fields, chat template, tokens."""

    config_class: type
    fields: dict = field(default_factory=dict)
    template: str | None = "qwen2_5"  # a file of trl/chat_templates, or None for a base model with no template
    eos: str = "<|im_end|>"
    bos: str | None = None
    model_class: type = transformers.AutoModelForCausalLM
    fp32_params: tuple = ()  # parameter name fragments kept in float32, as the real checkpoint keeps them
    remote_code: dict | None = None  # a `trust_remote_code` repository: its config.json fields and code files


def _mistral_template():
    return (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
        "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
        "{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
    )


REPOSITORIES = {
    "tiny-Qwen2ForCausalLM-2.5": TinyModel(transformers.Qwen2Config),
    "tiny-Qwen3ForCausalLM": TinyModel(transformers.Qwen3Config, dict(head_dim=4), template="qwen3"),
    "tiny-Qwen3MoeForCausalLM": TinyModel(transformers.Qwen3MoeConfig, dict(head_dim=4, **MOE), template="qwen3"),
    "tiny-LlamaForCausalLM-3": TinyModel(
        transformers.LlamaConfig, template="llama3", eos="<|eot_id|>", bos="<|begin_of_text|>"
    ),
    "tiny-LlamaForCausalLM-3.1": TinyModel(
        transformers.LlamaConfig, template="llama3_1", eos="<|eot_id|>", bos="<|begin_of_text|>"
    ),
    "tiny-LlamaForCausalLM-3.2": TinyModel(
        transformers.LlamaConfig, template="llama3_2", eos="<|eot_id|>", bos="<|begin_of_text|>"
    ),
    "tiny-MistralForCausalLM-0.1": TinyModel(transformers.MistralConfig, template="mistral", eos="</s>", bos="<s>"),
    "tiny-MistralForCausalLM-0.2": TinyModel(transformers.MistralConfig, template="mistral", eos="</s>", bos="<s>"),
    "tiny-GemmaForCausalLM": TinyModel(
        transformers.GemmaConfig, dict(head_dim=4), template="gemma", eos="<end_of_turn>", bos="<bos>"
    ),
    "tiny-Gemma2ForCausalLM": TinyModel(
        transformers.Gemma2Config, dict(head_dim=4), template="gemma", eos="<end_of_turn>", bos="<bos>"
    ),
    "tiny-CohereForCausalLM": TinyModel(
        transformers.CohereConfig, template="cohere", eos="<|END_OF_TURN_TOKEN|>", bos="<BOS_TOKEN>"
    ),
    "tiny-Cohere2ForCausalLM": TinyModel(
        transformers.Cohere2Config, template="cohere2", eos="<|END_OF_TURN_TOKEN|>", bos="<BOS_TOKEN>"
    ),
    "tiny-Phi3ForCausalLM": TinyModel(transformers.Phi3Config, template="phi3", eos="<|end|>"),
    "tiny-Olmo3ForCausalLM": TinyModel(transformers.Olmo3Config),
    "tiny-GPTNeoXForCausalLM": TinyModel(transformers.GPTNeoXConfig, template=None, eos="<|endoftext|>"),
    "tiny-GptOssForCausalLM": TinyModel(
        transformers.GptOssConfig,
        dict(num_local_experts=4, num_experts_per_tok=2, head_dim=4),
        template="gptoss",
        eos="<|return|>",
    ),
    "tiny-Glm4MoeForCausalLM": TinyModel(
        transformers.Glm4MoeConfig,
        dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=1, head_dim=4),
        template="glm4moe",
        eos="<|endoftext|>",
    ),
    "tiny-DeepseekV3ForCausalLM": TinyModel(
        transformers.DeepseekV3Config,
        dict(
            n_routed_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            first_k_dense_replace=1,
            n_group=1,
            topk_group=1,
            kv_lora_rank=8,
            q_lora_rank=8,
            qk_rope_head_dim=4,
            qk_nope_head_dim=4,
            v_head_dim=4,
            num_key_value_heads=4,
        ),
        template="deepseekv3",
        eos="<｜end▁of▁sentence｜>",
        bos="<｜begin▁of▁sentence｜>",
    ),
    "tiny-Lfm2ForCausalLM": TinyModel(
        transformers.Lfm2Config, dict(full_attn_idxs=[1], block_multiple_of=8), template="lfm2"
    ),
    "tiny-Lfm2ForCausalLM-2.5": TinyModel(
        transformers.Lfm2Config, dict(full_attn_idxs=[1], block_multiple_of=8), template="lfm2_2_5"
    ),
    "tiny-NemotronHForCausalLM-nano": TinyModel(
        transformers.NemotronHConfig,
        dict(
            hidden_size=16,
            layers_block_type=["mamba", "attention", "moe"],
            mamba_num_heads=8,
            mamba_head_dim=4,
            n_groups=1,
            ssm_state_size=16,
            n_routed_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            moe_shared_expert_intermediate_size=32,
            use_mamba_kernels=False,
        ),
        template="nemotron_3_nano",
        fp32_params=("A_log", "mixer.D"),
    ),
}
REPOSITORIES["tiny-DeepseekV3ForCausalLM-0528"] = REPOSITORIES["tiny-DeepseekV3ForCausalLM"]
# A name with an owner is that repository itself: TRL tests clone the chat template of `Qwen/Qwen3-4B`.
REPOSITORIES["Qwen/Qwen3-4B"] = REPOSITORIES["tiny-Qwen3ForCausalLM"]
# TRL's tiny-RemoteForCausalLM: Llama under a custom `model_type`, so it loads only through the remote-code path.
REPOSITORIES["tiny-RemoteForCausalLM"] = TinyModel(
    transformers.LlamaConfig,
    template="llama3_2",
    eos="<|eot_id|>",
    bos="<|begin_of_text|>",
    remote_code={
        "config": {
            "model_type": "remote",
            "architectures": ["RemoteForCausalLM"],
            "auto_map": {
                "AutoConfig": "configuration_remote.RemoteConfig",
                "AutoModel": "modeling_remote.RemoteModel",
                "AutoModelForCausalLM": "modeling_remote.RemoteForCausalLM",
            },
        },
        "configuration_remote.py": (
            "from transformers import LlamaConfig\n\n\nclass RemoteConfig(LlamaConfig):\n    model_type = 'remote'\n"
        ),
        "modeling_remote.py": (
            "from transformers import LlamaForCausalLM, LlamaModel\n\nfrom .configuration_remote import RemoteConfig\n"
            "\n\nclass RemoteModel(LlamaModel):\n    config_class = RemoteConfig\n"
            "\n\nclass RemoteForCausalLM(LlamaForCausalLM):\n    config_class = RemoteConfig\n"
        ),
    },
)


def chat_template(name: str | None) -> str | None:
    if name is None:
        return None
    if name == "mistral":
        return _mistral_template()
    return (TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")


def tokenizer_for(spec: TinyModel, gpt2_tokenizer):
    """GPT-2's BPE, cut to VOCABULARY tokens, with the family's special tokens (found in its chat template) and its
    eos/bos/pad."""
    tokenizer = cut_tokenizer(transformers.AutoTokenizer.from_pretrained(gpt2_tokenizer.name_or_path), VOCABULARY)
    template = chat_template(spec.template)
    specials = sorted(set(SPECIAL_TOKEN.findall(template or "")) | {spec.eos} | ({spec.bos} if spec.bos else set()))
    tokenizer.add_special_tokens({"additional_special_tokens": [t for t in specials if t != "<|endoftext|>"]})
    tokenizer.eos_token = spec.eos
    tokenizer.pad_token = "<|endoftext|>"
    if spec.bos:
        tokenizer.bos_token = spec.bos
    tokenizer.chat_template = template
    return tokenizer


def build(name: str, folder: Path, gpt2_tokenizer) -> None:
    """Write one tiny repository (config, bf16 weights, tokenizer, generation config) into `folder`."""
    spec = REPOSITORIES[name]
    tokenizer = tokenizer_for(spec, gpt2_tokenizer)
    ids = dict(
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id if spec.bos else tokenizer.eos_token_id,
    )
    config = spec.config_class(**{**SMALL, **spec.fields, **ids})
    torch.manual_seed(int(hashlib.sha256(name.encode()).hexdigest(), 16) % 2**31)
    model = spec.model_class.from_config(config).to(torch.bfloat16)
    for param_name, param in model.named_parameters():
        if any(fragment in param_name for fragment in spec.fp32_params):
            param.data = param.data.float()
    model.generation_config = transformers.GenerationConfig(
        eos_token_id=ids["eos_token_id"], pad_token_id=ids["pad_token_id"], bos_token_id=ids["bos_token_id"]
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if spec.remote_code:  # the Llama checkpoint, re-labelled as the custom class its code files define
        files = dict(spec.remote_code)
        config_path = folder / "config.json"
        config_path.write_text(json.dumps(json.loads(config_path.read_text()) | files.pop("config"), indent=2))
        for file_name, source in files.items():
            (folder / file_name).write_text(source)


def install(cache: Path, gpt2_tokenizer, names=None) -> Path:
    """Build the tiny repositories into `cache` in the Hub cache layout and point huggingface_hub at it."""
    for name in names or REPOSITORIES:
        repo = cache / f"models--{(name if '/' in name else f'{OWNER}/{name}').replace('/', '--')}"
        commit = hashlib.sha1(name.encode()).hexdigest()
        snapshot = repo / "snapshots" / commit
        if not snapshot.is_dir():
            staging = snapshot.with_name(f".{commit}.{os.getpid()}")
            build(name, staging, gpt2_tokenizer)
            try:
                staging.rename(snapshot)  # whole or absent: an interrupted build is rebuilt next time
            except OSError:  # another test process (pytest -n) finished it first; its copy is just as good
                if not snapshot.is_dir():
                    raise
                shutil.rmtree(staging, ignore_errors=True)
            (repo / "refs").mkdir(parents=True, exist_ok=True)
            (repo / "refs" / "main").write_text(commit)
    constants.HF_HUB_CACHE = str(cache)
    os.environ["HF_HUB_CACHE"] = str(cache)
    return cache


# The Zen of Python, as (prompt, completion, a wrong completion, question, answer): every zen config comes from these.
ZEN = [
    ("Beautiful is better than", " ugly.", " the moon.", "What is better than ugly?", "Beautiful."),
    ("Explicit is", " better than implicit.", " worse than implicit.", "What is better than implicit?", "Explicit."),
    ("Simple is better", " than complex.", " than simple.", "What is better than complex?", "Simple."),
    ("Complex", " is better than complicated.", " is a word.", "What is better than complicated?", "Complex."),
    ("Flat is better than", " nested.", " round.", "What is better than nested?", "Flat."),
    ("Sparse is better", " than dense.", " than nothing.", "What is better than dense?", "Sparse."),
    ("Readability", " counts.", " is overrated.", "What counts?", "Readability."),
    (
        "Special cases aren't special",
        " enough to break the rules.",
        " enough to become unicorns.",
        "Are special cases enough to break the rules?",
        "No, special cases aren't special enough to break the rules.",
    ),
    ("Although practicality beats", " purity.", " everything.", "What beats purity?", "Practicality."),
    ("Errors should never", " pass silently.", " be fixed.", "What should never pass silently?", "Errors."),
    ("Unless explicitly", " silenced.", " forgotten.", "When can errors pass silently?", "When explicitly silenced."),
    (
        "In the face of ambiguity, refuse",
        " the temptation to guess.",
        " to eat.",
        "What should you do in the face of ambiguity?",
        "Refuse the temptation to guess.",
    ),
    (
        "There should be one-- and preferably",
        " only one --obvious way to do it.",
        " many ways to do it.",
        "How many ways should there be to do it?",
        "One, and preferably only one.",
    ),
    (
        "Although that way may not be obvious at first unless you're",
        " Dutch.",
        " a time traveler.",
        "For whom may the way not be obvious at first?",
        "Dutch.",
    ),
    ("Now is", " better than never.", " not a good time.", "What is better than never?", "Now is better than never."),
    (
        "Although never is often",
        " better than *right* now.",
        " not even a possibility.",
        "Is never better than *right* now?",
        "Yes, often.",
    ),
    (
        "If the implementation is hard to explain,",
        " it's a bad idea.",
        " it's a good idea.",
        "What does it mean if the implementation is hard to explain?",
        "It means it's a bad idea.",
    ),
    (
        "If the implementation is easy",
        " to explain, it may be a good idea.",
        " it's probably magic.",
        "What does it mean if the implementation is easy to explain?",
        "It means it may be a good idea.",
    ),
    (
        "Namespaces are one honking great",
        " idea -- let's do more of those!",
        " watermelon -- let's plant some!",
        "Any great ideas?",
        "Namespaces are one honking great idea.",
    ),
]


def _user(text):
    return [{"role": "user", "content": text}]


def _assistant(text):
    return [{"role": "assistant", "content": text}]


def zen_rows(config: str) -> list[dict]:
    """The rows of one `trl-internal-testing/zen` config."""
    rows = []
    for i, (prompt, completion, wrong, question, answer) in enumerate(ZEN):
        other_answer = ZEN[(i + 1) % len(ZEN)][4]
        rows.append(
            {
                "standard_language_modeling": {"text": prompt + completion},
                "standard_prompt_only": {"prompt": prompt},
                "standard_prompt_completion": {"prompt": prompt, "completion": completion},
                "standard_preference": {"prompt": prompt, "chosen": completion, "rejected": wrong},
                "standard_implicit_prompt_preference": {"chosen": prompt + completion, "rejected": prompt + wrong},
                "standard_unpaired_preference": {
                    "prompt": prompt,
                    "completion": completion if i % 3 else wrong,
                    "label": bool(i % 3),
                },
                "conversational_language_modeling": {"messages": _user(question) + _assistant(answer)},
                "conversational_prompt_only": {"prompt": _user(question)},
                "conversational_prompt_completion": {"prompt": _user(question), "completion": _assistant(answer)},
                "conversational_preference": {
                    "prompt": _user(question),
                    "chosen": _assistant(answer),
                    "rejected": _assistant(other_answer),
                },
                "conversational_implicit_prompt_preference": {
                    "chosen": _user(question) + _assistant(answer),
                    "rejected": _user(question) + _assistant(other_answer),
                },
                "conversational_unpaired_preference": {
                    "prompt": _user(question),
                    "completion": _assistant(answer if i % 3 else other_answer),
                    "label": bool(i % 3),
                },
            }[config]
        )
    return rows


# `trl-internal-testing/harmony` (TRL's scripts/generate_harmony_dataset.py): the zen questions and answers, each
# answer with this reasoning, and gpt-oss chat template arguments cycling through the reasoning efforts.
HARMONY_THINKING = [
    "Beauty improves clarity and appeal.",
    "Clarity avoids confusion.",
    "Simplicity is easier to manage.",
    "Complexity has structure; complication doesn’t.",
    "Flat structures are easier to read.",
    "Spacing aids understanding.",
    "Readable code lasts longer.",
    "Consistency is more valuable.",
    "Real-world needs outweigh ideals.",
    "Silent errors cause hidden issues.",
    "Silence must be intentional.",
    "Guessing leads to wrong choices.",
    "One way reduces confusion.",
    "A playful nod to Python’s creator.",
    "Action is better than endless delay.",
    "Rushed action can be worse.",
    "Good ideas should be clear.",
    "Clarity suggests soundness.",
    "Namespaces prevent conflicts.",
]


def harmony_rows(config: str) -> list[dict]:
    """The rows of one `trl-internal-testing/harmony` config (`language_modeling`, `prompt_completion` or
    `preference`, whose rejected reply is the next question's answer)."""
    rows = []
    for i, ((_, _, _, question, answer), thinking) in enumerate(zip(ZEN, HARMONY_THINKING, strict=True)):
        reply = [{"role": "assistant", "thinking": thinking, "content": answer}]
        wrong = [{"role": "assistant", "thinking": "This answers another question.", "content": ZEN[i - 1][4]}]
        kwargs = {
            "reasoning_effort": ("low", "medium", "high")[i % 3],
            "model_identity": "You are Tiny ChatGPT, a tiny language model.",
        }
        rows.append(
            {
                "language_modeling": {"messages": _user(question) + reply},
                "prompt_completion": {"prompt": _user(question), "completion": reply},
                "preference": {"prompt": _user(question), "chosen": reply, "rejected": wrong},
            }[config]
            | {"chat_template_kwargs": kwargs}
        )
    return rows


def _tool(name, description, returns, **parameters):
    """A tool's JSON schema as `transformers.utils.get_json_schema` writes it; parameters are (type, description)."""
    properties = {key: {"type": kind, "description": text} for key, (kind, text) in parameters.items()}
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {"type": "object", "properties": properties, "required": list(parameters)},
            "return": returns,
        },
    }


TOOLS = {
    "start_timer": _tool(
        "start_timer",
        "Starts a timer for the specified duration in seconds.",
        {"type": "integer", "description": "The duration set for the timer."},
        duration=("integer", "Duration in seconds to set the timer for."),
    ),
    "get_current_time": _tool(
        "get_current_time",
        "Returns the current time in the specified location.",
        {"type": "string", "description": "The current time in the specified location."},
        location=("string", "The location for which to get the current time."),
    ),
    "get_air_quality_index": _tool(
        "get_air_quality_index",
        "Returns the air quality index for the specified location.",
        {"type": "integer", "description": "The air quality index for the specified location."},
        location=("string", "The location for which to get the air quality index."),
    ),
    "play_music": _tool(
        "play_music",
        "Plays music by the specified title and artist.",
        {"type": "object", "description": "A dictionary indicating the status of the music playback."},
        title=("string", "The title of the music to play."),
        artist=("string", "The artist of the music to play."),
    ),
    "get_weather_forecast": _tool(
        "get_weather_forecast",
        "Returns the weather forecast for the specified city and date.",
        {"type": "object", "description": "A dictionary containing the temperature and weather condition."},
        city=("string", "The city for which to get the weather forecast."),
        date=("string", "The date for which to get the weather forecast."),
    ),
    "control_light": _tool(
        "control_light",
        "Controls the light in the specified room.",
        {"type": "object", "description": "A dictionary indicating the state of the light."},
        room=("string", "The room where the light should be controlled."),
        state=("string", 'The desired state of the light ("on" or "off").'),
    ),
    "create_reminder": _tool(
        "create_reminder",
        "Creates a reminder for the specified time and note.",
        {"type": "string", "description": "A confirmation message indicating that the reminder has been set."},
        time=("string", "The time for the reminder."),
        note=("string", "The note for the reminder."),
    ),
    "get_wind_conditions": _tool(
        "get_wind_conditions",
        "Returns the wind conditions for the specified city.",
        {
            "type": "array",
            "prefixItems": [{"type": "integer"}, {"type": "string"}],
            "description": "A tuple containing the wind speed and direction.",
        },
        city=("string", "The city for which to get the wind conditions."),
        unit=("string", 'The unit of measurement for the wind speed (e.g., "mph").'),
    ),
}
# (request, tool called, its arguments, tool response, final answer, tools offered): TRL's toolcall rows.
TOOLCALLS = [
    ("Set a timer for 10 minutes.", "start_timer", {"duration": 600}, "600", "Timer set for 10 minutes.",
     ["start_timer", "create_reminder"]),
    ("What time is it in Tokyo?", "get_current_time", {"location": "Tokyo"}, "06:22:48",
     "The current time in Tokyo is 06:22 AM.", ["get_current_time"]),
    ("Is the air clean today in Lisbon?", "get_air_quality_index", {"location": "Lisbon, Portugal"}, "53",
     "The air quality is moderate.", ["get_air_quality_index", "get_weather_forecast", "get_wind_conditions"]),
    ("Play some music.", "play_music", {"title": "Take Five", "artist": "Dave Brubeck"}, "{'status': 'Playing'}",
     "Enjoy the jazz tunes!", ["play_music", "control_light"]),
    ("What's the weather like tomorrow in Berlin?", "get_weather_forecast", {"city": "Berlin", "date": "2025-06-16"},
     "{'temperature': 22, 'condition': 'partly cloudy'}", "Tomorrow in Berlin will be partly cloudy with a high of 22°C.",
     ["get_weather_forecast", "get_wind_conditions"]),
    ("Turn on the living room lights.", "control_light", {"room": "living room", "state": "on"}, "{'state': 'on'}",
     "The living room lights are now on.", ["control_light"]),
    ("Remind me to call mom at 7 PM.", "create_reminder", {"time": "19:00", "note": "Call mom"}, "Reminder set",
     "Okay, I'll remind you to call mom at 7 PM.", ["start_timer", "create_reminder"]),
    ("How strong is the wind in Chicago right now?", "get_wind_conditions", {"city": "Chicago", "unit": "mph"},
     "(14, 'NW')", "The wind in Chicago is blowing at 14 mph from the northwest.",
     ["get_weather_forecast", "get_wind_conditions"]),
]  # fmt: skip


def toolcall_rows(config: str) -> list[dict]:
    """The rows of `trl-internal-testing/toolcall`'s `language_modeling` config as the Hub serves it: messages with
    a tool call and its response, `tools` a JSON string (the tests `json.loads` it); `preference`: the request as
    prompt, the call, response and answer as chosen, an answer with no call (the next row's) as rejected."""
    if config not in ("language_modeling", "preference"):
        raise ValueError(f"the toolcall stand-in has no config {config!r}")
    rows = []
    for i, (request, tool, arguments, response, answer, offered) in enumerate(TOOLCALLS):
        call = {"type": "function", "function": {"name": tool, "arguments": arguments}}
        prompt = [{"role": "user", "content": request}]
        chosen = [
            {"role": "assistant", "tool_calls": [call]},
            {"role": "tool", "name": tool, "content": response},
            {"role": "assistant", "content": answer},
        ]
        tools = json.dumps([TOOLS[name] for name in offered])
        if config == "language_modeling":
            rows.append({"messages": prompt + chosen, "tools": tools})
        else:
            rejected = [{"role": "assistant", "content": TOOLCALLS[i - 1][4]}]
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "tools": tools})
    return rows


DATASETS = {"zen": zen_rows, "harmony": harmony_rows, "toolcall": toolcall_rows}


def load_dataset(path, name=None, *, split=None, streaming=False, **kwargs):
    """`datasets.load_dataset`, answering the `trl-internal-testing/` datasets of `DATASETS` from rows built here,
    split 90/10 unshuffled as TRL's scripts split them (zen: 17 train rows, 2 test rows)."""
    owner, _, dataset = path.partition("/")
    if owner != OWNER or dataset not in DATASETS:
        return datasets.load_dataset(path, name, split=split, streaming=streaming, **kwargs)
    if kwargs:
        raise TypeError(f"the {dataset} stand-in does not take {sorted(kwargs)}")
    if split is not None and "[:" in split:  # "train[:2]": the split's first rows, as `datasets` slices them
        split, _, count = split.partition("[:")
        return load_dataset(path, name, split=split).select(range(int(count.rstrip("]"))))
    whole = datasets.Dataset.from_list(DATASETS[dataset](name))
    splits = whole.train_test_split(test_size=0.1, shuffle=False)
    if streaming:
        splits = datasets.IterableDatasetDict({k: v.to_iterable_dataset() for k, v in splits.items()})
    return splits if split is None else splits[split]
