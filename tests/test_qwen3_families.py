"""The stages on Qwen3-VL and Qwen3.5 beside Qwen2.5-VL (issue 32), on the CPU and without downloads: tiny
random-weight models built from each family's config class (toy/families.py), saved as checkpoints.

* the toy processor gives the official processors' tensors (Qwen3VLProcessor, which Qwen3-VL and Qwen3.5
  use, and Qwen2_5_VLProcessor), built without the video processor that needs torchvision;
* loading by architecture (policy.MODEL_FAMILIES): the class the config names, the vision tower frozen by
  its module name, LoRA on the family's layers, nf4;
* the fast rollout (rollout.fast_generate) against HF generate: greedy token for token (images, left
  padding, rows that end early, repeated prompts, min_new_tokens, the step traced as one graph) and the
  sampled tokens' log-probs against a teacher-forced pass; Qwen3.5 carries its recurrent state;
* 02 and 03 a few steps: saved, reloaded, stopped and --resume'd to the same weights bit for bit; 04
  scores; LoRA; FSDP on 2 CPU processes (Qwen3-VL's 02, Qwen3.5's 03 on gathered weights).

`pytest -k qwen3` runs this file.
"""

import contextlib
import copy
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file

from machinery import dataset, policy, rollout
import toy
from toy.families import TOY_FAMILIES, tiny_config
from conftest import ROOT, load_script
from test_sft import make_sft_jsonl
from test_sharded import launch, needs_deepspeed  # launch: accelerate launch, 2 CPU processes

sft, grpo, evaluate = (load_script(n) for n in ("02_sft", "03_grpo", "04_eval"))
NEW = ["qwen3_vl", "qwen3_5"]
PLAIN = dataset.SYSTEM_PROMPTS["plain"]
CLASSES = {"qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration", "qwen3_vl": "Qwen3VLForConditionalGeneration",
           "qwen3_5": "Qwen3_5ForConditionalGeneration"}


@pytest.fixture(scope="session")
def toy_tokenizer():
    return toy.build_tokenizer(extra_texts=list(dataset.SYSTEM_PROMPTS.values()))


def _processor(toy_tokenizer, family):
    return toy.ToyProcessor.build(copy.deepcopy(toy_tokenizer), family=family)  # it sets the chat template


@pytest.fixture(scope="session")
def family_dir(tmp_path_factory, toy_tokenizer):
    """family -> a saved untrained tiny model of it (hidden 64, 2 decoder layers; Qwen3.5: one linear-attention
    layer, then one full-attention layer) with the toy processor; built once per session."""
    built = {}

    def get(family):
        if family not in built:
            path = tmp_path_factory.mktemp(family) / "model"
            tok = copy.deepcopy(toy_tokenizer)
            toy.ToyProcessor.build(tok, family=family).save_pretrained(path)
            toy.build_tiny_model(tok, family=family, hidden=64, layers=2, seed=0).save_pretrained(path)
            built[family] = str(path)
        return built[family]

    return get


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    return make_sft_jsonl(str(tmp_path_factory.mktemp("families_sft")), n=16)


def _mixed_batch(processor):
    """Prompts of several lengths (left padding): toy images, dots images, text only."""
    toy_ds, dots = toy.toy_dataset("test", 3), toy.toy_dataset("test", 2, task="toy-dots")
    questions = list(toy_ds["question"]) + list(dots["question"]) + ["What is 2 + 3?", "What is 12 + 7 x 3?"]
    images = list(toy_ds["image"]) + list(dots["image"]) + [None, None]
    return dataset.encode_prompts(processor, questions, images, PLAIN)


def _assert_same(fast, ref):
    assert fast[0].shape == ref[0].shape, (fast[0].shape, ref[0].shape)
    assert torch.equal(fast[0], ref[0]) and torch.equal(fast[1], ref[1]) and fast[2] == ref[2]


def _teacher_forced_scores(model, processor, batch, comp):
    """(B, T, V) fp32 logits at each completion token, from one forward over prompt + completion, with the
    vision tokens the rollouts never sample at -inf."""
    full = {**batch, "input_ids": torch.cat([batch["input_ids"], comp], 1),
            "attention_mask": torch.cat([batch["attention_mask"], torch.ones_like(comp)], 1),
            "mm_token_type_ids": torch.cat([batch["mm_token_type_ids"], torch.zeros_like(comp)], 1)}
    Lp = batch["input_ids"].shape[1]
    with torch.no_grad():
        logits = model(**full).logits[:, Lp - 1:-1].float()
    logits[..., rollout.vision_token_ids(processor)] = -float("inf")
    return logits


def _end_bias(model, processor, batch, max_new_tokens):
    """A bias on <|im_end|>'s logit under which about half the rows of a greedy rollout end early, each at its
    own step (an untrained model almost never ends on its own): the median over rows of the smallest margin
    by which a step's chosen token beat <|im_end|>."""
    comp = rollout.hf_generate(model, processor, batch, max_new_tokens=max_new_tokens)[0]
    scores = _teacher_forced_scores(model, processor, batch, comp)
    margin = scores.amax(-1) - scores[..., processor.tokenizer.convert_tokens_to_ids("<|im_end|>")]
    return margin.amin(1).median().item() + 1e-3


@contextlib.contextmanager
def _leaning_to_end(model, processor, bias):
    """The model's head with `bias` added to <|im_end|>'s logit."""
    head = model.lm_head
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        biased.bias[processor.tokenizer.convert_tokens_to_ids("<|im_end|>")] = bias
    model.lm_head = biased
    try:
        yield model
    finally:
        model.lm_head = head


# ----------------------------------------------------------------------------------------------
# The processor


class _ImagesOnly:
    """An official processor class without its video processor (torchvision does not import here): its
    own __call__ on images and text, which is what the comparison is about."""

    @classmethod
    def get_attributes(cls):
        return ["image_processor", "tokenizer"]


@pytest.mark.parametrize("family", ["qwen2_5_vl", *NEW])
def test_toy_processor_gives_the_official_processors_tensors(family, family_dir, toy_tokenizer):
    from transformers import Qwen2_5_VLProcessor, Qwen3VLProcessor

    toy_proc = policy.load_processor(family_dir(family))  # as saved and loaded back
    official_class = Qwen2_5_VLProcessor if family == "qwen2_5_vl" else Qwen3VLProcessor
    official = type("ImagesOnly", (_ImagesOnly, official_class), {})(
        image_processor=toy_proc.image_processor, tokenizer=toy_proc.tokenizer, video_processor=None,
        chat_template=toy_proc.chat_template)
    ds = toy.toy_dataset("test", 3)
    questions, images = list(ds["question"]) + ["What is 2 + 3?"], list(ds["image"]) + [None]
    texts = [dataset.build_prompt(toy_proc, q, im is not None, PLAIN) for q, im in zip(questions, images)]
    ours = toy_proc(text=texts, images=images[:3], padding=True, return_tensors="pt", padding_side="left")
    theirs = official(text=texts, images=images[:3], padding=True, return_tensors="pt", padding_side="left")
    built = _processor(toy_tokenizer, family)(text=texts, images=images[:3], padding=True, return_tensors="pt",
                                               padding_side="left")
    assert sorted(ours) == sorted(theirs) == sorted(built)
    for k in theirs:
        assert torch.equal(ours[k], theirs[k]), k
        # loaded back, the same tokens: AutoTokenizer would load a Qwen3.5 directory's with Qwen3.5's own
        # tokenizer class, which splits the toy's numbers into digits
        assert torch.equal(ours[k], built[k]), k
    patch = TOY_FAMILIES[family]["images"]["patch_size"]
    assert ours["image_grid_thw"].tolist() == [[1, 8, 8]] * 3  # 112 px at 14 px a patch, 128 px at 16
    assert ours["pixel_values"].shape == (3 * 64, 3 * 2 * patch * patch)
    assert (ours["input_ids"] == toy_proc.image_token_id).sum(1).tolist() == [16, 16, 16, 0]
    # Qwen3.5's template opens its think block; the prompts close it empty (the paper's format has its own)
    assert texts[0].endswith("<|im_start|>assistant\n" + ("<think>\n\n</think>\n\n" if family == "qwen3_5" else ""))


# ----------------------------------------------------------------------------------------------
# Loading by architecture


@pytest.mark.parametrize("family", NEW)
def test_loads_the_class_its_config_names_with_the_familys_frozen_and_adapted_parts(family, family_dir):
    model, processor = policy.load_policy(family_dir(family), device="cpu", lora_r=4)
    base = model.get_base_model()
    assert type(base).__name__ == CLASSES[family] and policy.family_of(base) is policy.MODEL_FAMILIES[family]
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".visual." in n)
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if "lora_A" in n}
    assert adapted == set(policy.MODEL_FAMILIES[family].lora_targets)  # every target exists in the family
    assert all("language_model" in n for n, _ in model.named_parameters() if "lora_A" in n)
    if family == "qwen3_5":  # the gated delta net's projections are adapted too
        assert any("linear_attn.in_proj_qkv.lora_A" in n for n, _ in model.named_parameters())


@pytest.mark.parametrize("family", NEW)
def test_nf4_lora_runs_the_fast_path(family, family_dir):
    pytest.importorskip("bitsandbytes")
    model, proc = policy.load_policy(family_dir(family), load_in_4bit=True, lora_r=4, device="cpu")
    model.eval()
    kinds = {type(m).__name__ for n, m in model.named_modules() if "language_model" in n and "lora" not in n}
    assert "Linear4bit" in kinds and not any(type(m).__name__ == "Linear4bit" for n, m in model.named_modules()
                                             if ".visual." in n)
    ok, why = rollout.fast_path_support(model)
    assert ok and "4-bit" in why, why
    batch = _mixed_batch(proc)
    _assert_same(rollout.fast_generate(model, proc, batch, max_new_tokens=12),
                 rollout.hf_generate(model, proc, batch, max_new_tokens=12))


# ----------------------------------------------------------------------------------------------
# The fast rollout


@pytest.mark.parametrize("family", NEW)
def test_fast_rollout_equals_generate_token_for_token(family, family_dir):
    model, proc = policy.load_policy(family_dir(family), device="cpu", dtype="float32")
    model.eval()
    ok, why = rollout.fast_path_support(model)
    assert ok and why == "static KV cache" + (" + recurrent state" if family == "qwen3_5" else "") + \
        ", eager decode step"
    batch = _mixed_batch(proc)
    assert len(set(batch["attention_mask"].sum(1).tolist())) >= 4  # really left-padded
    with _leaning_to_end(model, proc, _end_bias(model, proc, batch, 32)):
        ref = rollout.hf_generate(model, proc, batch, max_new_tokens=32)
        _assert_same(rollout.fast_generate(model, proc, batch, max_new_tokens=32), ref)
        lengths = ref[1].sum(1)
        assert lengths.min() < lengths.max() == ref[0].shape[1], lengths  # rows end early; T = the longest
        ref = rollout.hf_generate(model, proc, batch, max_new_tokens=24, min_new_tokens=16)
        _assert_same(rollout.fast_generate(model, proc, batch, max_new_tokens=24, min_new_tokens=16), ref)
        assert ref[1].sum(1).min() > 16
    # a group: each prompt G times, prefilled once and its cache (keys and values, recurrent state) copied
    vs = proc.tokenizer.convert_tokens_to_ids("<|vision_start|>")
    group = dataset.repeat_for_group(dataset.encode_prompts(proc, list(toy.toy_dataset("test", 2)["question"]),
                                                            list(toy.toy_dataset("test", 2)["image"]), PLAIN), 3, vs)
    assert rollout.repeated_rows(group, vs)[0] == [0, 3]
    _assert_same(rollout.fast_generate(model, proc, group, max_new_tokens=24),
                 rollout.hf_generate(model, proc, group, max_new_tokens=24))
    # what CUDA compiles (fullgraph: a graph break raises), traced here with the 'eager' backend
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="rollout:")
        fast = rollout.fast_generate(model, proc, batch, max_new_tokens=12, compile="eager")
    assert rollout._slot.compiled is not None
    rollout.release()
    _assert_same(fast, rollout.hf_generate(model, proc, batch, max_new_tokens=12))


def test_an_untested_family_loads_and_rolls_out_with_hf_generate_and_says_why(capsys, monkeypatch):
    """Qwen3-VL-MoE (not in policy.MODEL_FAMILIES): HF generate, and the reason printed."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    tok = toy.build_tokenizer()
    dense = tiny_config("qwen3_vl", tok, hidden=64, layers=2).to_dict()
    text, vision = ({k: v for k, v in dense[part].items() if k not in ("model_type", "transformers_version")}
                    for part in ("text_config", "vision_config"))
    text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    config = AutoConfig.for_model("qwen3_vl_moe", text_config=text, vision_config=vision, tie_word_embeddings=True,
                                  **{k: dense[k] for k in dense if k.endswith("_token_id")})
    model = AutoModelForImageTextToText.from_config(config).eval()
    assert policy.family_of(model).name == "qwen3_vl_moe (untested)"
    proc = toy.ToyProcessor.build(tok, family="qwen3_vl")
    monkeypatch.setattr(rollout, "_said", set())
    batch = dataset.encode_prompts(proc, ["What is 2 + 3?"], [toy.make_problem(1)["image"]], PLAIN)
    assert rollout.generate(model, proc, batch, max_new_tokens=4)[0].shape == (1, 4)
    assert "rollout: HF generate (Qwen3VLMoeForConditionalGeneration: the loop is tested on Qwen2.5-VL, " \
        "Qwen3-VL, Qwen3.5 only)" in capsys.readouterr().out


@pytest.mark.parametrize("family", NEW)
def test_sampled_logprobs_match_a_teacher_forced_pass(family, family_dir):
    """The log-probs the sampler drew from == log_softmax(logits / T) of one forward over prompt + completion
    (the vision tokens excluded in both: an untrained model gives them weight)."""
    model, proc = policy.load_policy(family_dir(family), device="cpu", dtype="float32")
    model.eval()
    batch = _mixed_batch(proc)
    torch.manual_seed(0)
    comp, mask, _, logp = rollout.fast_generate(model, proc, batch, max_new_tokens=16, temperature=0.7,
                                                return_logprobs=True)
    scores = _teacher_forced_scores(model, proc, batch, comp) / 0.7
    want = scores.log_softmax(-1).gather(-1, comp[..., None]).squeeze(-1)
    mask = mask.bool()
    assert torch.allclose(logp[mask], want[mask], atol=1e-4), (logp[mask] - want[mask]).abs().max()


@pytest.mark.parametrize("family", NEW)
def test_a_repeated_prompt_cache_gives_one_pass_values_and_gradients(family, family_dir):
    """rollout.repeat_cache_rows: a prompt run once, its cache repeated for its G completions, which continue
    from it with gradients (03's prompt_shared_logprobs) == one pass per sequence. For Qwen3.5 the recurrent
    state must not be written in place (the prompt pass's backward needs it)."""
    model, proc = policy.load_policy(family_dir(family), device="cpu", dtype="float32")
    vs = proc.tokenizer.convert_tokens_to_ids("<|vision_start|>")
    ds = toy.toy_dataset("test", 2)
    prompts = dataset.repeat_for_group(dataset.encode_prompts(proc, list(ds["question"]), list(ds["image"]), PLAIN),
                                       3, vs)
    comp = torch.randint(20, 900, (6, 8))  # ordinary tokens (the special ones come first)
    model.train()

    def values_and_grads(fn):
        model.zero_grad()
        logp = fn()
        logp.sum().backward()
        return logp.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    def shared():
        first, inverse = rollout.repeated_rows(prompts, vs)
        distinct = dataset.select_rows(prompts, first, vs)
        positions = rollout.mrope_positions(model, distinct)
        out = model(**distinct, position_ids=positions, use_cache=True, logits_to_keep=1)
        head = policy.selective_log_softmax(out.logits[inverse], comp[:, :1])
        rollout.repeat_cache_rows(out.cache, inverse)
        logits = model(input_ids=comp[:, :-1], position_ids=positions[..., -1:][:, inverse] + torch.arange(1, 8),
                       attention_mask=torch.cat([prompts["attention_mask"], torch.ones_like(comp[:, :-1])], 1),
                       cache=out.cache, use_cache=True).logits
        return torch.cat([head, policy.selective_log_softmax(logits, comp[:, 1:])], 1)

    a, ga = values_and_grads(lambda: grpo.one_pass_logprobs(model, prompts, comp, 1.0, vs))
    b, gb = values_and_grads(shared)
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    assert ga.keys() == gb.keys()
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], atol=1e-5, rtol=1e-4, msg=n)


# ----------------------------------------------------------------------------------------------
# The stages


def _sft(model, data, out, **kw):
    return sft.main(sft.Args(**{**dict(model=model, data=data, out_dir=str(out), batch_size=4, max_steps=4,
                                       lr=3e-3, eval_size=0, save_every=2, threads=1), **kw}))


def _same_weights(a, b):
    wa, wb = load_file(os.path.join(a, "model.safetensors")), load_file(os.path.join(b, "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.fixture(scope="module")
def sft_models(family_dir, sft_data, tmp_path_factory):
    """family -> 02's model after 4 steps (run once per family for the tests below)."""
    done = {}

    def get(family):
        if family not in done:
            out = tmp_path_factory.mktemp(f"sft_{family}")
            _sft(family_dir(family), sft_data, out)
            done[family] = str(out)
        return done[family]

    return get


@pytest.mark.parametrize("family", NEW)
def test_sft_trains_saves_reloads_and_resumes_bit_for_bit(family, family_dir, sft_data, sft_models, tmp_path):
    full = sft_models(family)
    rows = dataset.read_jsonl(os.path.join(full, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["loss"] < rows[0]["loss"]
    model, _ = policy.load_policy(full, device="cpu")  # what 03 and 04 load
    assert type(model).__name__ == CLASSES[family]
    saved, before = load_file(os.path.join(full, "model.safetensors")), load_file(
        os.path.join(family_dir(family), "model.safetensors"))
    assert saved.keys() == before.keys()  # the names a plain save_pretrained writes
    assert all(torch.equal(before[n], saved[n]) for n in saved if "visual" in n)  # frozen
    assert any(not torch.equal(before[n], saved[n]) for n in saved if "language_model" in n)
    cut = tmp_path / "cut"
    assert _sft(family_dir(family), sft_data, cut, stop_after=3) == {"stopped_at": 3}  # last checkpoint: step 2
    _sft(family_dir(family), sft_data, cut, resume=True)
    _same_weights(full, str(cut))


@pytest.mark.parametrize("family", NEW)
def test_sft_lora_trains_and_its_adapter_loads(family, family_dir, sft_data, tmp_path):
    out = tmp_path / "lora"
    _sft(family_dir(family), sft_data, out, lora_r=4, max_steps=2, save_every=0)
    base, adapter = policy.resolve_model(str(out))
    assert base == family_dir(family) and adapter == str(out)
    model, proc = policy.load_policy(base, adapter_path=adapter, device="cpu")
    trained = load_file(str(out / "adapter_model.safetensors"))
    assert any("lora_B" in n and t.abs().sum() > 0 for n, t in trained.items())  # B starts at 0: it moved
    assert rollout.generate(model.eval(), proc, _mixed_batch(proc), max_new_tokens=4)[1].shape[0] == 7


def _grpo_args(model, out, family, **kw):
    return grpo.Args(**{**dict(model=model, out_dir=str(out), reward="paper", steps=3, prompts_per_step=2,
                               group_size=2, max_new_tokens=16, train_size=8, save_every=1, lr=1e-3), **kw})


@pytest.mark.parametrize("family", NEW)
def test_grpo_runs_saves_reloads_and_resumes_bit_for_bit(family, sft_models, tmp_path, capsys, monkeypatch):
    model = sft_models(family)
    monkeypatch.setattr(rollout, "_said", set())  # the rollout line is printed once per process
    res = grpo.main(_grpo_args(model, tmp_path / "full", family))
    assert [r["step"] for r in res["metrics"]] == [1, 2, 3]
    assert "rollout: fast (static KV cache" in capsys.readouterr().out
    reloaded, _ = policy.load_policy(str(tmp_path / "full"), device="cpu")
    assert type(reloaded).__name__ == CLASSES[family]
    grpo.main(_grpo_args(model, tmp_path / "cut", family, stop_after=2))
    res = grpo.main(_grpo_args(model, tmp_path / "cut", family, resume=True))
    assert [r["step"] for r in res["metrics"]] == [1, 2, 3]
    _same_weights(str(tmp_path / "full"), str(tmp_path / "cut"))


@pytest.mark.parametrize("family", NEW)
def test_eval_scores_the_model(family, sft_models, tmp_path):
    summaries = evaluate.main(evaluate.Args(model=sft_models(family), limit=4, out_dir=str(tmp_path),
                                            max_new_tokens=12, samples=2))
    (summary,) = summaries.values()
    assert summary["overall"]["n"] == 4 and 0.0 <= summary["overall"]["final_acc"] <= 100.0
    assert len(dataset.read_jsonl(next(tmp_path.glob("toy-test/*/items.jsonl")))) == 4


# ----------------------------------------------------------------------------------------------
# Sharded on 2 CPU processes (tests/test_sharded.py has DDP, ZeRO-2/3 and FSDP on Qwen2.5-VL)


@needs_deepspeed
def test_qwen3_vl_sft_under_zero3_matches_one_process(family_dir, sft_data, tmp_path):
    model = family_dir("qwen3_vl")
    flags = ["--model", model, "--data", sft_data, "--batch_size", 8, "--grad_accum", 2, "--max_steps", 2,
             "--lr", 3e-3, "--eval_size", 0, "--save_every", 0, "--threads", 1]
    log = launch("zero3", "02_sft.py", *flags, "--out_dir", tmp_path / "zero3")
    assert "DEEPSPEED x 2" in log
    _sft(model, sft_data, tmp_path / "one", batch_size=8, grad_accum=4, max_steps=2, save_every=0)
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "zero3" / "model.safetensors")
    assert (a.keys() - {"lm_head.weight"}) == (b.keys() - {"lm_head.weight"})  # tied: maybe saved
    for k in a.keys() & b.keys():
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4, msg=k)


def test_qwen3_5_grpo_under_fsdp_rolls_out_fast_on_gathered_weights(sft_models, tmp_path):
    # configs/fsdp.yaml names Qwen2.5-VL's layer classes as FSDP's units; without that line accelerate takes
    # each model's own (_no_split_modules: here Qwen3_5DecoderLayer, Qwen3_5VisionBlock)
    config = tmp_path / "fsdp_any.yaml"
    config.write_text("".join(line for line in open(os.path.join(ROOT, "configs", "fsdp.yaml"))
                              if "fsdp_transformer_layer_cls_to_wrap" not in line))
    out = tmp_path / "fsdp"
    log = launch(str(config)[:-len(".yaml")], "03_grpo.py", "--model", sft_models("qwen3_5"), "--reward", "grpo",
                 "--steps", 2, "--prompts_per_step", 2, "--group_size", 2, "--max_new_tokens", 16,
                 "--train_size", 8, "--save_every", 0, "--out_dir", out)
    assert "processes: 2" in log and "rollout: fast (static KV cache + recurrent state" in log
    assert len(dataset.read_jsonl(out / "metrics.jsonl")) == 2
    model, _ = policy.load_policy(str(out), device="cpu")
    assert type(model).__name__ == "Qwen3_5ForConditionalGeneration"
