"""What every stage shares: prompts, model loading, encoding, generation, checkpoints, logs.

One loading path serves the toy model and the real Qwen2.5-VL-7B/32B alike: a local directory or a
hub id, a dtype, optional 4-bit (bitsandbytes nf4) and LoRA (peft), and a frozen vision tower.
"""

import argparse
import ast
import dataclasses
import inspect
import json
import math
import os
import random
import shutil
import textwrap

import numpy as np
import torch

# ----------------------------------------------------------------------------------------------
# Prompts (PAPER.md: Stage 1a step 6 and Stage 2)

SYSTEM_PROMPTS = {
    # Plain chain of thought: what the base model and the plain-GRPO baseline answer in.
    "plain": (
        "Think about the question step by step inside <think> </think>, then give the answer "
        "inside <answer> </answer>."
    ),
    # Reflective format, used by SFT, SRPO and evaluation. The second <think> is optional because
    # the paper's SFT targets have none (rewards.py accepts both layouts in the paper variant).
    "reflect": (
        "Think about the question step by step inside <think> </think> and give a first answer "
        "inside <answer> </answer>. Then reflect on your reasoning inside <reflection> "
        "</reflection>: find mistakes, missing information, or how to make it shorter. You may "
        "think again inside <think> </think>; the second reasoning must improve on the first, "
        "even when the answer does not change. Give the final answer inside <answer> </answer>. "
        "Example: <think>1+1=2</think> <answer>2</answer> <reflection>The sum is right and "
        "short.</reflection> <think>1+1=2</think> <answer>2</answer>"
    ),
}
TAGS = ("<think>", "</think>", "<answer>", "</answer>", "<reflection>", "</reflection>")


# ----------------------------------------------------------------------------------------------
# Config: one dataclass per script, a docstring under every field, parsed from the command line


def parse_args(cls, argv=None):
    """Build an argparse parser from a dataclass; each field's docstring becomes its --help line."""
    docs = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):  # shared fields: DataArgs
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                docs[node.target.id] = nxt.value.value.replace("%", "%%")  # argparse %-formats help strings
    parser = argparse.ArgumentParser(description=(cls.__doc__ or "").strip(),
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(cls):
        # String annotations (`from __future__ import annotations`) are evaluated; `str | None` etc. are objects.
        kind = eval(f.type, vars(inspect.getmodule(cls))) if isinstance(f.type, str) else f.type  # noqa: S307 (our own annotations)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if kind is bool:
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=default, help=docs.get(f.name))
        elif kind in (int, float, str):
            parser.add_argument(f"--{f.name}", type=kind, default=default, help=docs.get(f.name))
        else:  # optional values and lists are given as strings
            parser.add_argument(f"--{f.name}", type=_parse_loose, default=default, help=docs.get(f.name))
    return cls(**vars(parser.parse_args(argv)))


def _parse_loose(s):
    if s.lower() in ("none", "null", ""):
        return None
    for conv in (int, float):
        try:
            return conv(s)
        except ValueError:
            pass
    return s


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# Loading


def is_toy_dir(path) -> bool:
    return os.path.isfile(os.path.join(str(path), "toy_processor.json"))


def load_processor(path):
    """The toy processor for toy checkpoints, `AutoProcessor` for everything else (real Qwen2.5-VL)."""
    if is_toy_dir(path):
        from toy import ToyProcessor

        return ToyProcessor.from_pretrained(path)
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(path)  # no trust_remote_code: Qwen2.5-VL is built in
    processor.tokenizer.padding_side = "left"
    return processor


LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def load_policy(model_path, *, dtype="auto", load_in_4bit=False, lora_r=0, lora_alpha=None,
                lora_dropout=0.05, freeze_vision=True, gradient_checkpointing=False, device=None,
                adapter_path=None):
    """Load (model, processor) from a local directory or hub id.

    dtype: "auto" = bf16 on a GPU, fp32 on a CPU; or "bfloat16" / "float16" / "float32".
    load_in_4bit: bitsandbytes nf4 weights with bf16 compute, all frozen (QLoRA: add lora_r > 0 to train).
    lora_r > 0: LoRA adapters (peft) on the language model's linear layers only.
    freeze_vision: the vision tower and projector get no gradient (the paper freezes them).
    adapter_path: load a saved LoRA adapter on top of `model_path` (trainable if lora_r > 0).
    """
    from transformers import Qwen2_5_VLForConditionalGeneration

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype == "auto":
        dtype = "bfloat16" if device != "cpu" and torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"
    torch_dtype = getattr(torch, dtype)
    kwargs = {"dtype": torch_dtype}
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        compute = torch.bfloat16 if device != "cpu" else torch.float32
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute,
            bnb_4bit_use_double_quant=True,
            # Patterns match module names from the start or as a suffix: "visual" alone matches nothing.
            llm_int8_skip_modules=["model.visual", "lm_head"])
        kwargs["device_map"] = {"": device if device != "cuda" else torch.cuda.current_device()}
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_path, **kwargs)
    if not load_in_4bit:
        model.to(device)
    if freeze_vision:
        for p in model.model.visual.parameters():  # vision tower + its merger (the projector)
            p.requires_grad_(False)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if load_in_4bit:
        _fix_bnb_cpu(model)
        for p in model.parameters():  # a 4-bit model trains only through adapters: norms, embeddings frozen
            p.requires_grad_(False)
    if adapter_path or lora_r:
        from peft import LoraConfig, PeftModel, get_peft_model

        if adapter_path:
            model = PeftModel.from_pretrained(model, adapter_path, is_trainable=lora_r > 0)
        else:
            model = get_peft_model(model, LoraConfig(
                r=lora_r, lora_alpha=lora_alpha or 2 * lora_r, lora_dropout=lora_dropout,
                target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))
    return model, load_processor(model_path)


def _fix_bnb_cpu(model):
    # bitsandbytes 0.50 repacks 4-bit weights for avx512_bf16 CPUs on an eval-mode forward, which
    # breaks a later training backward; turning that optimisation off keeps CPU QLoRA trainable.
    try:
        import bitsandbytes as bnb
    except ImportError:
        return
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False


def unwrap(model):
    """The model under a DDP wrapper (`.module`); a peft model stays a peft model."""
    return getattr(model, "module", model)


def save_model(model, processor, path, merge_lora=False):
    """Save weights as safetensors + processor, loadable by `load_policy`. LoRA: the adapter, and a
    merged full copy under `path/merged` when `merge_lora`."""
    model = unwrap(model)
    os.makedirs(path, exist_ok=True)
    if hasattr(model, "peft_config"):
        model.save_pretrained(path)  # adapter_model.safetensors + adapter_config.json
        base = model.get_base_model()
        base.config.save_pretrained(path)
        processor.save_pretrained(path)
        if merge_lora:
            merged = model.merge_and_unload() if not getattr(base, "is_loaded_in_4bit", False) else None
            if merged is None:
                raise ValueError("--merge_lora needs unquantised base weights; reload the base in bf16 to merge")
            merged.save_pretrained(os.path.join(path, "merged"), safe_serialization=True)
            processor.save_pretrained(os.path.join(path, "merged"))
    else:
        model.save_pretrained(path, safe_serialization=True)
        processor.save_pretrained(path)


def resolve_model(path):
    """(base path, adapter path or None): a LoRA output directory names its base in adapter_config.json."""
    cfg = os.path.join(str(path), "adapter_config.json")
    if os.path.isfile(cfg):
        with open(cfg) as f:
            return json.load(f)["base_model_name_or_path"], str(path)
    return str(path), None


# ----------------------------------------------------------------------------------------------
# Encoding


def build_prompt(processor, question, has_image, system_prompt):
    """Chat-formatted prompt text ending with the assistant header; the image comes before the question."""
    content = ([{"type": "image"}] if has_image else []) + [{"type": "text", "text": question}]
    messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": content}]
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _as_rgb(images):
    return [im.convert("RGB") for im in images if im is not None]


def encode_prompts(processor, questions, images, system_prompt):
    """Left-padded prompts for generation: input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids."""
    texts = [build_prompt(processor, q, im is not None, system_prompt) for q, im in zip(questions, images)]
    return processor(text=texts, images=_as_rgb(images) or None, padding=True, return_tensors="pt",
                     padding_side="left")


def encode_sft(processor, questions, images, targets, system_prompt):
    """Right-padded prompt + assistant target with `labels` = -100 everywhere except the target (Eq. 1).

    The target ends with the chat end-of-turn token, which is trained too, so the model learns to stop.
    """
    tok = processor.tokenizer
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    prompts = [build_prompt(processor, q, im is not None, system_prompt) for q, im in zip(questions, images)]
    # Encode prompt-only first: its length (image tokens expanded) is where the target starts.
    prompt_lens = [int(m.sum()) for m in processor(text=prompts, images=_as_rgb(images) or None, padding=True,
                                                   return_tensors="pt", padding_side="right")["attention_mask"]]
    full = [p + t + "<|im_end|>" for p, t in zip(prompts, targets)]
    batch = processor(text=full, images=_as_rgb(images) or None, padding=True, return_tensors="pt",
                      padding_side="right")
    labels = batch["input_ids"].clone()
    for i, n in enumerate(prompt_lens):
        labels[i, :n] = -100
    labels[batch["attention_mask"] == 0] = -100
    assert (labels[batch["attention_mask"].bool()] != -100).sum() > 0 and eot in batch["input_ids"]
    batch["labels"] = labels
    return batch


def vision_token_ids(processor):
    tok = processor.tokenizer
    names = ["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
    ids = [tok.convert_tokens_to_ids(t) for t in names]
    return [i for i in ids if i is not None and i != tok.unk_token_id]


def eos_token_ids(processor):
    tok = processor.tokenizer
    return sorted({tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")})


# ----------------------------------------------------------------------------------------------
# Generation


def completion_mask(completion_ids, eos_ids):
    """1 up to and including the first end-of-sequence token, 0 after it: by POSITION, never by
    pad value (pad and EOS may be the same id). (B, T) -> (B, T)

    Example: eos=2, [[5, 2, 2, 7]] -> [[1, 1, 0, 0]]
    """
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))
    T = completion_ids.shape[1]
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1), torch.full_like(is_eos[:, 0], T, dtype=torch.long))
    return (torch.arange(T, device=completion_ids.device)[None] <= first[:, None]).long()


@torch.no_grad()
def generate(model, processor, batch, *, max_new_tokens, temperature=0.0, top_p=1.0, min_new_tokens=None,
             synced_gpus=None):
    """Sample (temperature > 0, plain softmax(logits / T) with top-p, no top-k) or decode greedily.

    Returns (completion_ids (B, T), completion_mask (B, T), texts). Vision special tokens are
    suppressed: a sampled <|image_pad|> would break the next forward pass with an image.
    """
    gen = unwrap(model)
    eos = eos_token_ids(processor)
    kwargs = dict(max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=processor.tokenizer.pad_token_id,
                  suppress_tokens=vision_token_ids(processor), use_cache=True, synced_gpus=synced_gpus)
    if min_new_tokens:
        kwargs["min_new_tokens"] = min_new_tokens
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    batch = {k: v.to(gen.device) for k, v in batch.items()}
    out = gen.generate(**batch, **kwargs)
    completion = out[:, batch["input_ids"].shape[1]:]
    mask = completion_mask(completion, eos)
    texts = [processor.tokenizer.decode(ids[m.bool()], skip_special_tokens=True) for ids, m in zip(completion, mask)]
    return completion, mask, texts


def generate_responses(model, processor, questions, images, *, system_prompt, max_new_tokens,
                       temperature=0.0, batch_size=8, desc="generate"):
    """Answer many questions in batches (left-padded) with a progress bar. Returns the texts."""
    from tqdm.auto import tqdm

    unwrap(model).eval()
    texts = []
    for i in tqdm(range(0, len(questions), batch_size), desc=desc, leave=False):
        batch = encode_prompts(processor, questions[i:i + batch_size], images[i:i + batch_size], system_prompt)
        texts += generate(model, processor, batch, max_new_tokens=max_new_tokens, temperature=temperature)[2]
    return texts


def training_dtype(accelerator, frozen_base):
    """Weights dtype for training: fp32 master weights for full fine-tuning (at lr 1e-6, bf16 weights
    would round most updates away), also on a GPU where the passes run under bf16 autocast. A frozen
    base (LoRA: peft keeps the adapters in fp32) and DeepSpeed (it keeps its own fp32 masters) load
    in the autocast dtype on a GPU."""
    from accelerate import DistributedType

    if accelerator.device.type == "cuda" and (frozen_base or accelerator.distributed_type == DistributedType.DEEPSPEED):
        return {"bf16": "bfloat16", "fp16": "float16"}[accelerator.mixed_precision]
    return "float32"


class ImageError(ValueError):
    """An image that cannot be used. `reason`: 'missing image' or 'unreadable image'; str(): the detail."""

    def __init__(self, reason, detail):
        super().__init__(detail)
        self.reason = reason


def open_image(ref, base_dir="", max_pixels=0, verify_only=False):
    """An image as RGB PIL, or None when the row has none (`ref` None or '').

    ref: a PIL image, a path (a relative one starts from `base_dir`), raw bytes, the hub's undecoded
    {"bytes", "path"} struct, or a list of those (several images: stacked top to bottom, one picture).
    The pixels are decoded here, so a truncated file fails now and not inside a batch; `verify_only`
    checks the file without decoding (fast, for a first pass over a large dataset; PIL's verify checks
    PNG checksums but not every format, so a later decode can still fail) and returns None.
    Downscaled to at most max_pixels (0 = as it is), keeping the aspect ratio. Raises ImageError.
    """
    import io

    from PIL import Image

    if ref is None or (isinstance(ref, str) and not ref.strip()):
        return None
    if isinstance(ref, list):
        images = [im for im in (open_image(r, base_dir, 0, verify_only) for r in ref) if im is not None]
        if not images:  # verify_only, or only empty entries
            return None
        return _downscale(images[0] if len(images) == 1 else _stack(images), max_pixels)
    if isinstance(ref, Image.Image):
        return None if verify_only else _downscale(ref.convert("RGB"), max_pixels)
    data, path = (ref.get("bytes"), ref.get("path")) if isinstance(ref, dict) else \
        (ref, None) if isinstance(ref, (bytes, bytearray)) else (None, str(ref))
    if not data:
        if not path:
            return None
        path = os.path.join(base_dir, path) if base_dir and not os.path.isabs(path) else path
        if not os.path.isfile(path):
            raise ImageError("missing image", f"cannot read {path}: no such file")
    try:
        with Image.open(io.BytesIO(data) if data else path) as image:
            if verify_only:
                image.verify()
                return None
            return _downscale(image.convert("RGB"), max_pixels)
    except Exception as e:  # noqa: BLE001 (PIL raises many kinds of errors on a broken file)
        raise ImageError("unreadable image", f"cannot read {path or 'embedded image'} ({type(e).__name__}: {e})") from e


def _downscale(image, max_pixels):
    from PIL import Image

    w, h = image.size
    if max_pixels and w * h > max_pixels:
        scale = math.sqrt(max_pixels / (w * h))
        image = image.resize((max(28, int(w * scale)), max(28, int(h * scale))), Image.BICUBIC)
    return image


def _stack(images):
    from PIL import Image

    canvas = Image.new("RGB", (max(i.width for i in images), sum(i.height for i in images)), "white")
    y = 0
    for image in images:
        canvas.paste(image, (0, y))
        y += image.height
    return canvas


def load_image(root, rel_path, max_pixels=0, where=""):
    """An SFT/RL JSONL row's image (a path relative to the file's folder; None stays None) as RGB,
    downscaled to at most max_pixels. A file that cannot be read is a ValueError naming `where`."""
    try:
        return open_image(rel_path, root, max_pixels)
    except ImageError as e:
        raise ValueError(f"{where}: field 'image': {e}") from e


# Problems with ground truth: 01's pool and 03's RL prompts come from the same kinds of sources.


@dataclasses.dataclass
class DataArgs:
    """Where problems come from: 01 (the pool the policy answers) and 03 (the RL prompts) share these."""

    data: str = "toy"
    """'toy' (the two-step task), 'toy-dots' (the dots task, the contrast), a Hugging Face dataset id, or a local .jsonl/.json/.parquet file"""
    split: str = "train"
    """dataset split (toy: train or test)"""
    image_column: str = "image"
    """column with the image: an Image feature, or a file path (relative to a local data file); '' = text only (03; 01 needs images)"""
    question_column: str = "question"
    """column with the question text"""
    answer_column: str = "answer"
    """column with the gold answer"""
    choices_column: str = "choices"
    """column with the list of option texts, in A, B, C order ('' = none)"""
    id_column: str = "id"
    """column with a unique row id ('' = number the rows)"""


def load_problems(args, size, seed):
    """(dataset, folder that relative image paths start from) for `args` (a DataArgs).

    The toy makes `size` problems from seed range `seed`; other data is cut to a `seed`-shuffled
    sample of `size` rows (0 = all). Images stay encoded (decoded batch by batch with open_image, so
    a broken one costs its row, not the run). A column that is not there is an error naming those
    found, except --choices_column and --id_column left at their defaults: `args` then says '' (none).
    """
    import datasets

    import toy

    base_dir = "."
    if args.data in toy.TASKS:
        ds = toy.toy_dataset(args.split, size or 1200, seed=seed, task=args.data)
    elif os.path.isfile(args.data):
        kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(os.path.splitext(args.data)[1])
        if kind is None:
            raise ValueError(f"{args.data}: expected a .jsonl, .json or .parquet file")
        ds = datasets.load_dataset(kind, data_files=args.data, split="train")
        base_dir = os.path.dirname(os.path.abspath(args.data))
    elif os.path.splitext(args.data)[1] in (".jsonl", ".json", ".parquet"):
        raise FileNotFoundError(f"--data {args.data}: no such file")
    else:
        ds = datasets.load_dataset(args.data, split=args.split)
    for name in ("choices_column", "id_column"):  # left at their defaults, these may be absent: none
        if getattr(args, name) == DataArgs.__dataclass_fields__[name].default and getattr(args, name) not in ds.column_names:
            setattr(args, name, "")
            if name == "id_column":
                print(f"{args.data}: no 'id' column: rows are numbered row0, row1, ... within the sample, so "
                      "resuming into the same output folder needs the same --seed and sample size")
    columns = {"image": args.image_column, "question": args.question_column, "answer": args.answer_column,
               "choices": args.choices_column, "id": args.id_column}
    missing = [f"--{k}_column {v!r}" for k, v in columns.items() if v and v not in ds.column_names]
    if missing:
        raise ValueError(f"{args.data}: no column for {', '.join(missing)}; the columns found are {ds.column_names}")
    if args.image_column and isinstance(ds.features[args.image_column], datasets.Image):
        ds = ds.cast_column(args.image_column, datasets.Image(decode=False))
    if args.data not in toy.TASKS and size and len(ds) > size:
        ds = ds.shuffle(seed=seed).select(range(size))
    return ds, base_dir


def screen_problems(ds, args, gold_problem=lambda gold: None if gold else "empty gold"):
    """Checks that need no image. Returns (problems, skipped); a problem keeps its dataset row index.

    Skipped: duplicate ids, empty questions, and golds for which `gold_problem` names a reason. The toy's structured
    `solution` is carried along when present (01's oracle teacher reads it).
    """
    import re

    cols = [c for c in (args.id_column, args.question_column, args.answer_column, args.choices_column, "solution")
            if c and c in ds.column_names]
    problems, skipped, seen = [], [], set()
    for i, r in enumerate(ds.select_columns(cols).to_list()):
        pid = re.sub(r"[^\w.-]", "_", str(r[args.id_column])) if args.id_column else f"row{i}"  # safe as a file name
        question = r[args.question_column] if isinstance(r[args.question_column], str) else ""
        gold = str(r[args.answer_column]).strip() if r[args.answer_column] is not None else ""
        reason, detail = (("duplicate id", "") if pid in seen else ("empty question", "") if not question.strip()
                          else (gold_problem(gold), f"gold {gold!r}"))
        if reason:
            skipped.append({"id": pid, "row": i, "reason": reason, "detail": detail})
            continue
        seen.add(pid)
        p = {"id": pid, "row": i, "question": question.strip(), "answer": gold,
             "choices": [str(c) for c in (r[args.choices_column] or [])] if args.choices_column else []}
        if "solution" in r:
            p["solution"] = r["solution"]
        problems.append(p)
    return problems, skipped


def evaluate_toy(model, processor, *, n, style, max_new_tokens=48, batch_size=64, desc="eval"):
    """Greedy answers to the first n toy test problems of the model's own toy task (`processor.task`),
    scored like the training reward.

    Returns (result, samples). result: the shares well-formed (the layout `style` teaches: the
    reflective one of R_format, or plain CoT), with a reflection, first and final answer right,
    and `per_family` final accuracy. 04_eval.py is the full evaluation; this is the quick check
    00 and 02 print.
    """
    from collections import defaultdict

    import rewards
    import toy

    test = toy.toy_dataset("test", n, task=getattr(processor, "task", "toy"))
    texts = generate_responses(model, processor, test["question"], test["image"], system_prompt=SYSTEM_PROMPTS[style],
                               max_new_tokens=max_new_tokens, batch_size=batch_size, desc=desc)
    variant = "paper" if style == "reflect" else "grpo"
    scores = [rewards.srpo_reward(t, row["answer"], variant=variant, choices=row["choices"] or None)
              for t, row in zip(texts, test)]
    per = defaultdict(list)
    for row, s in zip(test, scores):
        per[row["family"]].append(s["final_correct"])
    result = {"n": n, "well_formed": sum(s["format"] > 0 for s in scores) / n,
              "has_reflection": sum(s["has_reflection"] for s in scores) / n,
              "first_correct": sum(s["first_correct"] for s in scores) / n,
              "final_correct": sum(s["final_correct"] for s in scores) / n,
              "per_family": {f: sum(v) / len(v) for f, v in sorted(per.items())}}
    samples = [{"id": row["id"], "answer": row["answer"], "response": t, **{k: s[k] for k in
               ("format", "first_correct", "final_correct")}} for t, row, s in zip(texts, test, scores)]
    return result, samples


# ----------------------------------------------------------------------------------------------
# Comparing two models on the same items


def paired_difference(rows_a, rows_b):
    """Final-answer accuracy of model a minus model b on the items both answered, with a 95% interval.

    Paired: each item contributes (a right) - (b right) in {-1, 0, 1}, so the interval is that of the
    mean of those differences (normal approximation), much narrower than two independent intervals
    when the models agree on most items. Fractions, like the headline figures.
    Example: a right on 3 of 4 items, b on 1 of them -> difference 0.5.
    """
    b = {r["id"]: bool(r["correct"]) for r in rows_b}
    d = [float(bool(r["correct"])) - float(b[r["id"]]) for r in rows_a if r["id"] in b]
    if not d:
        return None
    n, mean = len(d), sum(d) / len(d)
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1)) if n > 1 else 0.0
    half = 1.96 * sd / math.sqrt(n)
    return {"difference": round(mean, 4), "ci95": [round(mean - half, 4), round(mean + half, 4)], "n": n}


# ----------------------------------------------------------------------------------------------
# Files: JSONL logs, checkpoints, plots


def append_jsonl(path, row):
    """Append one row and flush, so a crash loses at most the row being written."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()


def read_jsonl(path):
    """Rows of a JSONL file ([] if missing). A torn last line (crash mid-write) is dropped."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}: line {i + 1} is not valid JSON ({e})") from e
    return rows


def save_training_state(path, *, model, optimizer, scheduler, step, extra=None):
    """Everything `--resume` needs: trainable weights, optimizer, scheduler, RNG states, step.

    Written to `path.tmp` and swapped in when complete, so a crash while saving leaves the previous
    checkpoint whole.
    """
    from safetensors.torch import save_file

    tmp = path.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    trainable = {n: p.detach().cpu().contiguous() for n, p in unwrap(model).named_parameters() if p.requires_grad}
    save_file(trainable, os.path.join(tmp, "trainable.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
                "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
                "extra": extra or {}}, os.path.join(tmp, "state.pt"))
    swap_in(tmp, path)


def swap_in(tmp, path):
    """Replace folder `path` by the complete folder `tmp`. The old one is renamed aside first, so at
    every moment one whole checkpoint exists under `path` or `path.old` (see find_checkpoint)."""
    old = path.rstrip("/") + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(path):
    """`path` if it holds a checkpoint, else the `path.old` a crash inside swap_in left, else None."""
    for p in (path, path.rstrip("/") + ".old"):
        if os.path.isdir(p):
            return p
    return None


def remove_checkpoint(path):
    """Delete the checkpoint at `path` and any `path.old` beside it (a fresh run starts clean)."""
    for p in (path, path.rstrip("/") + ".old"):
        shutil.rmtree(p, ignore_errors=True)


def load_training_state(path, *, model, optimizer, scheduler):
    """Restore what `save_training_state` wrote; returns (step, extra)."""
    from safetensors.torch import load_file

    weights = load_file(os.path.join(path, "trainable.safetensors"))
    params = dict(unwrap(model).named_parameters())
    with torch.no_grad():
        for n, w in weights.items():
            params[n].copy_(w)
    state = torch.load(os.path.join(path, "state.pt"), weights_only=False)  # our own file, written above
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    torch.set_rng_state(state["rng"]["torch"])
    return state["step"], state["extra"]


def is_sharded(accelerator) -> bool:
    """ZeRO (DeepSpeed) or FSDP: no process holds the whole model and optimizer state."""
    from accelerate import DistributedType

    return accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)


def weights_sharded(accelerator) -> bool:
    """ZeRO-3 or FSDP: each process holds only a shard of the weights, so every forward pass is a
    collective that all processes must join (generation then needs synced_gpus)."""
    from accelerate import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return accelerator.state.deepspeed_plugin.zero_stage == 3
    return accelerator.distributed_type == DistributedType.FSDP


def prepare_deepspeed(accelerator, micro_batch, grad_clip):
    """DeepSpeed wants its per-GPU micro-batch before `prepare` (which gets no dataloader here), and
    clips gradients with its own config's value: say so when it differs from ours."""
    from accelerate import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = micro_batch
    clip = config.get("gradient_clipping")
    if clip in (None, "auto"):  # unset: ours (DeepSpeed would not clip; accelerate would fill in 1.0)
        config["gradient_clipping"] = grad_clip
    elif float(clip) != grad_clip:
        accelerator.print(f"note: DeepSpeed clips gradients at {clip} (its config's gradient_clipping), not at {grad_clip}")


def save_checkpoint(accelerator, path, *, model, optimizer, scheduler, step, extra=None, sharded=False):
    """02's and 03's checkpoint for --resume; every process calls it. Sharded runs (ZeRO, FSDP) write
    accelerate's per-process state (call accelerator.register_for_checkpointing(scheduler) once);
    DDP and single-process runs write save_training_state's files once."""
    tmp = path + ".tmp"
    if sharded:
        accelerator.save_state(tmp)
        if accelerator.is_main_process:
            with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
                json.dump({"step": step, "extra": extra or {}}, f)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:  # swap in the new checkpoint only once it is complete
            swap_in(tmp, path)
    elif accelerator.is_main_process:  # every process holds the same weights: write once
        save_training_state(path, model=model, optimizer=optimizer, scheduler=scheduler, step=step, extra=extra)
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator, path, *, model, optimizer, scheduler, sharded=False):
    """Restore what save_checkpoint wrote; returns (step, extra)."""
    if sharded:
        accelerator.load_state(path)
        with open(os.path.join(path, "trainer_state.json")) as f:
            state = json.load(f)
        return state["step"], state["extra"]
    return load_training_state(path, model=model, optimizer=optimizer, scheduler=scheduler)


SAVE_DTYPES = ("auto", "float32", "bfloat16", "float16")


def check_save_dtype(name):
    """Fail at the start of a run, not after it, on a --save_dtype that save_final cannot use."""
    if name not in SAVE_DTYPES:
        raise ValueError(f"--save_dtype must be one of {', '.join(SAVE_DTYPES)}; got {name!r}")


def save_final(accelerator, model, processor, out_dir, *, sharded=False, merge_lora=False, dtype="auto"):
    """The trained model as safetensors in out_dir; every process calls it. Sharded: the full state
    dict is gathered first (a collective), then the main process writes it.

    dtype (full fine-tuning, not sharded): 'auto' = bf16 after a bf16-autocast run, whose fp32 master
    weights were there for the updates only (half the disk; what the paper's checkpoints are), else
    as trained; or 'float32' / 'bfloat16' / 'float16'. The model is cast in place: call this when
    training is done. Sharded runs save what they gather (ZeRO: its bf16 weights; FSDP: fp32).
    """
    if not sharded:
        dtype = (torch.bfloat16 if accelerator.mixed_precision == "bf16" else None) if dtype == "auto" else \
            getattr(torch, dtype)
        if dtype is not None and not hasattr(accelerator.unwrap_model(model), "peft_config"):  # full fine-tuning
            accelerator.unwrap_model(model).to(dtype)
        if accelerator.is_main_process:
            save_model(accelerator.unwrap_model(model), processor, out_dir, merge_lora=merge_lora)
    else:
        if merge_lora:
            accelerator.print("--merge_lora is not supported under ZeRO/FSDP; merge the saved adapter afterwards")
        state_dict = accelerator.get_state_dict(model)  # ZeRO-3: None on all processes but the main one
        if accelerator.is_main_process:
            accelerator.unwrap_model(model).save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)
            processor.save_pretrained(out_dir)
    accelerator.wait_for_everyone()


def cosine_schedule(optimizer, warmup_steps, total_steps, min_ratio=0.0):
    """Linear warm-up then cosine decay to `min_ratio` x lr."""

    def f(step):
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, f)


def plot_metrics(rows, keys, path, title=""):
    """Line plot of `keys` against `step` from metric rows; writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for ax, key in zip(axes[0], keys):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts))
        ax.set_title(key)
        ax.set_xlabel("step")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
