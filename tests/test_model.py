"""The model plumbing (machinery: policy.py, dataset.py, training.py) on the real tiny Qwen2.5-VL: saving and loading, the processor,
batched generation, the SFT forward/backward, 4-bit + LoRA on CPU, the CLI and stage 0's outputs.

No mocks: every test runs the real transformers/peft/bitsandbytes code on the toy checkpoints from
tests/conftest.py (`tiny_model_dir`: untrained; `base_model_dir`: 00_base_model.py at a tiny budget).
"""

import json
import math
import os
import sys
from dataclasses import dataclass

import pytest
import torch
from PIL import Image

from machinery import cli, dataset, policy, rollout
import toy
from machinery import training
from conftest import load_script

PLAIN = dataset.SYSTEM_PROMPTS["plain"]


def _one_per_family(families=toy.FAMILIES):
    """The first toy test problem of each family (of either task): questions of different lengths."""
    task = "toy" if set(families) <= set(toy.FAMILIES) else "toy-dots"
    seen = {}
    for s in range(toy.TEST_SEED_OFFSET, toy.TEST_SEED_OFFSET + 200):
        p = toy.make_problem(s, task)
        seen.setdefault(p["family"], p)
    return [seen[f] for f in families]


def _gradient_image(w, h):
    """A non-uniform picture (so resizing really changes pixels)."""
    img = Image.new("RGB", (w, h))
    img.putdata([((7 * x) % 256, (5 * y) % 256, (3 * x + 11 * y) % 256) for y in range(h) for x in range(w)])
    return img


# ----------------------------------------------------------------------------------------------
# Saving and loading


def test_save_load_roundtrip_gives_identical_logits(tiny_model_dir, tmp_path):
    processor = policy.load_processor(tiny_model_dir)
    assert isinstance(processor, toy.ToyProcessor)
    model = toy.build_tiny_model(processor.tokenizer, hidden=64, layers=2, seed=1).eval()
    p = toy.make_problem(3)
    batch = dataset.encode_prompts(processor, [p["question"]], [p["image"]], PLAIN)
    with torch.no_grad():
        ref = model(**batch).logits  # (1, T, V)
        # The image is really used: another picture gives other logits.
        other = dataset.encode_prompts(processor, [p["question"]], [toy.make_problem(4)["image"]], PLAIN)
        assert not torch.allclose(model(**other).logits, ref)

    out = tmp_path / "saved"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    assert (out / "model.safetensors").is_file() and (out / "toy_processor.json").is_file()

    loaded, loaded_proc = policy.load_policy(str(out), device="cpu")
    from transformers import Qwen2_5_VLForConditionalGeneration

    plain = Qwen2_5_VLForConditionalGeneration.from_pretrained(out)
    batch2 = dataset.encode_prompts(loaded_proc, [p["question"]], [p["image"]], PLAIN)
    assert batch2.keys() == batch.keys() and all(torch.equal(batch[k], batch2[k]) for k in batch)
    with torch.no_grad():
        for m in (loaded.eval(), plain.eval()):
            assert torch.equal(m(**batch2).logits, ref)

    # policy.save_model writes the same loadable layout.
    again = tmp_path / "again"
    policy.save_model(loaded, loaded_proc, str(again))
    reloaded, _ = policy.load_policy(str(again), device="cpu")
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(**batch).logits, ref)


# ----------------------------------------------------------------------------------------------
# The processor: the same tensors as the official Qwen2_5_VLProcessor


def _multi_image_texts(processor):
    """Three chat prompts: two images, one (non-square) image, no image."""
    def chat(parts):
        return processor.apply_chat_template([{"role": "user", "content": parts}], tokenize=False,
                                             add_generation_prompt=True)

    img, txt = {"type": "image"}, lambda t: {"type": "text", "text": t}
    texts = [chat([img, txt("Compare the pictures."), img, txt("Which has more red?")]),
             chat([img, txt("Count.")]),
             chat([txt("What is 2 + 3?")])]
    images = [toy.make_problem(0)["image"], toy.make_problem(1)["image"], _gradient_image(112, 56)]
    return texts, images


def test_toy_processor_tensors(tiny_model_dir):
    processor = policy.load_processor(tiny_model_dir)
    texts, images = _multi_image_texts(processor)
    batch = processor(text=texts, images=images, padding=True, return_tensors="pt", padding_side="left")
    assert set(batch.keys()) == {"input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids"}
    grid = batch["image_grid_thw"]  # (n_images, 3): 112x112 -> 1x8x8 patches, 112x56 -> 1x4x8
    assert grid.tolist() == [[1, 8, 8], [1, 8, 8], [1, 4, 8]]
    assert batch["pixel_values"].shape == (int(grid.prod(-1).sum()), 3 * 2 * 14 * 14)
    tokens_per_image = (grid.prod(-1) // 4).tolist()  # 2x2 patch merge
    pad_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    n_pad = (batch["input_ids"] == pad_id).sum(1).tolist()
    assert n_pad == [tokens_per_image[0] + tokens_per_image[1], tokens_per_image[2], 0]
    # mm_token_type_ids is 1 exactly at the image tokens (and 0 on padding and text).
    assert torch.equal(batch["mm_token_type_ids"], (batch["input_ids"] == pad_id).long())
    # Left padding: the shorter rows start with pad tokens that are masked out.
    mask, ids = batch["attention_mask"], batch["input_ids"]
    assert mask[:, -1].all() and not mask[2, 0]
    assert (ids[mask == 0] == processor.tokenizer.pad_token_id).all()
    right = processor(text=texts, images=images, padding=True, return_tensors="pt", padding_side="right")
    assert right["attention_mask"][:, 0].all() and torch.equal(right["attention_mask"].sum(1), mask.sum(1))


def test_toy_processor_matches_official_qwen2_5_vl_processor(tiny_model_dir):
    pytest.importorskip("torchvision", exc_type=ImportError)  # the official image/video processors need it
    from transformers import Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    toy_proc = policy.load_processor(tiny_model_dir)
    official = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor.from_pretrained(tiny_model_dir),
                                   tokenizer=toy_proc.tokenizer, video_processor=Qwen2VLVideoProcessor(),
                                   chat_template=toy_proc.chat_template)

    def same(a, b, images):
        assert set(a.keys()) == set(b.keys())
        for k in a:
            if k != "pixel_values":
                assert torch.equal(a[k], b[k]), k
        assert a["pixel_values"].shape == b["pixel_values"].shape and a["pixel_values"].dtype == b["pixel_values"].dtype
        # Per image: the same pixels up to float rounding, unless the picture had to be resized (PIL's
        # and torch's bicubic resampling differ slightly at sharp edges).
        rows = a["image_grid_thw"].prod(-1).tolist()
        for im, pa, pb, (_, gh, gw) in zip(images, a["pixel_values"].split(rows), b["pixel_values"].split(rows),
                                          a["image_grid_thw"].tolist()):
            if im.size == (gw * 14, gh * 14):
                torch.testing.assert_close(pa, pb, atol=1e-5, rtol=0)
            else:
                assert (pa - pb).abs().mean() < 0.01 and (pa - pb).abs().max() < 0.5

    texts, images = _multi_image_texts(toy_proc)
    for side in ("left", "right"):
        kw = dict(padding=True, return_tensors="pt", padding_side=side)
        same(toy_proc(text=texts, images=images, **kw), official(text=texts, images=images, **kw), images)
    # The helpers the scripts use, with toy images, a picture that must be resized, and no image.
    probs = _one_per_family(("count", "add", "bar"))
    qs, ims = [p["question"] for p in probs] + ["Describe.", "What is 1 + 1?"], [p["image"] for p in probs] + [_gradient_image(100, 70), None]
    same(dataset.encode_prompts(toy_proc, qs, ims, PLAIN), dataset.encode_prompts(official, qs, ims, PLAIN), ims[:-1])
    targets = ["<think>a</think>\n<answer>1</answer>"] * len(qs)
    same(dataset.encode_sft(toy_proc, qs, ims, targets, PLAIN), dataset.encode_sft(official, qs, ims, targets, PLAIN), ims[:-1])


# ----------------------------------------------------------------------------------------------
# Generation


def test_completion_mask_stops_at_first_eos_even_when_pad_is_eos():
    ids = torch.tensor([[5, 2, 2, 2],    # EOS then padding with the same id
                        [5, 6, 7, 8],    # never ends: all kept
                        [2, 2, 2, 2],    # ends at once
                        [5, 9, 3, 2]])   # a second EOS id (e.g. <|endoftext|> beside <|im_end|>)
    assert rollout.completion_mask(ids, [2]).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 1]]
    assert rollout.completion_mask(ids, [2, 9]).tolist()[3] == [1, 1, 0, 0]
    assert rollout.completion_mask(ids, [2]).dtype == torch.long


def test_batched_left_padded_greedy_equals_one_by_one(base_model_dir):
    model, processor = policy.load_policy(base_model_dir, device="cpu")
    model.eval()
    probs = _one_per_family(("count", "compare", "bar"))
    questions = [p["question"] for p in probs] + ["What is 2 + 3?"]  # and a text-only prompt in the same batch
    images = [p["image"] for p in probs] + [None]
    batch = dataset.encode_prompts(processor, questions, images, PLAIN)
    assert len(set(batch["attention_mask"].sum(1).tolist())) == len(questions)  # all lengths differ: real padding

    # The next-token distribution does not depend on the padding around a prompt.
    with torch.no_grad():
        batched_logits = model(**batch).logits[:, -1]
        for i in range(len(questions)):
            single = dataset.encode_prompts(processor, questions[i:i + 1], images[i:i + 1], PLAIN)
            torch.testing.assert_close(batched_logits[i], model(**single).logits[0, -1], atol=1e-4, rtol=1e-4)

    eos = rollout.eos_token_ids(processor)
    ids, mask, texts = rollout.generate(model, processor, batch, max_new_tokens=24)
    assert ids.shape[0] == len(questions) and mask.shape == ids.shape
    assert any("<think>" in t for t in texts), texts  # the base model writes real text
    for i in range(len(questions)):
        single = dataset.encode_prompts(processor, questions[i:i + 1], images[i:i + 1], PLAIN)
        ids1, mask1, texts1 = rollout.generate(model, processor, single, max_new_tokens=24)
        n, n1 = int(mask[i].sum()), int(mask1[0].sum())
        assert n == n1 and torch.equal(ids[i, :n], ids1[0, :n1]), (i, texts[i], texts1[0])
        assert texts[i] == texts1[0]
        # The mask keeps everything up to and including the first EOS, nothing after it.
        if n < ids.shape[1]:
            assert ids[i, n - 1].item() in eos and not any(t in eos for t in ids[i, :n - 1].tolist())


# ----------------------------------------------------------------------------------------------
# Training forward/backward


@pytest.mark.parametrize("freeze_vision", [False, True])
def test_sft_forward_loss_and_vision_gradients(tiny_model_dir, freeze_vision):
    model, processor = policy.load_policy(tiny_model_dir, device="cpu", freeze_vision=freeze_vision)
    model.train()
    probs = _one_per_family(("count", "add"))
    targets = [toy.cot_response(p) for p in probs]
    batch = dataset.encode_sft(processor, [p["question"] for p in probs], [p["image"] for p in probs], targets, PLAIN)
    assert batch["pixel_values"].shape[0] == 2 * 64
    # Labels cover exactly the assistant target plus the end-of-turn token (Eq. 1).
    for row, target in zip(batch["labels"], targets):
        assert processor.tokenizer.decode(row[row != -100]) == target + "<|im_end|>"
    assert batch["input_ids"][:, 0].ne(processor.tokenizer.pad_token_id).all()  # right-padded

    loss = model(**batch).loss
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    visual = model.model.visual
    lm_grad = model.model.language_model.layers[0].self_attn.q_proj.weight.grad
    assert lm_grad is not None and lm_grad.abs().sum() > 0
    if freeze_vision:
        assert all(not p.requires_grad and p.grad is None for p in visual.parameters())
    else:
        # Gradients reach the first layer of the vision tower, its blocks and the projector (merger).
        for name in ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "merger.mlp.0.weight"):
            g = visual.get_parameter(name).grad
            assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, name


def test_4bit_lora_train_generate_train_on_cpu(tiny_model_dir):
    bnb = pytest.importorskip("bitsandbytes")
    frozen, _ = policy.load_policy(tiny_model_dir, load_in_4bit=True, device="cpu")  # inference: no adapters
    assert not hasattr(frozen, "peft_config") and not any(p.requires_grad for p in frozen.parameters())
    del frozen
    model, processor = policy.load_policy(tiny_model_dir, load_in_4bit=True, lora_r=16, device="cpu")
    base = model.get_base_model()
    quantised = [n for n, m in base.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantised and all("language_model" in n for n in quantised)  # vision tower and lm_head stay full
    # LoRA adapters sit only on language-model linear layers, none in the vision tower.
    adapted = [n for n, m in model.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)]
    assert adapted and all("language_model" in n and "visual" not in n for n in adapted)
    assert {n.rsplit(".", 1)[-1] for n in adapted} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and "visual" not in n for n in trainable)

    probs = _one_per_family(("count", "add"))
    qs, ims = [p["question"] for p in probs], [p["image"] for p in probs]
    batch = dataset.encode_sft(processor, qs, ims, [toy.cot_response(p) for p in probs], PLAIN)
    opt = torch.optim.AdamW(trainable.values(), lr=1e-2)
    before = {n: p.detach().clone() for n, p in trainable.items()}

    def train_step():
        model.train()
        loss = model(**batch).loss
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    first = train_step()
    assert any(not torch.equal(before[n], p) for n, p in trainable.items())
    # An eval-mode forward (generation) between two training steps: on avx512_bf16 CPUs bitsandbytes
    # repacks the 4-bit weights here and the next backward used to fail.
    model.eval()
    ids, mask, texts = rollout.generate(model, processor, dataset.encode_prompts(processor, qs, ims, PLAIN), max_new_tokens=4)
    assert ids.shape == (2, 4) and len(texts) == 2
    for m in model.modules():  # ...because policy.load_policy turns that repacking off
        if isinstance(m, bnb.nn.Linear4bit):
            assert not m.support_avx512bf16_for_cpu
            assert not getattr(m.weight.quant_state, "packing_format_for_cpu", False)
    second = train_step()
    assert math.isfinite(second) and second != first


# ----------------------------------------------------------------------------------------------
# The command line


@dataclass
class DemoArgs:
    """A demo stage."""

    steps: int = 3
    """optimizer steps to run"""
    lr: float = 0.5
    """peak learning rate (cosine, 5% warm-up)"""
    name: str = "demo"
    """run name"""
    resume: bool = False
    """continue from the last checkpoint"""
    eval_first: bool = True
    """evaluate before training"""
    adapter: str | None = None
    """LoRA adapter directory (none = full model)"""


def test_parse_args_help_from_docstrings_and_types(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # one help line per option
    assert cli.parse_args(DemoArgs, []) == DemoArgs()
    args = cli.parse_args(DemoArgs, ["--steps", "7", "--lr", "1e-3", "--name", "x", "--resume", "--no-eval_first",
                                        "--adapter", "runs/a"])
    assert args == DemoArgs(steps=7, lr=1e-3, name="x", resume=True, eval_first=False, adapter="runs/a")
    assert isinstance(args.steps, int) and isinstance(args.lr, float)
    assert cli.parse_args(DemoArgs, ["--adapter", "none"]).adapter is None
    with pytest.raises(SystemExit):
        cli.parse_args(DemoArgs, ["--steps", "many"])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli.parse_args(DemoArgs, ["--help"])
    help_text = capsys.readouterr().out
    for text in ("A demo stage.", "optimizer steps to run", "(cosine, 5% warm-up)", "continue from the last checkpoint",
                 "--resume, --no-resume", "--eval_first, --no-eval_first", "LoRA adapter directory"):
        assert text in help_text, text
    # A real script's Args works the same way. (inspect needs the module in sys.modules, as it is
    # when the script runs as __main__.)
    stage0 = load_script("00_base_model")
    monkeypatch.setitem(sys.modules, stage0.__name__, stage0)
    assert cli.parse_args(stage0.Args, ["--steps", "5", "--lr", "0.01"]) == stage0.Args(steps=5, lr=0.01)
    with pytest.raises(SystemExit):
        cli.parse_args(stage0.Args, ["--help"])
    assert "toy test problems for the accuracy report" in capsys.readouterr().out
    # Fields inherited from dataset.DataArgs (03's data columns) keep their help lines.
    stage3 = load_script("03_grpo")
    monkeypatch.setitem(sys.modules, stage3.__name__, stage3)
    assert cli.parse_args(stage3.Args, ["--question_column", "q"]).question_column == "q"
    with pytest.raises(SystemExit):
        cli.parse_args(stage3.Args, ["--help"])
    assert "column with the question text" in capsys.readouterr().out


def test_save_final_casts_a_full_model_to_the_asked_dtype(tiny_model_dir, tmp_path):
    from accelerate import Accelerator
    from safetensors import safe_open

    accelerator = Accelerator(cpu=True)
    for name, dtype in (("auto", "F32"), ("bfloat16", "BF16")):  # auto on a CPU (no autocast): as trained
        model, processor = policy.load_policy(tiny_model_dir, device="cpu")
        training.save_final(accelerator, model, processor, str(tmp_path / name), dtype=name)
        with safe_open(str(tmp_path / name / "model.safetensors"), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {dtype}
        reloaded, _ = policy.load_policy(str(tmp_path / name), device="cpu")  # CPU: loads as fp32 again
        assert next(reloaded.parameters()).dtype == torch.float32
    with pytest.raises(ValueError, match="--save_dtype must be one of"):
        training.check_save_dtype("bf16")


# ----------------------------------------------------------------------------------------------
# Stage 0 at a tiny budget


def test_base_model_stage_outputs(base_model_dir):
    files = set(os.listdir(base_model_dir))
    assert {"model.safetensors", "config.json", "eval.json", "train_log.jsonl", "toy_processor.json",
            "tokenizer.json", "preprocessor_config.json"} <= files
    with open(os.path.join(base_model_dir, "eval.json")) as f:
        result = json.load(f)
    acc = result["accuracy"]
    assert set(acc) == set(toy.FAMILIES) | {"all"}
    assert all(0.0 <= v <= 1.0 for v in acc.values())
    steps = result["steps"]
    assert steps >= 20 and result["parameters"] > 0
    log = dataset.read_jsonl(os.path.join(base_model_dir, "train_log.jsonl"))
    assert [r["step"] for r in log] == list(range(steps))
    assert all(math.isfinite(r["loss"]) for r in log)
    assert sum(r["loss"] for r in log[-10:]) < sum(r["loss"] for r in log[:10])  # it learned something


def _checkpoint_at_step_1(tmp_path):
    """A tiny model and optimizer prepared by accelerate, and a scheduler, saved at step 1 (as 02 and 03 do)."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    training.keep_trainable_in_checkpoints(accelerator)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = training.cosine_schedule(opt, 1, 10)
    model, opt = accelerator.prepare(model, opt)
    path = str(tmp_path / "checkpoint")
    training.save_checkpoint(accelerator, path, scheduler=scheduler, step=1)
    return dict(accelerator=accelerator, model=model, scheduler=scheduler), path


def test_training_state_survives_a_crash_while_saving(tmp_path, monkeypatch):
    """A crash while a checkpoint is written leaves the previous one whole and loadable."""
    state, path = _checkpoint_at_step_1(tmp_path)
    accelerator, model, scheduler = state["accelerator"], state["model"], state["scheduler"]
    saved = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        training.save_checkpoint(accelerator, path, scheduler=scheduler, step=2)
    monkeypatch.undo()
    step, _ = training.load_checkpoint(accelerator, path, scheduler=scheduler)
    assert step == 1 and torch.equal(model.weight, saved)


def test_a_crash_inside_the_swap_leaves_the_old_checkpoint_findable(tmp_path, monkeypatch):
    state, path = _checkpoint_at_step_1(tmp_path)
    accelerator, scheduler = state["accelerator"], state["scheduler"]
    real_replace, calls = os.replace, []

    def replace(src, dst):  # the first rename (old checkpoint aside) happens; the process dies before the second
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        training.save_checkpoint(accelerator, path, scheduler=scheduler, step=2)
    monkeypatch.undo()
    assert not os.path.exists(path) and training.find_checkpoint(path) == path + ".old"
    assert training.load_checkpoint(accelerator, path + ".old", scheduler=scheduler)[0] == 1


def test_lora_dropout_is_the_one_asked_also_for_a_loaded_adapter(tiny_model_dir, tmp_path):
    """RL loads its policy with LoRA dropout 0 (the sampler runs without it), also when --model is an adapter
    trained with dropout; other callers keep the default."""
    def dropouts(model):
        return {type(d).__name__ + (f"({d.p})" if hasattr(d, "p") else "")
                for m in model.modules() if hasattr(m, "lora_dropout") for d in m.lora_dropout.values()}

    model, proc = policy.load_policy(tiny_model_dir, lora_r=4)
    assert dropouts(model) == {"Dropout(0.05)"}
    policy.save_model(model, proc, str(tmp_path / "adapter"))
    assert dropouts(policy.load_policy(tiny_model_dir, lora_r=4, lora_dropout=0.0)[0]) == {"Identity"}
    loaded, _ = policy.load_policy(tiny_model_dir, adapter_path=str(tmp_path / "adapter"), lora_r=4, lora_dropout=0.0)
    assert dropouts(loaded) == {"Identity"}
    assert any(p.requires_grad for n, p in loaded.named_parameters() if "lora_" in n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_selective_log_softmax_equals_log_softmax_in_value_and_gradient(dtype, temperature):
    """The chunked log-softmax at the chosen tokens, whose backward writes into the logits' memory,
    against plain log_softmax(logits.float() / T).gather; chunks of 3 rows over 35 rows."""
    torch.manual_seed(0)
    x, tokens, w = torch.randn(5, 7, 33, dtype=dtype), torch.randint(33, (5, 7)), torch.randn(5, 7)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref = torch.log_softmax(a.float() / temperature, -1).gather(-1, tokens[..., None]).squeeze(-1)
    (ref * w).sum().backward()
    out = policy.selective_log_softmax(b * 1, tokens, temperature, chunk_bytes=4 * 33 * 3)  # b * 1: not a leaf
    (out * w).sum().backward()
    assert out.dtype == torch.float32 and out.shape == tokens.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.grad.float(), a.grad.float(), atol=1e-5, rtol=1e-2)
    leaf = x.clone().requires_grad_()  # a leaf keeps its values through the backward
    policy.selective_log_softmax(leaf, tokens).sum().backward()
    assert torch.equal(leaf.detach(), x)
