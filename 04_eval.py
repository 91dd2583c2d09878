"""Stage 3: evaluate policies on the paper's benchmarks (PAPER.md, "Evaluation").

Each item is answered once, greedily. A reflective response reads

    <think>..</think> <answer>A1</answer> <reflection>..</reflection> <think>..</think> <answer>A2</answer>

and we score the LAST answer A2 (the authors' scripts scored A1, the pre-reflection one). A1 is scored
too, so we can see what the reflection did: wrong->right, right->wrong, and at what length.

Scoring is rule-based and follows each benchmark's own official scorer (MathVista: normalise by answer
type and precision; MathVision: last \\boxed{}, letter heuristics, numeric/LaTeX equivalence; MMMU-Pro:
option-letter parsing). `score(benchmark, item, response)` is the entry point. With --judge_base_url an
OpenAI-compatible model extracts the answers first, as the authors did with GPT-4o.

    python 04_eval.py                                    # toy test split, runs/toy/srpo (~20 s, 2 CPU cores)
    python 04_eval.py --models base=models/toy_base@plain,sft=runs/toy/sft,srpo=runs/toy/srpo,grpo=runs/toy/grpo@plain,\
        scratchpad=runs/toy/scratchpad@plain             # what `make demo` compares
    python 04_eval.py --benchmark toy-dots --models base=runs/toy-dots/base@plain,srpo=runs/toy-dots/srpo
    # A local copy of a real benchmark (here the MathVision items in ../shared/data). Real benchmarks get
    # 4096 new tokens by default: a toy model would take minutes per batch, so cap both for a look.
    python 04_eval.py --benchmark mathvision --split testmini --data_dir ../shared/data/mathvision_testmini \
        --model runs/toy/srpo --limit 16 --max_new_tokens 128
    python 04_eval.py --benchmark mathvista --model Qwen/Qwen2.5-VL-7B-Instruct --batch_size 32

Writes out_dir/<benchmark>-<split>/<model>/: items.jsonl (one row per item; a rerun skips the rows
already there), summary.json, summary.md; with several models also comparison.{md,json,png}.
"""

import ast
import json
import math
import os
import re
import time
import urllib.error
import urllib.request
from collections import defaultdict
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

from tqdm.auto import tqdm

import common
import rewards


@dataclass
class Args:
    """Evaluate one model, or compare several, on a benchmark; print and save the tables."""

    benchmark: str = "toy"
    """toy (the two-step task) | toy-dots (the dots task) | mathvista | mathverse | mathvision | mmmu_pro"""
    split: str = ""
    """split ('' = the benchmark's default, see DEFAULT_SPLITS); for mmmu_pro the settings, comma-separated"""
    data_dir: str = ""
    """local copy in the official release layout (see load_items); '' = the Hugging Face hub"""
    model: str = "runs/toy/srpo"
    """the model to evaluate: a save_pretrained/LoRA directory or a hub id"""
    models: str = ""
    """comparison mode: name=path,name=path (overrides --model); one table and one bar chart across them"""
    prompt: str = "reflect"
    """system prompt: reflect (the trained answer-reflect-answer format) or plain (think, then answer)"""
    max_new_tokens: int = 0
    """new tokens per response (0 = 128 on toy, as 03_grpo.py trains; 4096 on the real benchmarks, as the paper)"""
    batch_size: int = 64
    """prompts per generate call, saved after each; CPU decoding is overhead-bound, so big batches are fast"""
    limit: int = 0
    """evaluate the first N items only (0 = all; on the toy tasks, 0 = 1,000 test problems)"""
    seed: int = 0
    """toy tasks: which test set to draw (a different seed, different problems; `make demo SEED=n`)"""
    out_dir: str = "runs/eval"
    """where results go"""
    dtype: str = "auto"
    """model dtype: auto (bf16 on GPU, fp32 on CPU), bfloat16, float16, float32"""
    load_in_4bit: bool = False
    """load the model in nf4 (bitsandbytes) to fit a small GPU"""
    judge_base_url: str = ""
    """OpenAI-compatible endpoint for answer extraction, e.g. https://api.openai.com/v1 ('' = rule-based)"""
    judge_model: str = "gpt-4o"
    """judge model name (the authors used GPT-4o)"""
    judge_api_key_env: str = "OPENAI_API_KEY"
    """environment variable holding the judge's API key (the key is never printed or saved)"""


DEFAULT_SPLITS = {"toy": "test", "toy-dots": "test", "mathvista": "testmini", "mathverse": "testmini", "mathvision": "test",
                  "mmmu_pro": "standard (10 options),vision"}
TOY_BENCHMARKS = ("toy", "toy-dots")  # the toy tasks of toy.py, graded like the training reward
TOY_TEST_SIZE = 1000  # enough for about +-3 points at 95% (00_base_model.py reports on the first 1,000 too)
MATHVERSE_VERSIONS = ["Text Dominant", "Text Lite", "Vision Intensive", "Vision Dominant", "Vision Only"]
NOT_IN_OVERALL = {"Text Only"}  # MathVerse reports its text-only variant beside the five versions, not in them
MACRO_AVERAGED = {"mathverse", "mmmu_pro"}  # overall = mean over versions / settings, as those papers report


# ----------------------------------------------------------------------------------------------
# Items: every loader returns rows in the benchmark's own schema plus four common fields:
#   _id (str, unique), _question (the user prompt), _image (see common.open_image), _category (reported separately)


def load_items(benchmark, split="", data_dir="", limit=0, seed=0):
    """The benchmark's items, from the Hugging Face hub or from a local copy (`data_dir`).

    Local copies, as the benchmarks publish them (.jsonl, .json or .parquet, in data_dir or data_dir/data):
      mathvision  {split}.jsonl + images/          (the GitHub release, e.g. ../shared/data/mathvision_testmini)
      mathvista   testmini.json + images/          (the GitHub release; prompts from query.json when present)
      mathverse   testmini.json + testmini_text_only.json + images/   (the release; images unzipped)
      mmmu_pro    "standard (10 options)/" and "vision/" folders of parquet shards (the hub repo layout)
    Parquet exports of the hub splits work for all of them; images may be paths (relative to data_dir
    or data_dir/images), raw bytes, or the hub's {"bytes", "path"} structs.
    """
    split = split or DEFAULT_SPLITS[benchmark]
    loaders = {"toy": partial(_load_toy, task="toy", seed=seed), "toy-dots": partial(_load_toy, task="toy-dots", seed=seed),
               "mathvista": _load_mathvista, "mathverse": _load_mathverse,
               "mathvision": _load_mathvision, "mmmu_pro": _load_mmmu_pro}
    if benchmark not in loaders:
        raise ValueError(f"unknown benchmark {benchmark!r}; choose from {sorted(loaders)}")
    items = loaders[benchmark](split, data_dir, limit)
    return items[:limit] if limit else items


def _item(row, *, id, question, image, category):
    return {**row, "_id": str(id), "_question": question, "_image": image, "_category": category}


def _load_toy(split, data_dir, limit, *, task, seed):
    import toy

    ds = toy.toy_dataset(split, limit or TOY_TEST_SIZE, seed=seed, task=task)
    return [_item(r, id=r["id"], question=r["question"], image=r["image"], category=r["family"]) for r in ds]


def _load_mathvista(split, data_dir, limit):
    if data_dir:
        rows, queries = _local_rows(data_dir, split), {}
        query_file = _find_local(data_dir, "query", (".json",))
        if query_file:
            queries = json.loads(query_file.read_text())
    else:
        rows, queries = _hub_rows("AI4Math/MathVista", None, split), {}
    items = []
    for r in rows:
        image = r.pop("decoded_image", None) or _image_ref(data_dir, r.get("image"))
        question = r.get("query") or queries.get(str(r["pid"])) or _mathvista_query(r)
        items.append(_item(r, id=r["pid"], question=question, image=image, category=r["metadata"]["task"]))
    return items


def _load_mathverse(split, data_dir, limit):
    """The five problem versions (split `testmini`) plus the text-only variant, reported as "Text Only"."""
    parts = [(split, False), (f"{split}_text_only", True)]
    items = []
    for name, text_only in parts:
        try:
            rows = _local_rows(data_dir, name) if data_dir else _hub_rows("AI4Math/MathVerse", name, name)
        except FileNotFoundError as e:
            if not text_only:
                raise
            print(f"[mathverse] no text-only variant, skipping it ({e})")
            continue
        for r in rows:
            image = None if text_only else _image_ref(data_dir, r.get("image"))
            category = "Text Only" if text_only else r["problem_version"]
            id = f"text-only-{r['sample_index']}" if text_only else r["sample_index"]
            items.append(_item(r, id=id, question=r.get("query_cot") or r["question"], image=image, category=category))
    return items


def _load_mathvision(split, data_dir, limit):
    rows = _local_rows(data_dir, split) if data_dir else _hub_rows("MathLLMs/MathVision", None, split)
    items = []
    for r in rows:
        image = r.pop("decoded_image", None) or _image_ref(data_dir, r.get("image"))
        items.append(_item(r, id=r["id"], question=_mathvision_prompt(r), image=image, category=r["subject"]))
    return items


def _load_mmmu_pro(split, data_dir, limit):
    """One or more settings ("standard (10 options)", "vision"), each its own category."""
    items = []
    for setting in [s.strip() for s in split.split(",") if s.strip()]:
        rows = _local_rows(data_dir, setting) if data_dir else _hub_rows("MMMU/MMMU_Pro", setting, "test")
        for r in rows:
            if setting == "vision":  # the question and its options are a screenshot
                question, image = MMMU_VISION_PROMPT, _image_ref(data_dir, r["image"])
            else:
                question = _mmmu_prompt(r)
                image = [_image_ref(data_dir, r[f"image_{n}"]) for n in _mmmu_image_numbers(r)]
            items.append(_item(r, id=f"{setting}/{r['id']}", question=question, image=image, category=setting))
    return items


# Local files and the hub


def _find_local(data_dir, name, exts=(".jsonl", ".json", ".parquet")):
    for folder in (Path(data_dir), Path(data_dir) / "data"):
        for ext in exts:
            if (folder / f"{name}{ext}").is_file():
                return folder / f"{name}{ext}"
    return None


def _local_rows(data_dir, name):
    """Rows of split/config `name` in a local copy: {name}.jsonl|.json|.parquet, or a {name}/ folder of
    parquet shards."""
    path = _find_local(data_dir, name)
    if path:
        return _read_rows(path)
    for folder in (Path(data_dir), Path(data_dir) / "data"):
        shards = sorted((folder / name).glob("*.parquet")) if (folder / name).is_dir() else []
        if shards:
            return [row for shard in shards for row in _read_rows(shard)]
    present = sorted(os.listdir(data_dir)) if os.path.isdir(data_dir) else "the folder does not exist"
    raise FileNotFoundError(f"no {name}.jsonl/.json/.parquet or {name}/*.parquet in {data_dir} "
                            f"(or its data/ folder); found: {present}. Is --split right?")


def _read_rows(path):
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()  # image columns stay {"bytes", "path"} structs
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    data = json.loads(path.read_text())
    return list(data.values()) if isinstance(data, dict) else data  # MathVista's release: {pid: row}


def _hub_rows(repo, config, split):
    """Rows from the hub with images left encoded (compressed bytes): common.open_image decodes them one batch
    at a time, so an undecodable image costs its own row, not the run."""
    import datasets

    ds = datasets.load_dataset(repo, config, split=split)
    for name, feature in ds.features.items():
        if isinstance(feature, datasets.Image):
            ds = ds.cast_column(name, datasets.Image(decode=False))
    return list(ds)


def _image_ref(data_dir, value):
    """What common.open_image will read: a path of a local copy (relative to data_dir, else to data_dir/images),
    or the value as it is (the hub's {"bytes", "path"} struct, bytes, PIL). Empty -> None (text only)."""
    if not value:
        return None
    if not isinstance(value, str):
        return value
    for candidate in (Path(data_dir) / value, Path(data_dir) / "images" / value):
        if candidate.is_file():
            return str(candidate)
    return str(Path(data_dir) / value)  # missing: common.open_image will name this path in the item's error


# Prompts: each benchmark's question as the user turn; the system prompt (reflect/plain) sets the format.

MC_SUFFIX = "Answer with the option's letter."
MMMU_VISION_PROMPT = ("The image shows a multiple-choice question and its options. Solve it. " + MC_SUFFIX)


def _mathvista_query(row):
    """Only for local copies without `query` (the hub rows and the release's query.json have it)."""
    choices = row.get("choices") or []
    lines = "".join(f"\n({chr(65 + i)}) {c}" for i, c in enumerate(choices))
    return row["question"] + (f"\nChoices:{lines}\n{MC_SUFFIX}" if choices else "")


def _mathvision_prompt(row):
    question = re.sub(r"\s*<image\d*>\s*", "\n", row["question"]).strip()  # the image is attached instead
    options = row.get("options") or []
    if not options:
        return question
    letters = [chr(65 + i) for i in range(len(options))]
    if options == letters:  # the options are drawn in the image
        return f"{question}\nChoices: {', '.join(letters)} (see the image).\n{MC_SUFFIX}"
    return question + "\nChoices:" + "".join(f"\n({l}) {o}" for l, o in zip(letters, options)) + f"\n{MC_SUFFIX}"


def _mmmu_options(row):
    options = row["options"]
    return ast.literal_eval(options) if isinstance(options, str) else list(options)  # stored as a str on the hub


def _mmmu_image_numbers(row):
    """Images in the order the question and options mention them (<image 2> ...), as MMMU-Pro's own inference."""
    text = row["question"] + " " + " ".join(map(str, _mmmu_options(row)))
    numbers = list(dict.fromkeys(int(n) for n in re.findall(r"<image (\d+)>", text)))
    return [n for n in numbers if row.get(f"image_{n}") is not None] or ([1] if row.get("image_1") is not None else [])


def _mmmu_prompt(row):
    question = re.sub(r"<image (\d+)>", r"[image \1]", row["question"])
    options = [re.sub(r"<image (\d+)>", r"[image \1]", str(o)) for o in _mmmu_options(row)]
    return question + "".join(f"\n{chr(65 + i)}. {o}" for i, o in enumerate(options)) + f"\n{MC_SUFFIX}"


# ----------------------------------------------------------------------------------------------
# Scoring. score() picks the answer text (final and first), a benchmark scorer judges it.
# Benchmark scorers: (row in the benchmark's schema, answer text) -> {"correct": bool, "extracted": str}


def score(benchmark, item, response, extract=None):
    """Score `response` to `item` (a row in the benchmark's own schema) with the benchmark's rules.

    The FINAL answer decides `correct` (the last <answer> block, its \\boxed{} if any; else the last
    \\boxed{}; else, on the real benchmarks, the whole response, read by the benchmark's own heuristics).
    The first answer is scored the same way. `extract(question, text) -> text` is an optional judge.

    Example:
        >>> score("mathvision", {"answer": "6", "options": []},
        ...       "<think>..</think><answer>5</answer><reflection>I missed one.</reflection>"
        ...       "<think>..</think><answer>\\\\boxed{6}</answer>")["correct"]
        True
    """
    final = rewards.extract_answer(response) or ""
    first = rewards.first_answer(response) or ""
    if benchmark not in TOY_BENCHMARKS:  # the toy tasks grade like the training reward: no answer found = wrong
        final = final or response
    first = first or final
    if extract is not None:  # the judge reads the answer text; the benchmark's rules still decide
        question = item.get("_question") or item.get("question", "")
        same = first == final
        final = extract(question, final)
        first = final if same else extract(question, first)
    scorer = SCORERS[benchmark]
    final_score = scorer(item, final)
    first_score = final_score if first == final else scorer(item, first)
    return {"correct": bool(final_score["correct"]), "extracted": final_score["extracted"],
            "first_correct": bool(first_score["correct"]), "first_extracted": first_score["extracted"],
            "has_reflection": has_reflection(response)}


def has_reflection(response):
    """A well-formed reflection, as the paper's reward pays I_ref for it: exactly one non-empty
    <reflection> block, with no tags inside, between a first answer and a later one."""
    # I_ref does not depend on the gold answer; an empty gold makes the grading inside a no-op.
    return rewards.srpo_reward(response, "")["reflection_format"] > 0


# Shared clean-up for short answers

_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)"
_UNITS = (r"(?:(?:square|sq\.?|cubic)\s*)?(?:cm|mm|km|m|g|kg|mg|s|sec|seconds?|min|minutes?|h|hours?|ml|l|"
          r"units?|degrees?|deg|inch(?:es)?|in|ft|feet|foot|yards?|miles?|meters?|metres?|centimeters?|"
          r"dollars?|cents?|years?|days?|people|points?|percent)(?:\^?\{?[23]\}?|²|³)?")


def _clean(text):
    """A short answer without its wrapping: \\boxed{}, $, \\text{}, degrees, \\left/\\right, a trailing dot.

    Example: _clean("$\\\\boxed{60^{\\\\circ}}$.") -> "60"
    """
    s = (text or "").strip()
    if "\\boxed" in s or "\\fbox" in s:
        s = rewards.extract_boxed(s) or s
    for old, new in (("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\!", ""), ("\\,", " "), ("\\;", " "),
                     ("\\ ", " "), ("~", " "), ("\\$", ""), ("$", ""), ("**", ""), ("\\%", "%"), ("π", "\\pi"),
                     ("−", "-"), ("°", ""), ("\\degree", "")):
        s = s.replace(old, new)
    s = re.sub(r"\\(?:left|right)(?![a-zA-Z])", "", s)
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?", "", s)  # 60^{\circ} -> 60
    s = re.sub(r"\\(?:text|textbf|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}", r"\1", s)
    return s.strip().rstrip(".").strip()


def _to_number(text):
    """The value of a plain numeric answer (units, %, thousands commas allowed), else None.

    Example: _to_number("1,234.5 cm^2") -> 1234.5; _to_number("\\\\frac{3}{4}") -> 0.75; _to_number("2x") -> None
    """
    s = _clean(text)
    if re.match(r"[-+]?\d{1,3}(,\d{3})+(?!\d)", s):
        s = s.replace(",", "")
    s = s.rstrip("%").strip()
    if m := re.fullmatch(rf"({_NUMBER})\s*{_UNITS}?", s, re.I):
        return float(m.group(1))
    if (m := re.fullmatch(rf"({_NUMBER})\s*/\s*({_NUMBER})", s)) and float(m.group(2)) != 0:
        return float(m.group(1)) / float(m.group(2))
    if (m := re.fullmatch(rf"([-+]?)\\frac\{{({_NUMBER})\}}\{{({_NUMBER})\}}", s)) and float(m.group(3)) != 0:
        return (-1 if m.group(1) == "-" else 1) * float(m.group(2)) / float(m.group(3))
    return None


def _last_number(text):
    numbers = re.findall(_NUMBER, re.sub(r"(?<=\d),(?=\d{3}\b)", "", _clean(text)))
    return float(numbers[-1]) if numbers else None


_CUE = re.compile(r"(?:final\s+|correct\s+)?answer\s*(?:is|:)\s*", re.I)


def _answer_tail(text):
    """What follows the last "the answer is" / "Answer:" to the end of its sentence; else the whole text.

    Example: _answer_tail("3 + 2 = 5. So the answer is 5 apples. Done") -> "5 apples"
    """
    cues = list(_CUE.finditer(text or ""))
    if not cues:
        return (text or "").strip()
    lines = [line for line in text[cues[-1].end():].split("\n") if line.strip()]
    return re.split(r"\.\s|\.$", lines[0].strip())[0].strip() if lines else ""


def _squash(s):
    return re.sub(r"\s+", "", s).lower()


def _same_answer(pred, gold):
    """Free-form equivalence after clean-up: rewards.is_correct (numbers, units, degrees, fractions,
    then math-verify for \\sqrt, \\pi, ...)."""
    p, g = _clean(pred), _clean(gold)
    return bool(p and g) and (_squash(p) == _squash(g) or rewards.is_correct(p, g))


def _choice_letter(text, options):
    """The option letter an answer names: "B", "(B)", "B: 10", "B:60°", "option B", or an option's text.
    `options` maps letters to option texts (texts may be ''). Returns '' when none is named."""
    t = text.strip()
    if (m := re.fullmatch(r"\(?([A-Za-z])\)?[.:)]?", t)) and m.group(1).upper() in options:
        return m.group(1).upper()
    if (m := re.match(r"\(?([A-Z])\)?[.:)]\s*\S", t)) and m.group(1) in options:  # "B: 10", "B:60°"
        return m.group(1)
    named = [m.group(1) for m in re.finditer(r"\b(?:option|choice)\s*\(?([A-Z])\)?(?![A-Za-z])", t, re.I)]
    if named and named[-1].upper() in options:
        return named[-1].upper()
    for letter, option in options.items():
        if option and (_squash(_clean(option)) == _squash(t) or _same_number(t, option)):
            return letter
    return ""


def _same_number(a, b):
    x, y = _to_number(a), _to_number(b)
    return x is not None and y is not None and math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-9)


# toy: the training reward's own grading (rewards.is_correct: numbers, letters vs option texts)


def score_toy(item, text):
    return {"correct": rewards.is_correct(text, item["answer"], item.get("choices") or None), "extracted": text.strip()}


# MathVista: as evaluation/calculate_score.py normalises an extracted answer


def score_mathvista(item, text):
    """Multiple choice -> an option text (a letter maps to its option; anything else to the closest
    option by edit distance, as the official scorer does); integer -> str(int(x)); float ->
    str(round(x, precision)); list -> element-wise; text -> case-insensitive or math-verify."""
    answer = str(item["answer"]).strip()
    t = _clean(_answer_tail(text))
    if item.get("question_type") == "multi_choice" and item.get("choices"):
        pred = _mathvista_choice(t, list(item["choices"]))
        return {"correct": pred == answer, "extracted": pred or ""}
    kind = item.get("answer_type")
    if kind in ("integer", "float"):
        x = _to_number(t)
        x = _last_number(t) if x is None else x
        if x is None:
            return {"correct": False, "extracted": ""}
        digits = int(item.get("precision") or 0)
        pred = str(int(x)) if kind == "integer" else str(round(x, digits))
        gold = _to_number(answer)
        if gold is not None:  # "1.0" == "1" and the like
            gold = str(int(gold)) if kind == "integer" else str(round(gold, digits))
        return {"correct": pred in (answer, gold), "extracted": pred}
    if kind == "list":
        pred, gold = _list_items(t), _list_items(answer)
        return {"correct": bool(pred) and pred == gold, "extracted": "[" + ", ".join(pred) + "]"}
    return {"correct": _same_answer(t, answer), "extracted": t}


def _mathvista_choice(t, choices):
    if not t:
        return None  # the official scorer maps even an empty answer to the closest option; we count it wrong
    letters = {chr(65 + i): c for i, c in enumerate(choices)}
    for c in choices:
        if _squash(_clean(c)) == _squash(t):
            return c
    letter = _choice_letter(t, dict.fromkeys(letters, ""))
    if not letter:  # the official rule: the first "(X)" anywhere, as in "(B) 145°"
        letter = next((x.upper() for x in re.findall(r"\(([A-Za-z])\)", t) if x.upper() in letters), "")
    if letter:
        return letters[letter]
    for c in choices:
        if _same_number(t, c):
            return c
    return min(choices, key=lambda c: _edit_distance(t[-200:], c))


def _list_items(s):
    inner = _clean(s).strip().strip("[]()").strip()
    out = []
    for part in (p.strip() for p in inner.split(",") if p.strip()):
        x = _to_number(part)
        out.append(f"{x:g}" if x is not None else part.lower())
    return out


def _edit_distance(a, b):
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


# MathVerse: the official scorer asks GPT-4; this is its rule-based stand-in


def score_mathverse(item, text):
    """Multiple choice -> the option letter (choices are parsed from the question; in the vision-only
    versions they are in the image); free form -> _same_answer (9\\pi, 60°, \\frac{8}{3}, ...)."""
    answer = str(item["answer"]).strip()
    t = _clean(_answer_tail(text))
    if item.get("question_type") == "multi-choice":
        options = _mathverse_options(item.get("question") or "") or {l: "" for l in "ABCDE"}
        pred = _choice_letter(t, options)
        gold = re.match(r"\(?([A-Z])\b", answer)
        return {"correct": bool(pred) and gold is not None and pred == gold.group(1), "extracted": pred}
    return {"correct": _same_answer(t, answer), "extracted": t}


def _mathverse_options(question):
    """{"A": "10", ...} from a "Choices:" block ("A:10", "A. 10", "(A) 10" lines)."""
    block = re.split(r"Choices?\s*:", question, maxsplit=1)
    if len(block) < 2:
        return {}
    return dict(re.findall(r"^\s*\(?([A-H])\)?\s*[:.)]\s*(.*?)\s*$", block[1], re.M))


# MathVision: as its evaluation/evaluate.py and utils.find_math_answer / is_equal


def score_mathvision(item, text):
    """Right when the extracted answer equals the gold letter or the gold option's value."""
    pred = mathvision_extract(text)
    gold = str(item["answer"]).strip()
    options = list(item.get("options") or [])
    index = ord(gold.upper()) - 65 if len(gold) == 1 and gold.isalpha() else -1
    value = str(options[index]) if 0 <= index < len(options) else ""
    correct = _mathvision_equal(pred, gold) or (bool(value) and _mathvision_equal(pred, value))
    return {"correct": correct, "extracted": pred}


def mathvision_extract(text):
    """MathVision's rules: a trailing/leading option letter ("... is C." / "(C)\\n..."), the number after
    a last "is", the text after "the answer is" when nothing is boxed, else the last \\boxed{}; then
    LaTeX clean-up. Lower-cased, as the official scorer compares.

    Example: mathvision_extract("so the answer is $\\\\frac{1}{2}$.") -> "\\\\frac{1}{2}"
    """
    s = (text or "").strip()
    for c in "ABCDE":
        if s.endswith((f" {c}.", f" ({c}).")) or s.startswith((f"{c}\n", f"({c})\n", f"({c}) {c}\n")):
            s = c
    tail = s.split("is ")[-1].rstrip(".")
    if _to_float(tail) is not None:
        s = tail
    if "oxed{" not in s:
        for cue in ("the final answer is", "the answer is", "the correct answer is", "the answer should be"):
            for variant in (cue, cue.replace("the", "The")):
                if variant in s:
                    s = s.split(variant)[-1].strip().split("\n")[0].split(". ")[0]
    return _mathvision_clean(s)


def _mathvision_clean(s):
    """find_math_answer's clean-up, lower-cased: "x = \\dfrac{1}{2}" -> "\\frac{1}{2}", "(B)" -> "b"."""
    s = _clean(s)  # the last \boxed{}, $, \text{}, degrees, \left/\right, dfrac -> frac
    s = re.split(r"=|\\approx", s)[-1]  # "x = 5" -> "5"
    s = s.replace(" ", "").replace("\n", "").replace("+\\infty", "\\infty").replace("bmatrix", "pmatrix")
    s = re.sub(r"\{?(?:units?|km|m\^3)\}?$", "", s)  # the units the official scorer drops
    s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s).lower()  # \sqrt2 -> \sqrt{2}
    s = re.sub(r"^[({]([a-e])[)}]$", r"\1", s)  # (b) -> b
    return s.rstrip(".").lstrip(":").strip()


def _to_float(s):
    try:
        return float(s)
    except ValueError:
        return None


def _mathvision_equal(pred, gold):
    """MathVision's is_equal: case-insensitive match, else equal values rounded to 2 decimals, else math-verify."""
    p, g = pred.strip().lower(), _mathvision_clean(gold)
    if not p or not g:
        return False
    if p == g:
        return True
    if re.fullmatch(r"[a-e]", g):  # a letter answer: only the letter (or the option value) counts
        return False
    pv, gv = _latex_value(p), _latex_value(g)
    if pv is not None and gv is not None:
        return round(pv, 2) == round(gv, 2)
    return bool(rewards.is_correct(p, g))


def _latex_value(s):
    """The number a LaTeX expression evaluates to (\\frac{6-\\sqrt{2}}{2} -> 2.29), else None."""
    x = _to_number(s)
    if x is not None or len(s) > 100 or re.search(r"\^.*\^|\^[\s{(]*\d{4,}", s):  # towers can keep sympy busy
        return x
    try:
        from math_verify import parse

        expr = parse(f"${s}$")
        return float(expr[0].evalf()) if expr and getattr(expr[0], "is_number", False) else None
    except Exception:
        return None


# MMMU-Pro: as its evaluate.py parse_multi_choice_response, but "no answer" instead of a random letter


def score_mmmu_pro(item, text):
    options = _mmmu_options(item)
    letters = [chr(65 + i) for i in range(len(options))]
    pred = mmmu_parse_choice(text, letters, dict(zip(letters, map(str, options))))
    return {"correct": pred == str(item["answer"]).strip(), "extracted": pred}


def mmmu_parse_choice(response, letters, index2ans):
    """The option letter a response picks, by MMMU-Pro's rules in order: a unique letter after the last
    "Answer:"; "(X)"; "X "; "X."; an option's text (responses over 5 words); the last one mentioned wins
    a tie. Letters must stand alone ("Because" does not name B), but as in the official scorer a
    pronoun can count ("I think" names option I of ten). '' = no answer (the official scorer guesses
    a random letter here, which adds noise to every comparison).

    Example: mmmu_parse_choice("... so the mass doubles.\\nAnswer: C", list("ABCD"), {}) -> "C"
    """
    alone = r"(?<![A-Za-z]){}(?![A-Za-z])"
    if (pos := response.rfind("Answer:")) != -1:
        found = [c for c in letters if re.search(alone.format(c), response[pos + 7:])]
        if len(found) == 1:
            return found[0]
    text = " " + response.strip(",.!?;:'") + " "
    patterns = [r"\({}\)", r"(?<![A-Za-z]){} ", r"(?<![A-Za-z]){}\."]
    for pattern in patterns:
        candidates = [c for c in letters if re.search(pattern.format(c), text)]
        if candidates:
            return max(candidates, key=lambda c: max(m.start() for m in re.finditer(pattern.format(c), text)))
    if len(text.split()) > 5:
        lower = text.lower()
        candidates = [c for c in letters if index2ans.get(c) and index2ans[c].lower() in lower]
        if candidates:
            return max(candidates, key=lambda c: lower.rfind(index2ans[c].lower()))
    return ""


SCORERS = {"toy": score_toy, "toy-dots": score_toy, "mathvista": score_mathvista, "mathverse": score_mathverse,
           "mathvision": score_mathvision, "mmmu_pro": score_mmmu_pro}


# ----------------------------------------------------------------------------------------------
# Optional judge: an OpenAI-compatible chat model extracts the answer; the rules above then score it.

JUDGE_PROMPT = ("Extract the final answer from a model's response to a question. Reply with the answer only: "
                "the option letter for a multiple-choice question, otherwise the number or expression, "
                "without units. Reply 'none' if the response gives no answer.")


def make_judge(base_url, model, api_key_env, timeout=60):
    """extract(question, text) -> answer text, via {base_url}/chat/completions (stdlib only).
    The API key is read from the environment variable `api_key_env` and never printed or saved.
    On repeated failure the text is returned unchanged, so the rules score it."""
    key = os.environ.get(api_key_env, "")
    if not key:
        raise SystemExit(f"--judge_base_url is set but the environment variable {api_key_env} is empty")

    def extract(question, text):
        body = {"model": model, "temperature": 0, "max_tokens": 64, "messages": [
            {"role": "system", "content": JUDGE_PROMPT},
            {"role": "user", "content": f"Question:\n{question}\n\nResponse:\n{text}"}]}
        request = urllib.request.Request(base_url.rstrip("/") + "/chat/completions", data=json.dumps(body).encode(),
                                         headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
        for attempt in range(3):
            try:
                with urllib.request.urlopen(request, timeout=timeout) as reply:
                    answer = json.load(reply)["choices"][0]["message"]["content"].strip()
                return "" if answer.lower() == "none" else answer
            except (urllib.error.URLError, TimeoutError, KeyError, ValueError) as e:
                error = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
                time.sleep(2 ** attempt)
        tqdm.write(f"[judge] failed 3 times ({error}); scoring this answer with the rules")
        return text

    return extract


# ----------------------------------------------------------------------------------------------
# The evaluation loop: generate in batches, score, append one JSONL row per item


def evaluate(items, generate, out_path, *, benchmark, batch_size=8, extract=None):
    """Answer and score every item not yet in `out_path`; return the rows for `items`, in order.

    generate(questions, images) -> responses (the real model by default, see make_generator). Rows are
    appended after each batch, so a rerun skips what is done. A bad image or a failed generation becomes
    a row with an `error` naming the item (and the image path); that row is retried on the next run.
    """
    todo = pending(items, out_path)
    print(f"[eval] {out_path}: {len(items) - len(todo)} of {len(items)} items done before, {len(todo)} to go")
    bar = tqdm(total=len(todo), desc=f"eval {benchmark}")
    for start in range(0, len(todo), batch_size):
        batch, ready, images = todo[start:start + batch_size], [], []
        for item in batch:
            try:
                images.append(common.open_image(item["_image"]))
                ready.append(item)
            except common.ImageError as e:
                _write_error(out_path, item, f"item {item['_id']}: {e}")
        responses = _generate_batch(generate, [it["_question"] for it in ready], images) if ready else []
        for item, response in zip(ready, responses):
            if isinstance(response, Exception):
                failure = f"{type(response).__name__}: {response}"
                _write_error(out_path, item, f"item {item['_id']}: generation failed: {failure}")
            else:
                common.append_jsonl(out_path, make_row(benchmark, item, response, extract))
        bar.update(len(batch))
    bar.close()
    latest = {r["id"]: r for r in common.read_jsonl(out_path)}  # the last row per id wins (a retried error)
    return [latest[it["_id"]] for it in items if it["_id"] in latest]


def pending(items, out_path):
    """Items without a finished row in `out_path` (rows with an error are not finished)."""
    done = {r["id"] for r in common.read_jsonl(out_path) if not r.get("error")}
    return [it for it in items if it["_id"] not in done]


def _generate_batch(generate, questions, images):
    """Responses for one batch; if the batch fails, item by item, so one bad item costs only its row."""
    try:
        return generate(questions, images)
    except Exception as batch_error:
        if len(questions) == 1:
            return [batch_error]
        responses = []
        for question, image in zip(questions, images):
            try:
                responses += generate([question], [image])
            except Exception as e:
                responses.append(e)
        return responses


def make_row(benchmark, item, response, extract=None):
    """The JSONL row for one answered item: what was asked, said, extracted and judged."""
    s = score(benchmark, item, response, extract)
    reflection = rewards.parse_response(response).get("reflection") or ""
    return {"id": item["_id"], "category": item["_category"], "question": item["_question"],
            "answer": str(item.get("answer")), "response": response,
            "first_answer": s["first_extracted"], "final_answer": s["extracted"],
            "first_correct": s["first_correct"], "correct": s["correct"], "has_reflection": s["has_reflection"],
            "response_tokens": rewards.default_count_tokens(response),
            "reflection_tokens": rewards.default_count_tokens(reflection) if s["has_reflection"] else 0,
            "error": None}


def _write_error(out_path, item, message):
    tqdm.write(f"[error] {message}")
    common.append_jsonl(out_path, {
        "id": item["_id"], "category": item["_category"], "question": item["_question"],
        "answer": str(item.get("answer")), "response": None, "first_answer": "", "final_answer": "",
        "first_correct": False, "correct": False, "has_reflection": False, "response_tokens": 0,
        "reflection_tokens": 0, "error": message})


def make_generator(model_path, args, max_new_tokens, prompt):
    """Load the model; return generate(questions, images) -> responses, greedy, in the chosen format."""
    if not os.path.exists(model_path) and (model_path.startswith((".", "/", "runs")) or model_path.count("/") != 1):
        raise SystemExit(f"no model at {model_path}: train it first (see the README / Makefile) or pass --model")
    base, adapter = common.resolve_model(model_path)  # a LoRA output dir names its base model
    model, processor = common.load_policy(base, dtype=args.dtype, load_in_4bit=args.load_in_4bit, adapter_path=adapter)

    def generate(questions, images):
        return common.generate_responses(model, processor, questions, images,
                                         system_prompt=common.SYSTEM_PROMPTS[prompt],
                                         max_new_tokens=max_new_tokens, temperature=0.0,
                                         batch_size=len(questions), desc="generate")

    return generate


# ----------------------------------------------------------------------------------------------
# Summaries, tables and the comparison chart


def summarize(rows, benchmark):
    """Accuracy per category and overall, and the reflection metrics. Accuracies are percentages.

    Over the items in `overall` (all but MathVerse's "Text Only"):
      reflection_rate  share of responses with a well-formed reflection (see has_reflection)
      first_acc        accuracy of the first answer; final_acc: of the final (last) answer
      wrong_to_right   share of ALL items whose first answer is wrong and final answer right
      right_to_wrong   share of ALL items whose first answer is right and final answer wrong
                       (so final_acc = first_acc + wrong_to_right - right_to_wrong)
      mean_response_tokens, mean_reflection_tokens  (rewards.default_count_tokens; reflection: over
                       responses that have one)
    Items that errored count as wrong, so the denominator stays the benchmark's size; `errors` counts them.
    overall: for MathVerse and MMMU-Pro the mean over versions/settings (as those benchmarks report),
    elsewhere over items.
    """
    def pct(rs, key):
        return round(100 * sum(bool(key(r)) for r in rs) / len(rs), 2) if rs else None

    def mean(values):
        return round(sum(values) / len(values), 1) if values else None

    by_category = defaultdict(list)
    for r in rows:
        by_category[r["category"]].append(r)
    order = MATHVERSE_VERSIONS + ["Text Only"] if benchmark == "mathverse" else []
    names = [c for c in order if c in by_category] + sorted(c for c in by_category if c not in order)
    categories = {c: {"n": len(by_category[c]), "first_acc": pct(by_category[c], lambda r: r["first_correct"]),
                      "final_acc": pct(by_category[c], lambda r: r["correct"]),
                      "errors": sum(bool(r.get("error")) for r in by_category[c])} for c in names}
    scored = [r for r in rows if r["category"] not in NOT_IN_OVERALL]
    in_overall = [c for c in names if c not in NOT_IN_OVERALL]
    if benchmark in MACRO_AVERAGED and in_overall:
        overall = {"n": len(scored), **{key: round(sum(categories[c][key] for c in in_overall) / len(in_overall), 2)
                                        for key in ("first_acc", "final_acc")}}
    else:
        overall = {"n": len(scored), "first_acc": pct(scored, lambda r: r["first_correct"]),
                   "final_acc": pct(scored, lambda r: r["correct"])}
    answered = [r for r in scored if not r.get("error")]
    reflection = {
        "reflection_rate": pct(scored, lambda r: r["has_reflection"]),
        "first_acc": pct(scored, lambda r: r["first_correct"]),
        "final_acc": pct(scored, lambda r: r["correct"]),
        "wrong_to_right": pct(scored, lambda r: not r["first_correct"] and r["correct"]),
        "right_to_wrong": pct(scored, lambda r: r["first_correct"] and not r["correct"]),
        "mean_response_tokens": mean([r["response_tokens"] for r in answered]),
        "mean_reflection_tokens": mean([r["reflection_tokens"] for r in answered if r["has_reflection"]]),
    }
    return {"benchmark": benchmark, "n": len(rows), "errors": sum(bool(r.get("error")) for r in rows),
            "overall": overall, "categories": categories, "reflection": reflection}


def _fmt(x):
    return "-" if x is None else f"{x:.1f}"


def summary_markdown(summary, title):
    """Two Markdown tables: accuracy per category (first and final answer), then the reflection metrics."""
    lines = [f"### {title}", "", "| category | n | first answer % | final answer % |", "|---|---:|---:|---:|"]
    for name, c in summary["categories"].items():
        lines.append(f"| {name} | {c['n']} | {_fmt(c['first_acc'])} | {_fmt(c['final_acc'])} |")
    o, r = summary["overall"], summary["reflection"]
    lines += [f"| **overall** | {o['n']} | **{_fmt(o['first_acc'])}** | **{_fmt(o['final_acc'])}** |", "",
              "| reflection % | first acc % | final acc % | wrong→right % | right→wrong % | response tokens "
              "| reflection tokens | errors |", "|---:|---:|---:|---:|---:|---:|---:|---:|",
              f"| {_fmt(r['reflection_rate'])} | {_fmt(r['first_acc'])} | {_fmt(r['final_acc'])} "
              f"| {_fmt(r['wrong_to_right'])} | {_fmt(r['right_to_wrong'])} | {_fmt(r['mean_response_tokens'])} "
              f"| {_fmt(r['mean_reflection_tokens'])} | {summary['errors']} |"]
    return "\n".join(lines) + "\n"


def write_comparison(summaries, out_dir, title, rows=None):
    """comparison.md / .json / .png across models: final accuracy per category and overall, first-answer
    accuracy, the reflection metrics, and (given each model's item `rows`) the paired difference in final
    accuracy between every two models. Returns the Markdown."""
    categories = list(dict.fromkeys(c for s in summaries.values() for c in s["categories"]))
    head = ["model", "overall %", "first answer %", *[f"{c} %" for c in categories],
            "reflection %", "wrong→right %", "right→wrong %", "response tokens"]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for name, s in summaries.items():
        r = s["reflection"]
        cells = [name, f"**{_fmt(s['overall']['final_acc'])}**", _fmt(s["overall"]["first_acc"]),
                 *[_fmt(s["categories"].get(c, {}).get("final_acc")) for c in categories],
                 _fmt(r["reflection_rate"]), _fmt(r["wrong_to_right"]), _fmt(r["right_to_wrong"]),
                 _fmt(r["mean_response_tokens"])]
        lines.append("| " + " | ".join(cells) + " |")
    names = list(summaries)
    paired = {a: {b: common.paired_difference(rows[a], rows[b]) for b in names if b != a} for a in names} if rows else {}
    if paired:
        lines += ["", "Paired differences in final accuracy (points, 95% interval over the same items):", "",
                  "| model | vs | difference | 95% interval |", "|---|---|---:|---|"]
        for i, a in enumerate(names):
            for b in names[:i]:
                p = paired[a][b]
                if p:
                    lines.append(f"| {a} | {b} | {100 * p['difference']:+.1f} | "
                                 f"[{100 * p['ci95'][0]:+.1f}, {100 * p['ci95'][1]:+.1f}] |")
    markdown = "\n".join(lines) + "\n"
    os.makedirs(out_dir, exist_ok=True)
    Path(out_dir, "comparison.md").write_text(markdown)
    # Headline fractions in [0, 1] first, then the full summary (percentages) of each model.
    frac = lambda x: None if x is None else round(x / 100, 4)  # noqa: E731
    headline = {name: {"final_accuracy": frac(s["overall"]["final_acc"]), "first_accuracy": frac(s["overall"]["first_acc"]),
                       "wrong_to_right": frac(s["reflection"]["wrong_to_right"]),
                       "right_to_wrong": frac(s["reflection"]["right_to_wrong"]),
                       "reflection_rate": frac(s["reflection"]["reflection_rate"]),
                       **({"paired": paired[name]} if paired else {}), **s}
                for name, s in summaries.items()}
    Path(out_dir, "comparison.json").write_text(json.dumps(headline, indent=2))
    _bar_chart(summaries, categories, os.path.join(out_dir, "comparison.png"), title)
    return markdown


def _bar_chart(summaries, categories, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = categories + ["overall"]
    width = 0.8 / len(summaries)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(groups) * max(1, len(summaries) / 3)), 3.5))
    for i, (name, s) in enumerate(summaries.items()):
        values = [s["categories"].get(c, {}).get("final_acc") or 0 for c in categories]
        values.append(s["overall"]["final_acc"] or 0)
        ax.bar([g + (i - (len(summaries) - 1) / 2) * width for g in range(len(groups))], values, width, label=name)
    crowded = len(groups) > 6
    ax.set_xticks(range(len(groups)), groups, rotation=30 if crowded else 0, ha="right" if crowded else "center")
    ax.set_ylabel("final-answer accuracy (%)")
    ax.set_title(title)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the bars, not over them
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------


def parse_models(spec, default_prompt="reflect"):
    """'base=models/toy_base@plain,srpo=runs/toy/srpo' -> {"base": (path, "plain"), "srpo": (path, default)}.

    A bare path is named by its folder; `@prompt` picks the model's own prompt format (a model
    trained on plain chain of thought is evaluated in that format, as the paper evaluates its baselines).
    """
    models = {}
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        name, _, path = part.rpartition("=") if "=" in part else ("", "", part)
        path, _, prompt = path.partition("@")
        if (prompt or default_prompt) not in common.SYSTEM_PROMPTS:
            raise SystemExit(f"unknown prompt {prompt!r} in --models {part!r}; choose from {list(common.SYSTEM_PROMPTS)}")
        models[name or Path(path.rstrip("/")).name] = (path, prompt or default_prompt)
    return models


def _check_run(model_dir, settings):
    """Refuse to resume a run made with other settings: its rows would silently mix with the new ones."""
    path = Path(model_dir, "run.json")
    if path.exists() and (old := json.loads(path.read_text())) != settings:
        raise SystemExit(f"{model_dir} holds results made with {old}, not {settings}; "
                         f"delete it or choose another --out_dir")
    os.makedirs(model_dir, exist_ok=True)
    path.write_text(json.dumps(settings, indent=2))


def main(args):
    split = args.split or DEFAULT_SPLITS[args.benchmark]
    max_new_tokens = args.max_new_tokens or (128 if args.benchmark in TOY_BENCHMARKS else 4096)
    items = load_items(args.benchmark, split, args.data_dir, args.limit, args.seed)
    models = parse_models(args.models or args.model, args.prompt)
    extract = make_judge(args.judge_base_url, args.judge_model, args.judge_api_key_env) if args.judge_base_url else None
    run_name = f"{args.benchmark}-{re.sub(r'[^A-Za-z0-9.-]+', '_', split).strip('_')}"
    run_dir = os.path.join(args.out_dir, run_name)
    print(f"[eval] {run_name}: {len(items)} items, models {list(models)}, prompt {args.prompt!r}, "
          f"max_new_tokens {max_new_tokens}, scoring {'judge ' + args.judge_model if extract else 'rule-based'}")
    summaries, item_rows = {}, {}
    for name, (path, prompt) in models.items():
        folder = name if prompt == "reflect" else f"{name}-{prompt}"
        model_dir = os.path.join(run_dir, folder)
        _check_run(model_dir, {"model": path, "prompt": prompt, "max_new_tokens": max_new_tokens,
                               "judge": args.judge_model if extract else None})
        out_path = os.path.join(model_dir, "items.jsonl")
        # the model is loaded only when there is work: a finished run just re-summarises its rows
        generate = make_generator(path, args, max_new_tokens, prompt) if pending(items, out_path) else None
        rows = evaluate(items, generate, out_path, benchmark=args.benchmark, batch_size=args.batch_size,
                        extract=extract)
        summary = {**summarize(rows, args.benchmark), "model": path, "folder": folder, "split": split, "prompt": prompt,
                   "max_new_tokens": max_new_tokens, "args": asdict(args)}  # the key's variable name, not the key
        markdown = summary_markdown(summary, f"{run_name} · {name}")
        Path(model_dir, "summary.json").write_text(json.dumps(summary, indent=2))
        Path(model_dir, "summary.md").write_text(markdown)
        print("\n" + markdown)
        summaries[name], item_rows[name] = summary, rows
    if len(summaries) > 1:
        print("\n" + write_comparison(summaries, run_dir, run_name, item_rows))
        print(f"[eval] comparison table and chart in {run_dir}/comparison.{{md,json,png}}")
    return summaries


if __name__ == "__main__":
    main(common.parse_args(Args))
