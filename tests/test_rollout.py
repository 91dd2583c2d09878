"""machinery/rollout.py, the static-KV-cache decoding loop, against rollout.generate (transformers' generate) on the
real toy Qwen2.5-VL: greedy token for token (images, left padding, early EOS, min_new_tokens, suppressed
vision tokens, repeated prompts, eager attention, 4-bit + LoRA, the step traced as one graph), sampling
from softmax(logits / T) with top-p (log-probs against a teacher-forced pass, frequencies against the
distribution), and where the fast path declines.
"""

import os
import warnings
from types import SimpleNamespace

import pytest
import torch
from machinery import dataset, policy, rollout
import toy
from conftest import ROOT, load_script

grpo = load_script("03_grpo")
BASE = os.path.join(ROOT, "toy", "base_model")  # the shipped, trained toy base model
PLAIN = dataset.SYSTEM_PROMPTS["plain"]

pytestmark = pytest.mark.skipif(not os.path.isdir(BASE), reason="needs the shipped toy/base_model")


@pytest.fixture(scope="module")
def base():
    model, processor = policy.load_policy(BASE, device="cpu", dtype="float32")
    return model.eval(), processor


def _mixed_batch(processor, n_toy=3):
    """Prompts of several lengths (left padding): toy images, dots images, text only."""
    toy_ds = toy.toy_dataset("test", n_toy)
    dots = toy.toy_dataset("test", 2, task="toy-dots")
    questions = list(toy_ds["question"]) + list(dots["question"]) + ["What is 2 + 3?", "What is 12 + 7 x 3?"]
    images = list(toy_ds["image"]) + list(dots["image"]) + [None, None]
    return dataset.encode_prompts(processor, questions, images, PLAIN)


def _assert_same(fast, ref):
    assert fast[0].shape == ref[0].shape, (fast[0].shape, ref[0].shape)
    assert torch.equal(fast[0], ref[0]) and torch.equal(fast[1], ref[1])
    assert fast[2] == ref[2]


# ----------------------------------------------------------------------------------------------
# Greedy: the same tokens as rollout.generate


def test_greedy_equals_generate_with_images_padding_and_early_eos(base):
    model, proc = base
    batch = _mixed_batch(proc)
    assert len(set(batch["attention_mask"].sum(1).tolist())) >= 4  # really left-padded
    ref = rollout.hf_generate(model, proc, batch, max_new_tokens=48)
    fast = rollout.fast_generate(model, proc, batch, max_new_tokens=48)
    _assert_same(fast, ref)
    lengths = ref[1].sum(1)
    assert lengths.min() < lengths.max() == ref[0].shape[1]  # some rows end early; T = the longest
    assert any("<answer>" in t for t in ref[2])  # real text, not noise
    assert model.config.get_text_config(decoder=True)._attn_implementation == "sdpa"  # restored afterwards


def test_decode_attention_equals_attention_over_repeated_heads():
    """Grouped-query attention without copying the cache per head group == sdpa on repeated k/v heads."""
    torch.manual_seed(0)
    B, H, Hk, S, D = 3, 6, 2, 10, 8
    q, k, v = torch.randn(B, H, 1, D), torch.randn(B, Hk, S, D), torch.randn(B, Hk, S, D)
    mask = torch.rand(B, 1, 1, S) > 0.3
    mask[:, :, :, 0] = True
    out, _ = rollout.sdpa_decode_attention(torch.nn.Module().eval(), q, k, v, mask, scaling=0.3)
    want = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(H // Hk, 1), v.repeat_interleave(H // Hk, 1), attn_mask=mask, scale=0.3)
    torch.testing.assert_close(out, want.transpose(1, 2))


def test_min_new_tokens_equals_generate(base):
    model, proc = base
    batch = _mixed_batch(proc)
    ref = rollout.hf_generate(model, proc, batch, max_new_tokens=40, min_new_tokens=30)
    fast = rollout.fast_generate(model, proc, batch, max_new_tokens=40, min_new_tokens=30)
    _assert_same(fast, ref)
    assert ref[1].sum(1).min() > 30  # no EOS among the first 30 tokens
    plain = rollout.hf_generate(model, proc, batch, max_new_tokens=40)
    assert plain[1].sum(1).min() <= 30  # ...which without min_new_tokens some rows do write


def test_repeated_prompts_share_one_prefill_and_still_equal_generate(base):
    model, proc = base
    vs = proc.tokenizer.convert_tokens_to_ids("<|vision_start|>")
    ds = toy.toy_dataset("test", 3)
    images = list(ds["image"])
    images[1] = images[0].copy()  # same picture, other question: still a different prompt
    enc = dataset.encode_prompts(proc, list(ds["question"]), images, PLAIN)
    group = dataset.repeat_for_group(enc, 4, vs)
    first, inverse = rollout.repeated_rows(group, vs)
    assert first == [0, 4, 8] and inverse.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    # A different picture behind the same tokens is a different prompt.
    other = dict(group, pixel_values=group["pixel_values"].clone())
    other["pixel_values"][-1] += 1
    assert rollout.repeated_rows(other, vs)[0] == [0, 4, 8, 11]
    # The shared prefill gives every row its own prompt's next-token logits and positions.
    from transformers import StaticCache

    with torch.no_grad():
        logits, positions = rollout.prefill(model, group, StaticCache(config=model.config, max_cache_len=256))
        torch.testing.assert_close(logits, model(**group).logits[:, -1], atol=1e-4, rtol=1e-4)
    assert torch.equal(positions[1:], model.model.get_rope_index(
        group["input_ids"], group["mm_token_type_ids"], group["image_grid_thw"],
        attention_mask=group["attention_mask"])[0])
    ref = rollout.hf_generate(model, proc, group, max_new_tokens=32)
    _assert_same(rollout.fast_generate(model, proc, group, max_new_tokens=32), ref)


def test_vision_tokens_are_suppressed_like_generate(base):
    """With a head that prefers <|image_pad|>, both loops must pick the best other token."""
    model, proc = base
    vision = rollout.vision_token_ids(proc)
    head = model.lm_head
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        biased.bias[proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")] = 30.0
    model.lm_head = biased
    try:
        batch = _mixed_batch(proc, n_toy=2)
        with torch.no_grad():
            assert model(**batch).logits[:, -1].argmax(-1).tolist() == [vision[3]] * 6  # would be sampled
        ref = rollout.hf_generate(model, proc, batch, max_new_tokens=12)
        fast = rollout.fast_generate(model, proc, batch, max_new_tokens=12)
        _assert_same(fast, ref)
        assert not torch.isin(fast[0], torch.tensor(vision)).any()
    finally:
        model.lm_head = head


def test_eager_attention_equals_generate():
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(BASE, attn_implementation="eager").eval()
    proc = policy.load_processor(BASE)
    assert rollout.fast_path_support(model)[0]
    batch = _mixed_batch(proc, n_toy=2)
    ref = rollout.hf_generate(model, proc, batch, max_new_tokens=24)
    _assert_same(rollout.fast_generate(model, proc, batch, max_new_tokens=24), ref)


def test_decode_step_traces_as_one_graph(base):
    """What CUDA compiles (fullgraph=True: a graph break raises): traced here with the 'eager' backend."""
    model, proc = base
    batch = _mixed_batch(proc, n_toy=2)
    ref = rollout.hf_generate(model, proc, batch, max_new_tokens=16)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="rollout:")  # a failed compile falls back with a warning
        fast = rollout.fast_generate(model, proc, batch, max_new_tokens=16, compile="eager")
    _assert_same(fast, ref)
    assert rollout._slot.compiled is not None  # still compiled: no fallback to eager
    rollout.release()


def test_4bit_lora_model_runs_the_fast_path_on_cpu():
    pytest.importorskip("bitsandbytes")
    model, proc = policy.load_policy(BASE, load_in_4bit=True, lora_r=8, device="cpu")
    model.eval()
    ok, why = rollout.fast_path_support(model)
    assert ok and "4-bit" in why, why
    batch = _mixed_batch(proc, n_toy=2)
    ref = rollout.hf_generate(model, proc, batch, max_new_tokens=24)
    _assert_same(rollout.fast_generate(model, proc, batch, max_new_tokens=24), ref)


# ----------------------------------------------------------------------------------------------
# Sampling: softmax(logits / T) with top-p


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_sampled_logprobs_match_a_teacher_forced_pass(base, top_p):
    """The log-probs the sampler drew from == log_softmax(logits / T) (nucleus-renormalised for top_p < 1)
    of a training-style forward over prompt + completion, which also puts every token in the nucleus."""
    model, proc = base
    T = 0.7
    vs = proc.tokenizer.convert_tokens_to_ids("<|vision_start|>")
    enc = _mixed_batch(proc)
    torch.manual_seed(0)
    comp, mask, texts, logp = rollout.fast_generate(model, proc, enc, max_new_tokens=32, temperature=T,
                                                    top_p=top_p, return_logprobs=True)
    mask = mask.bool()
    with torch.no_grad():
        if top_p == 1.0:
            train = grpo.token_logprobs(model, enc, comp, T, 4, vs)
        else:  # the same forward, then the nucleus of each position
            full = {**enc, "input_ids": torch.cat([enc["input_ids"], comp], 1),
                    "attention_mask": torch.cat([enc["attention_mask"], torch.ones_like(comp)], 1),
                    "mm_token_type_ids": torch.cat([enc["mm_token_type_ids"], torch.zeros_like(comp)], 1)}
            logits = model(**full, use_cache=False).logits[:, enc["input_ids"].shape[1] - 1:-1].float() / T
            B, L, V = logits.shape
            kept = rollout.top_p_filter(logits.reshape(B * L, V), top_p).view(B, L, V)
            train = kept.log_softmax(-1).gather(-1, comp[..., None]).squeeze(-1)
            assert torch.isfinite(train[mask]).all()  # every sampled token lies inside its nucleus
    assert torch.allclose(logp[mask], train[mask], atol=1e-4), (logp[mask] - train[mask]).abs().max()
    assert (logp[mask] < -0.01).any()  # really sampled: some tokens were not near-certain


def test_sampler_draws_from_softmax_over_temperature_with_top_p():
    torch.manual_seed(0)
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 3.0])
    bias = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, -float("inf")])  # token 5 suppressed despite its logit
    n = 200_000
    for T, top_p in [(0.7, 1.0), (1.3, 0.8)]:
        scores = (logits + bias) / T
        want = rollout.top_p_filter(scores[None], top_p).softmax(-1)[0]
        tokens, logp = rollout.pick_tokens(logits.expand(n, -1), bias, T, top_p, True)
        freq = torch.bincount(tokens, minlength=6).float() / n
        assert freq[5] == 0 and (freq[want == 0] == 0).all()
        assert (freq - want).abs().max() < 0.006, (freq, want)  # ~5 standard errors
        torch.testing.assert_close(logp, want[tokens].log())
    assert rollout.top_p_filter(logits[None], 0.8).isinf().sum() == 4  # keeps 3.0 and 2.0: 83% >= 80%


def test_tiny_top_p_samples_the_greedy_tokens(base):
    model, proc = base
    batch = _mixed_batch(proc, n_toy=2)
    ref = rollout.hf_generate(model, proc, batch, max_new_tokens=24)
    fast = rollout.fast_generate(model, proc, batch, max_new_tokens=24, temperature=1.5, top_p=1e-6)
    _assert_same(fast, ref)


# ----------------------------------------------------------------------------------------------
# Where the fast path does not apply


def test_fast_path_support_declines_with_a_reason(base):
    model, proc = base
    assert rollout.fast_path_support(model) == (True, "static KV cache, eager decode step")
    ok, why = rollout.fast_path_support(model, synced_gpus=True)
    assert not ok and "sharded" in why
    assert not rollout.fast_path_support(torch.nn.Linear(2, 2))[0]

    model.generation_config.repetition_penalty = 1.05  # what Qwen2.5-VL-Instruct's generation_config sets
    try:
        ok, why = rollout.fast_path_support(model)
        assert not ok and "repetition_penalty=1.05" in why
        with pytest.raises(ValueError, match="repetition_penalty"):
            rollout.fast_generate(model, proc, _mixed_batch(proc, 1), max_new_tokens=2)
    finally:
        model.generation_config.repetition_penalty = 1.0

    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    try:
        ok, why = rollout.fast_path_support(model)
        assert not ok and "checkpointing" in why
    finally:
        model.activation_checkpointing_disable()
        model.eval()

    text = model.config.get_text_config(decoder=True)
    text._attn_implementation = "flash_attention_2"
    try:
        ok, why = rollout.fast_path_support(model)
        assert not ok and "flash_attention_2" in why
    finally:
        text._attn_implementation = "sdpa"

    p = next(model.parameters())
    p.ds_status = SimpleNamespace(name="NOT_AVAILABLE")  # how DeepSpeed ZeRO-3 marks a parameter not gathered
    try:
        ok, why = rollout.fast_path_support(model)
        assert not ok and "partitioned" in why
        p.ds_status = SimpleNamespace(name="AVAILABLE")  # gathered (tests/test_sharded.py: the real thing)
        assert rollout.fast_path_support(model)[0]
    finally:
        del p.ds_status
    assert rollout.fast_path_support(model)[0]
