"""Our GPT-2 against transformers' GPT-2 with the same weights: logits, padding, packing, cache, generation."""

import importlib
import json
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import alignment
from alignment import AlignmentGPT2Config, AlignmentGPT2ForCausalLM, AlignmentGPT2Model
from tests.conftest import TINY


@pytest.fixture
def ours(gpt2_checkpoint):
    return AlignmentGPT2ForCausalLM.from_pretrained(gpt2_checkpoint)


def batch(seed=0, b=3, t=10, vocab=TINY["vocab_size"]):
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


def padded(side):
    ids = batch()
    mask = torch.ones_like(ids)
    if side == "right":
        mask[1, -3:] = 0
        mask[2, -7:] = 0
    else:
        mask[1, :3] = 0
        mask[2, :7] = 0
    return ids.masked_fill(mask == 0, 0), mask


def positions(mask):
    return (mask.cumsum(-1) - 1).clamp(min=0)


def test_converted_checkpoint_has_the_same_weights(ours, hf_gpt2):
    assert isinstance(ours, AlignmentGPT2ForCausalLM)
    assert ours.config.model_type == "alignment_gpt2" and ours.config.n_layer == TINY["n_layer"]
    hf = hf_gpt2.state_dict()
    ours_sd = ours.state_dict()
    torch.testing.assert_close(
        ours_sd["transformer.h.1.attn.c_attn.weight"], hf["transformer.h.1.attn.c_attn.weight"].t()
    )
    torch.testing.assert_close(ours_sd["transformer.wte.weight"], hf["transformer.wte.weight"])
    assert ours.lm_head.weight.data_ptr() == ours.transformer.wte.weight.data_ptr()  # tied


@pytest.mark.parametrize("side", ["right", "left"])
def test_logits_match_transformers(ours, hf_gpt2, side):
    ids, mask = padded(side)
    with torch.no_grad():
        expected = hf_gpt2(ids, attention_mask=mask, position_ids=positions(mask)).logits
        got = ours(ids, attention_mask=mask).logits
    real = mask.bool()
    assert (got[real] - expected[real]).abs().max().item() <= 1e-4


def test_logits_match_transformers_without_mask(ours, hf_gpt2):
    ids = batch()
    with torch.no_grad():
        assert (ours(ids).logits - hf_gpt2(ids).logits).abs().max().item() <= 1e-4


def sequence_logprobs(model, ids, mask):
    logits = model(ids, attention_mask=mask).logits[:, :-1]
    return torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_left_padding_gives_the_unpadded_logprobs(gpt2_checkpoint, implementation):
    model = AlignmentGPT2ForCausalLM.from_pretrained(gpt2_checkpoint, attn_implementation=implementation)
    ids = batch(b=1, t=8)
    padded_ids = torch.cat([torch.zeros(1, 5, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 8, dtype=torch.long)], dim=1)
    with torch.no_grad():
        alone = sequence_logprobs(model, ids, torch.ones_like(ids))
        with_pad = sequence_logprobs(model, padded_ids, mask)[:, 5:]
    torch.testing.assert_close(with_pad, alone, atol=1e-5, rtol=0)


def test_packed_documents_do_not_see_each_other(ours):
    a, b = batch(1, b=1, t=6), batch(2, b=1, t=4)
    packed = torch.cat([a, b], dim=1)
    segments = torch.tensor([[0] * 6 + [1] * 4])
    restarted_positions = torch.tensor([list(range(6)) + list(range(4))])
    with torch.no_grad():
        separate = torch.cat([ours(a).logits, ours(b).logits], dim=1)
        by_segments = ours(packed, segment_ids=segments).logits
        by_positions = ours(packed, position_ids=restarted_positions).logits  # TRL's padding-free format
        unpacked = ours(packed).logits
    torch.testing.assert_close(by_segments, separate, atol=1e-5, rtol=0)
    torch.testing.assert_close(by_positions, separate, atol=1e-5, rtol=0)
    assert (unpacked[:, 6:] - separate[:, 6:]).abs().max() > 1e-3  # without the mask the second one sees the first


def test_many_packed_documents_attend_in_short_rows_with_the_dense_results(ours, monkeypatch):
    """TRL's padding-free row of many documents: our GPT-2 attends within short rows of whole documents; logits and
    gradients are those of the dense block-diagonal mask and of each document alone."""
    kernel = importlib.import_module("alignment.modeling.attention")  # the package exports a function of that name
    gpt2 = importlib.import_module("alignment.modeling.modeling_gpt2")
    lengths = [5, 3, 7, 2, 6, 1, 4]
    documents = [batch(10 + i, b=1, t=n) for i, n in enumerate(lengths)]
    packed = torch.cat(documents, dim=1)
    restarted_positions = torch.cat([torch.arange(n) for n in lengths])[None]
    assert kernel.group_documents(gpt2.segments_from_positions(restarted_positions)) is not None

    def logits_and_grads():
        ours.zero_grad()
        logits = ours(packed, position_ids=restarted_positions).logits
        logits.square().mean().backward()
        return logits.detach(), [p.grad.clone() for p in ours.parameters()]

    grouped, grouped_grads = logits_and_grads()
    monkeypatch.setattr(kernel, "GROUPING_MIN_SAVING", float("inf"))  # never regroup: one dense mask
    dense, dense_grads = logits_and_grads()
    with torch.no_grad():
        separate = torch.cat([ours(d).logits for d in documents], dim=1)
    torch.testing.assert_close(grouped, separate, atol=1e-5, rtol=0)
    torch.testing.assert_close(grouped, dense, atol=1e-5, rtol=0)
    for got, expected in zip(grouped_grads, dense_grads):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_tokens_without_padding_attend_in_the_rows_of_their_layout(ours):
    """`attention_layout`: the real tokens as one row, attention in padded rows laid out apart: the logits of the
    padded rows at their real slots; a layout without its rows' mask or with a KV cache is refused."""
    ids, mask = padded("right")
    visible = (mask[:, None, :, None] & mask[:, None, None, :]).bool() | torch.eye(10, dtype=torch.bool)
    real = mask.bool()
    layout = torch.full_like(ids, -1).masked_scatter_(real, torch.arange(int(real.sum())))
    with torch.no_grad():
        rows = ours(ids, attention_mask=visible, position_ids=positions(mask)).logits
        free = ours(ids[real][None], attention_mask=visible, position_ids=positions(mask)[real][None],
                    attention_layout=layout).logits  # fmt: skip
    torch.testing.assert_close(free[0], rows[real], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="rows' boolean"):
        ours(ids[real][None], position_ids=positions(mask)[real][None], attention_layout=layout)
    with pytest.raises(ValueError, match="holds 20 tokens, not the 19 given"):
        ours(ids[real][None][:, 1:], attention_mask=visible, position_ids=positions(mask)[real][None][:, 1:],
             attention_layout=layout)  # fmt: skip
    with pytest.raises(ValueError, match="KV cache"):
        ours(ids[real][None], attention_mask=visible, position_ids=positions(mask)[real][None],
             attention_layout=layout, use_cache=True)  # fmt: skip


def keep_every_activation(pre_activation, activation):  # saved-tensor hooks that change nothing
    return (lambda saved: saved), (lambda packed: packed)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora-on-the-mlp"])
def test_the_mlp_recomputes_gelu_in_backward_with_the_same_gradients(gpt2_checkpoint, monkeypatch, lora):
    """The GELU output is not kept for the backward pass (the projection's saved input is recomputed from GELU's
    own), and every gradient is what keeping it gives, LoRA adapters on the MLP's projections included."""
    import weakref

    import peft

    gpt2 = importlib.import_module("alignment.modeling.modeling_gpt2")
    model = AlignmentGPT2ForCausalLM.from_pretrained(gpt2_checkpoint).train()
    if lora:
        lora_config = peft.LoraConfig(r=4, target_modules=["c_fc", "mlp.c_proj"], init_lora_weights=False)
        model = peft.get_peft_model(model, lora_config)
    ids = batch(5, b=2, t=12)
    gelu_outputs = []
    gelu = torch.nn.functional.gelu

    def recorded_gelu(*args, **kwargs):
        out = gelu(*args, **kwargs)
        gelu_outputs.append(weakref.ref(out))
        return out

    def grads():
        model.zero_grad()
        gelu_outputs.clear()
        with monkeypatch.context() as patch:
            patch.setattr(torch.nn.functional, "gelu", recorded_gelu)
            logits = model(input_ids=ids, use_cache=False).logits
        kept = sum(ref() is not None for ref in gelu_outputs[: TINY["n_layer"]])
        logits.square().mean().backward()
        return kept, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    kept, recomputed = grads()
    monkeypatch.setattr(gpt2, "gelu_recomputed_when_saved", keep_every_activation)
    kept_without, stored = grads()
    assert (kept, kept_without) == (0, TINY["n_layer"])  # freed after the forward; without the hooks, kept
    assert recomputed.keys() == stored.keys() and len(stored) > 0
    for name, grad in stored.items():
        torch.testing.assert_close(recomputed[name], grad, atol=0, rtol=0, msg=name)


def test_kv_cache_matches_a_full_forward(ours):
    ids, mask = padded("left")
    with torch.no_grad():
        full = ours(ids, attention_mask=mask).logits
        first = ours(ids[:, :6], attention_mask=mask[:, :6], use_cache=True)
        cache = first.past_key_values
        assert isinstance(cache, transformers.DynamicCache) and cache.get_seq_length() == 6
        steps = [first.logits]
        for t in range(6, ids.size(1)):
            out = ours(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
    incremental = torch.cat(steps, dim=1)
    real = mask.bool()
    torch.testing.assert_close(incremental[real], full[real], atol=1e-5, rtol=0)


def test_greedy_generation_matches_transformers(ours, hf_gpt2):
    prompt, mask = padded("left")
    settings = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        expected = hf_gpt2.generate(prompt, attention_mask=mask, **settings)
        got = ours.generate(prompt, attention_mask=mask, **settings)
    assert torch.equal(got, expected)


def test_generation_stops_at_eos_and_samples(ours):
    prompt = batch(b=1, t=5)
    with torch.no_grad():
        greedy = ours.generate(prompt, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
        eos = int(greedy[0, 5 + 3])  # make the 4th generated token the end of text
        first_eos = (greedy[0, 5:] == eos).nonzero()[0].item()
        stopped = ours.generate(prompt, max_new_tokens=10, do_sample=False, eos_token_id=eos, pad_token_id=0)
        assert stopped.size(1) == 5 + first_eos + 1 and stopped[0, -1] == eos
        top1 = ours.generate(prompt, max_new_tokens=10, do_sample=True, top_k=1, eos_token_id=None, pad_token_id=0)
        assert torch.equal(top1, greedy)  # top-k = 1 sampling is greedy
        draws = []
        for seed in (0, 0, 1):
            torch.manual_seed(seed)
            draws.append(
                ours.generate(
                    prompt.repeat(4, 1),
                    max_new_tokens=10,
                    do_sample=True,
                    temperature=1.5,
                    top_k=50,
                    top_p=0.95,
                    eos_token_id=None,
                    pad_token_id=0,
                )
            )
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])


def test_gradient_checkpointing_gives_the_same_gradients(gpt2_checkpoint):
    ids = batch()
    grads = []
    for checkpointing in (False, True):
        model = AlignmentGPT2ForCausalLM.from_pretrained(gpt2_checkpoint).train()
        if checkpointing:
            model.activation_checkpointing_enable()
            assert model.is_activation_checkpointing
        model(ids, labels=ids).loss.backward()
        grads.append(model.transformer.h[0].attn.c_attn.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=0)


def test_loss_is_next_token_cross_entropy(ours):
    ids = batch()
    out = ours(ids, labels=ids)
    expected = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(out.loss, expected)


def test_bare_checkpoint_and_legacy_bin_convert(tmp_path, hf_gpt2, ours):
    bare = tmp_path / "bare"
    hf_gpt2.transformer.save_pretrained(bare)  # keys without the "transformer." prefix, like the official gpt2 repo
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text((bare / "config.json").read_text())
    torch.save(hf_gpt2.state_dict(), legacy / "pytorch_model.bin")
    ids = batch()
    with torch.no_grad():
        expected = ours(ids).logits
        for folder in (bare, legacy):
            torch.testing.assert_close(AlignmentGPT2ForCausalLM.from_pretrained(folder)(ids).logits, expected)
        backbone = AlignmentGPT2Model.from_pretrained(bare)
        torch.testing.assert_close(backbone(ids).last_hidden_state, ours.transformer(ids).last_hidden_state)


def test_auto_classes_know_our_model(tmp_path, ours):
    folder = tmp_path / "ours"
    ours.save_pretrained(folder)
    saved = json.loads((folder / "config.json").read_text())
    assert saved["model_type"] == "alignment_gpt2"
    assert saved["auto_map"]["AutoModelForCausalLM"] == "modeling_gpt2.AlignmentGPT2ForCausalLM"
    assert {"modeling_gpt2.py", "configuration_gpt2.py", "attention.py"} <= {p.name for p in folder.iterdir()}
    assert isinstance(AutoConfig.from_pretrained(folder), AlignmentGPT2Config)
    assert isinstance(AutoModel.from_pretrained(folder), AlignmentGPT2Model)
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    ids = batch()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, ours(ids).logits, atol=0, rtol=0)


def test_saved_folder_loads_with_remote_code_without_our_package(tmp_path, ours):
    folder = tmp_path / "ours"
    ours.save_pretrained(folder)
    # the model's own code travels, the conversion of official checkpoints stays in the package
    assert sorted(p.name for p in folder.glob("*.py")) == ["attention.py", "configuration_gpt2.py", "modeling_gpt2.py"]
    assert "Conv1D" not in (folder / "modeling_gpt2.py").read_text().replace("`Conv1D`", "")
    ids = batch()
    with torch.no_grad():
        torch.save({"ids": ids, "logits": ours(ids).logits}, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["alignment"] = None  # this process cannot import our package
        try:
            import alignment
            raise SystemExit("alignment was importable")
        except ImportError:
            pass
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        expected = torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True)
        with torch.no_grad():
            logits = model(expected["ids"]).logits
        assert torch.allclose(logits, expected["logits"], atol=1e-6), (logits - expected["logits"]).abs().max()
        print("remote code ok")
        """
    )
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home"), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "remote code ok" in result.stdout


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "preset, expected",
    [("gpt2", 124_439_808), ("gpt2-medium", 354_823_168), ("gpt2-large", 774_030_080), ("gpt2-xl", 1_557_611_200)],
)
def test_presets_have_the_official_sizes(preset, expected):
    with torch.device("meta"):
        ours = AlignmentGPT2ForCausalLM(AlignmentGPT2Config.from_preset(preset))
        official = transformers.GPT2LMHeadModel(transformers.GPT2Config(**alignment.modeling.GPT2_SIZES[preset]))
    assert count_parameters(ours) == count_parameters(official) == expected


def test_dropout_presets():
    plain = AlignmentGPT2Config.from_preset("gpt2")
    dropout = AlignmentGPT2Config.from_preset("gpt2/dropout")
    assert (plain.embd_pdrop, plain.attn_pdrop, plain.resid_pdrop) == (0.0, 0.0, 0.0)
    assert (dropout.embd_pdrop, dropout.attn_pdrop, dropout.resid_pdrop) == (0.2, 0.2, 0.2)
    with pytest.raises(ValueError, match="unknown GPT-2 preset"):
        AlignmentGPT2Config.from_preset("gpt3")


def test_dropout_is_active_only_in_training(gpt2_checkpoint):
    model = AlignmentGPT2ForCausalLM.from_pretrained(gpt2_checkpoint, embd_pdrop=0.2, attn_pdrop=0.2, resid_pdrop=0.2)
    ids = batch()
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(ids).logits)
        model.train()
        assert not torch.equal(model(ids).logits, model(ids).logits)


def test_every_dropout_is_a_module_so_trl_can_switch_it_off(gpt2_checkpoint):
    """TRL's disable_dropout_in_model sets p=0 on nn.Dropout modules; attention dropout must be one of them."""
    from trl.trainer.utils import disable_dropout_in_model

    model = AlignmentGPT2ForCausalLM.from_pretrained(gpt2_checkpoint, embd_pdrop=0.3, attn_pdrop=0.3, resid_pdrop=0.3)
    disable_dropout_in_model(model)
    model.train()
    ids = batch()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(ids).logits)
