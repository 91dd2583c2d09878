"""The paper's benchmarks: their items, and a port of each one's official scorer.

MathVista testmini, MathVerse testmini, MathVision test and MMMU-Pro, as the paper evaluates
(arXiv 2506.01713, experiments), plus the toy tasks of toy.py. 04_eval.py runs the evaluation with:

  load_items(benchmark, split, data_dir)  rows in the benchmark's own schema plus _id, _question,
                                          _image, _category; from the Hugging Face hub or a local copy
  SCORERS[benchmark](item, answer_text)   {"correct": bool, "extracted": str}. MathVista normalises
                                          by answer type and precision; MathVision: last \\boxed{},
                                          letter heuristics, numeric/LaTeX equivalence; MMMU-Pro
                                          parses an option letter; MathVerse's official scorer asks
                                          GPT-4, ours is a rule-based stand-in.
"""

import ast
import json
import math
import os
import re
from functools import partial
from pathlib import Path

from machinery import cli, grading

DEFAULT_SPLITS = {"toy": "test", "toy-dots": "test", "mathvista": "testmini", "mathverse": "testmini",
                  "mathvision": "test", "mmmu_pro": "standard (10 options),vision"}
TOY_BENCHMARKS = ("toy", "toy-dots")  # the toy tasks of toy.py, graded like the training reward
TOY_TEST_SIZE = 1000  # enough for about +-3 points at 95% (00_base_model.py reports on the first 1,000 too)
MATHVERSE_VERSIONS = ["Text Dominant", "Text Lite", "Vision Intensive", "Vision Dominant", "Vision Only"]
NOT_IN_OVERALL = {"Text Only"}  # MathVerse reports its text-only variant beside the five versions
MACRO_AVERAGED = {"mathverse", "mmmu_pro"}  # overall = mean over versions / settings, as these two report


# ----------------------------------------------------------------------------------------------
# Items: every loader returns rows in the benchmark's own schema plus four common fields: _id (str,
# unique), _question (the user prompt), _image (see dataset.open_image), _category (reported apart)


def load_items(benchmark, split="", data_dir="", limit=0, seed=0):
    """The benchmark's items, from the Hugging Face hub or from a local copy (`data_dir`).

    Local copies, as the benchmarks publish them (.jsonl, .json or .parquet, in data_dir or data_dir/data):
      mathvision  {split}.jsonl + images/          (the GitHub release, e.g. testmini.jsonl: 304 items)
      mathvista   testmini.json + images/          (the GitHub release; prompts from query.json when present)
      mathverse   testmini.json + testmini_text_only.json + images/   (the release; images unzipped)
      mmmu_pro    "standard (10 options)/" and "vision/" folders of parquet shards (the hub repo layout)
    Parquet exports of the hub splits work for all of them; images may be paths (relative to data_dir
    or data_dir/images), raw bytes, or the hub's {"bytes", "path"} structs.
    """
    split = split or DEFAULT_SPLITS[benchmark]
    loaders = {"toy": partial(_load_toy, task="toy", seed=seed),
               "toy-dots": partial(_load_toy, task="toy-dots", seed=seed),
               "mathvista": _load_mathvista, "mathverse": _load_mathverse,
               "mathvision": _load_mathvision, "mmmu_pro": _load_mmmu_pro}
    if benchmark not in loaders:
        raise cli.UserError(f"unknown benchmark {benchmark!r}; choose from {sorted(loaders)}")
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
            question = r.get("query_cot") or r["question"]
            items.append(_item(r, id=id, question=question, image=image, category=category))
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
            id = f"{setting}/{r['id']}"
            items.append(_item(r, id=id, question=question, image=image, category=setting))
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
    loaded = json.loads(path.read_text())
    return list(loaded.values()) if isinstance(loaded, dict) else loaded  # MathVista's release: {pid: row}


def _hub_rows(repo, config, split):
    """Rows from the hub with images left encoded (compressed bytes): dataset.open_image decodes them one
    batch at a time, so an undecodable image costs its own row, not the run."""
    import datasets

    ds = datasets.load_dataset(repo, config, split=split)
    for name, feature in ds.features.items():
        if isinstance(feature, datasets.Image):
            ds = ds.cast_column(name, datasets.Image(decode=False))
    return list(ds)


def _image_ref(data_dir, value):
    """What dataset.open_image will read: a path of a local copy (relative to data_dir, else to
    data_dir/images), or the value as it is (the hub's {"bytes", "path"} struct, bytes, PIL).
    Empty -> None (text only)."""
    if not value:
        return None
    if not isinstance(value, str):
        return value
    for candidate in (Path(data_dir) / value, Path(data_dir) / "images" / value):
        if candidate.is_file():
            return str(candidate)
    return str(Path(data_dir) / value)  # missing: dataset.open_image will name this path in the item's error


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
    lines = "".join(f"\n({l}) {o}" for l, o in zip(letters, options))
    return f"{question}\nChoices:{lines}\n{MC_SUFFIX}"


def _mmmu_options(row):
    options = row["options"]
    # the hub stores the list as its Python repr, a string
    return ast.literal_eval(options) if isinstance(options, str) else list(options)


def _mmmu_image_numbers(row):
    """Images in the order the question and options mention them (<image 2> ...), as MMMU-Pro's own
    inference code orders them."""
    text = row["question"] + " " + " ".join(map(str, _mmmu_options(row)))
    numbers = list(dict.fromkeys(int(n) for n in re.findall(r"<image (\d+)>", text)))
    present = [n for n in numbers if row.get(f"image_{n}") is not None]
    return present or ([1] if row.get("image_1") is not None else [])


def _mmmu_prompt(row):
    question = re.sub(r"<image (\d+)>", r"[image \1]", row["question"])
    options = [re.sub(r"<image (\d+)>", r"[image \1]", str(o)) for o in _mmmu_options(row)]
    return question + "".join(f"\n{chr(65 + i)}. {o}" for i, o in enumerate(options)) + f"\n{MC_SUFFIX}"


# ----------------------------------------------------------------------------------------------
# Scoring: (row in the benchmark's schema, answer text) -> {"correct": bool, "extracted": str}

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
        s = grading.extract_boxed(s) or s
    for old, new in (("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\!", ""), ("\\,", " "),
                     ("\\;", " "), ("\\ ", " "), ("~", " "), ("\\$", ""), ("$", ""), ("**", ""),
                     ("\\%", "%"), ("π", "\\pi"), ("−", "-"), ("°", ""), ("\\degree", "")):
        s = s.replace(old, new)
    s = re.sub(r"\\(?:left|right)(?![a-zA-Z])", "", s)
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?", "", s)  # 60^{\circ} -> 60
    s = re.sub(r"\\(?:text|textbf|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}", r"\1", s)
    return s.strip().rstrip(".").strip()


def _to_number(text):
    """The value of a plain numeric answer (units, %, thousands commas allowed), else None.

    Example: _to_number("1,234.5 cm^2") -> 1234.5; _to_number("\\\\frac{3}{4}") -> 0.75;
    _to_number("2x") -> None
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
    """Free-form equivalence after clean-up: grading.is_correct (numbers, units, degrees, fractions,
    then math-verify for \\sqrt, \\pi, ...)."""
    p, g = _clean(pred), _clean(gold)
    return bool(p and g) and (_squash(p) == _squash(g) or grading.is_correct(p, g))


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


# toy: the training reward's own grading (grading.is_correct: numbers, letters vs option texts)


def score_toy(item, text):
    correct = grading.is_correct(text, item["answer"], item.get("choices") or None)
    return {"correct": correct, "extracted": text.strip()}


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
    """MathVision's is_equal: case-insensitive match, else equal values rounded to 2 decimals, else
    math-verify."""
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
    return bool(grading.is_correct(p, g))


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


SCORERS = {"toy": score_toy, "toy-dots": score_toy, "mathvista": score_mathvista,
           "mathverse": score_mathverse, "mathvision": score_mathvision, "mmmu_pro": score_mmmu_pro}

