"""What the model reads: the system prompts, chat-formatted and encoded prompts and SFT targets,
batches with images (selecting rows with their image patches), images, problems with gold answers
(01's pool), the RL prompts and each step's share of them (03), and the JSONL files every stage writes.
"""

import dataclasses
import json
import math
import os

import torch

from machinery import cli

# ----------------------------------------------------------------------------------------------
# Prompts (paper Sec. 3.1: the reflective format; the base model answers in plain chain of thought)

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
# Encoding


# Given to every chat template: Qwen3.5's then closes its think block empty, since the paper's format
# writes its own <think> tags in the completion; templates without the switch (Qwen2.5-VL, Qwen3-VL-Instruct)
# ignore it. The one family difference in the prompt (policy.MODEL_FAMILIES has the others).
PROMPT_OPTIONS = {"enable_thinking": False}


def build_prompt(processor, question, has_image, system_prompt):
    """Chat-formatted prompt text ending with the assistant header; the image comes before the question."""
    content = ([{"type": "image"}] if has_image else []) + [{"type": "text", "text": question}]
    messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": content}]
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **PROMPT_OPTIONS)


def _as_rgb(images):
    return [im.convert("RGB") for im in images if im is not None]


def encode_prompts(processor, questions, images, system_prompt):
    """Left-padded prompts for generation: input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids."""
    texts = [build_prompt(processor, q, im is not None, system_prompt) for q, im in zip(questions, images)]
    return processor(text=texts, images=_as_rgb(images) or None, padding=True, return_tensors="pt",
                     padding_side="left")


def encode_sft(processor, questions, images, targets, system_prompt, untrained_prefix=""):
    """Right-padded prompt + assistant target with `labels` = -100 everywhere except the target (Eq. 1).

    The target ends with the chat end-of-turn token, which is trained too, so the model learns to stop.
    untrained_prefix: a tag (e.g. "<reflection>"); the part of each target before it, up to its last
    non-space character, is context, not trained on (02's --no-train_first_attempt: the policy's own first
    attempt stays out of the loss). The separator after it ("\n") is trained, and so is a token that merges
    the attempt's end with it (a BPE ">\n"): that token is the decision to go on after the first answer,
    and were it masked, rows that stop there (01's direct rows) would be the only ones to teach it.
    """
    tok = processor.tokenizer
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    prompts = [build_prompt(processor, q, im is not None, system_prompt) for q, im in zip(questions, images)]
    # Encode prompt-only first: its length (image tokens expanded) is where the target starts.
    contexts = [p + t[:t.find(untrained_prefix)].rstrip() if untrained_prefix and untrained_prefix in t else p
                for p, t in zip(prompts, targets)]
    context = processor(text=contexts, images=_as_rgb(images) or None, padding=True, return_tensors="pt",
                        padding_side="right")
    prompt_lens = [int(m.sum()) for m in context["attention_mask"]]
    full = [p + t + "<|im_end|>" for p, t in zip(prompts, targets)]
    batch = processor(text=full, images=_as_rgb(images) or None, padding=True, return_tensors="pt",
                      padding_side="right")
    labels = batch["input_ids"].clone()
    for i, n in enumerate(prompt_lens):
        if contexts[i] != prompts[i]:  # where the context's tokens end merged with what follows (BPE ">\n"),
            differ = (batch["input_ids"][i, :n] != context["input_ids"][i, :n]).nonzero()  # train from there
            n = int(differ[0]) if len(differ) else n
        labels[i, :n] = -100
    labels[batch["attention_mask"] == 0] = -100
    assert (labels[batch["attention_mask"].bool()] != -100).sum() > 0 and eot in batch["input_ids"]
    batch["labels"] = labels
    return batch


# ----------------------------------------------------------------------------------------------
# Batches with images: Qwen-VL's pixel_values are flat (all patches of all images, row after row) and
# image_grid_thw has one (t, h, w) per image, so selecting or repeating rows selects patch blocks too.


def image_ranges(batch, vision_start_id):
    """Per row (first image, end image, first patch, end patch) in image_grid_thw and pixel_values."""
    per_row = (batch["input_ids"] == vision_start_id).sum(1).tolist()
    patches = [0] + batch["image_grid_thw"].prod(-1).cumsum(0).tolist()
    out, i = [], 0
    for n in per_row:
        out.append((i, i + n, patches[i], patches[i + n]))
        i += n
    return out


def select_rows(batch, rows, vision_start_id):
    """Sub-batch `rows` (a list of row indices, repeats allowed) with their images' patches."""
    out = {k: v[rows] for k, v in batch.items() if k not in ("pixel_values", "image_grid_thw")}
    if "pixel_values" in batch:
        ranges = image_ranges(batch, vision_start_id)
        images = [j for r in rows for j in range(ranges[r][0], ranges[r][1])]
        if images:
            out["image_grid_thw"] = batch["image_grid_thw"][images]
            out["pixel_values"] = torch.cat([batch["pixel_values"][ranges[r][2]:ranges[r][3]] for r in rows])
    return out


def repeat_for_group(batch, G, vision_start_id):
    """Each prompt repeated G times in a row: (P, ...) -> (P*G, ...), images included (GRPO's groups,
    and the k samples per item of 04's headroom gauge)."""
    P = batch["input_ids"].shape[0]
    return select_rows(batch, [i for i in range(P) for _ in range(G)], vision_start_id)


# ----------------------------------------------------------------------------------------------
# Images


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
    downscaled to at most max_pixels. A file that cannot be read is a UserError naming `where`."""
    try:
        return open_image(rel_path, root, max_pixels)
    except ImageError as e:
        raise cli.UserError(f"{where}: field 'image': {e}") from e

# ----------------------------------------------------------------------------------------------
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
            raise cli.UserError(f"{args.data}: expected a .jsonl, .json or .parquet file")
        if kind == "json":
            check_json_file(args.data)  # datasets' own error names neither the file nor the line
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
        raise cli.UserError(f"{args.data}: no column for {', '.join(missing)}; the columns found are {ds.column_names}")
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


# ----------------------------------------------------------------------------------------------
# RL prompts (03): the problems, their images read per step, and each step's share of them


def load_prompts(args, log=print, progress=True):
    """RL prompts from --data (the toy, a hub dataset or a local file, with 01's column flags): dicts
    with id, question, answer, choices, and the dataset `row` that `batch_images` reads the image of.

    Rows with no question or gold are skipped, and so are rows whose image is missing or fails a
    check without decoding; each kind is reported with a few ids.
    """
    import toy
    from tqdm.auto import tqdm

    # Toy prompts: the train seeds of the range --seed + 1, which may overlap stage 1's pool (01 draws
    # from seed x pool_size on); the test split is apart from both.
    size = args.train_size or (2000 if args.data in toy.TASKS else 0)
    ds, base_dir = load_problems(args, size, args.seed + 1)
    problems, skipped = screen_problems(ds, args)
    # One image source shared by all prompts: the column stays in the (memory-mapped) dataset and a
    # step reads its own rows only, so no process holds every image.
    source = {"cells": ds.select_columns([args.image_column]) if args.image_column else None,
              "column": args.image_column, "base_dir": base_dir}
    prompts = []
    quiet = not progress or len(problems) < 10_000 or source["cells"] is None
    for p in tqdm(problems, desc="checking images", disable=quiet):
        try:
            open_image(image_cell(source, p["row"]), base_dir, verify_only=True)
        except ImageError as e:
            skipped.append({"id": p["id"], "row": p["row"], "reason": e.reason, "detail": str(e)})
            continue
        prompts.append({"index": len(prompts), "id": p["id"], "question": p["question"],
                        "answer": p["answer"], "choices": p["choices"], "row": p["row"], "source": source})
    for reason in sorted({s["reason"] for s in skipped}):
        rows = [s for s in skipped if s["reason"] == reason]
        log(f"{args.data}: skipped {len(rows)} row(s), {reason}: "
            + "; ".join(f"row {s['row'] + 1} (id {s['id']}) {s['detail']}".strip() for s in rows[:3])
            + (" ..." if len(rows) > 3 else ""))
    if not prompts:
        raise cli.UserError(f"{args.data}: no usable RL prompts (all {len(skipped)} rows skipped, "
                            "reasons above)")
    return prompts


def image_cell(source, row):
    return source["cells"][row][source["column"]] if source["cells"] is not None else None


def batch_images(batch, prompts, max_pixels, log=print):
    """(prompts, images) for a step, decoded now. A prompt whose image fails to decode (the start-up
    check cannot catch every broken file) is replaced by the next one in `prompts` that decodes, so
    the batch keeps its size, the same on every run and every process."""
    out_prompts, images = [], []
    for p in batch:
        for q in (prompts[(p["index"] + k) % len(prompts)] for k in range(len(prompts))):
            try:
                cell = image_cell(q["source"], q["row"])
                images.append(open_image(cell, q["source"]["base_dir"], max_pixels))
                out_prompts.append(q)
                break
            except ImageError as e:
                log(f"row {q['row'] + 1} (id {q['id']}): {e}; using the next prompt instead")
        else:
            raise ValueError("no RL prompt has an image that decodes")
    return out_prompts, images


def step_prompts(prompts, step, n, seed, rank, world):
    """This process's prompts for `step`: a deterministic function of (seed, step) so resume and
    every rank agree on the global batch; ranks take disjoint slices of it."""
    g = torch.Generator().manual_seed(seed * 100_003 + step)
    idx = torch.randint(len(prompts), (n * world,), generator=g).tolist()
    return [prompts[i] for i in idx[rank::world]]


# ----------------------------------------------------------------------------------------------
# Training


# ----------------------------------------------------------------------------------------------
# JSONL: every stage's rows and logs


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
            raise cli.UserError(f"{path}: line {i + 1} is not valid JSON ({e})") from e
    return rows


def check_json_file(path):
    """Raise a UserError naming the file and line of the first malformed row of a .jsonl (one JSON
    object per line) or .json file (one JSON document)."""
    with open(path) as f:
        text = f.read()
    if path.endswith(".json") and text.lstrip()[:1] in ("[", "{"):
        try:
            json.loads(text)
            return
        except json.JSONDecodeError as e:
            if text.lstrip()[:1] == "[":
                raise cli.UserError(f"{path}: line {e.lineno} is not valid JSON ({e.msg})") from None
            # a .json file of one object per line: checked line by line below
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise cli.UserError(f"{path}: line {i} is not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise cli.UserError(f"{path}: line {i} is a JSON {type(row).__name__}, not an object of named fields")
