"""The toy world's problems: visual math with gold answers and solutions, and the toy's teacher.

Nothing can be downloaded on a classroom laptop or in CI, so every script's defaults run on this.
Two tasks (`--data toy` / `--data toy-dots`, `04_eval.py --benchmark toy` / `toy-dots`):

* `toy` (the default), the two-step task: a picture of n dots of one colour (1-8, in reading order,
  which the model reads almost perfectly) and a question with two steps of arithmetic on n, e.g.
  "What is blue x 7 + 3?". The base model's first attempt reads n and writes the result in one step
  ("blue: 5. 5 x 7 + 3 = 38."), which it often gets wrong; the same model asked to check it step by
  step ("blue: 5. 5 x 7 = 35. 35 + 3 = 38.": n read again, then one operation at a time) is right far
  more often. The re-read once mattered: on an early recipe, reflection SFT on checks without it reached
  15% on a test it reached 80.5% on with it (docs/notebook.md; on the demo's recipe today: exercise 3 of
  EXERCISES.md, measured in docs/answers.md). So a reflection that re-does the
  arithmetic step by step can fix wrong answers without breaking right ones: a second look that is
  better than the first, the property SRPO needs.
* `toy-dots`, the contrast: dot charts with two or three colours and a bar chart (count, add,
  subtract, compare, tallest bar). Its errors are misreads of the image, and a second look at the
  image is the same glance as the first, so there a reflection breaks about as many answers as it
  fixes (RESULTS.md, the contrast).

* `make_problem(seed, task)`  - a deterministic problem: a 112x112 RGB image, a question, a gold
  answer, options for multiple choice, and a structured solution (the values read off the image,
  the operation and, for `toy`, the constants).
* `toy_dataset(split, n, seed, task)` - a `datasets.Dataset` of such problems; train and test never
  share a seed.
* The tokenizer, `ToyProcessor` and the tiny Qwen2.5-VL are in toy/model.py.
* `oracle_reflection(...)` - the toy stand-in for the paper's teacher (o4-mini). On `toy` it writes
  the check procedure from the image and the first attempt alone; on `toy-dots` it names the first
  wrong step from the structured solution.

Example:
    >>> p = make_problem(3)
    >>> p["question"], p["answer"]            # doctest: +SKIP
    ('What is red x 4 + 2?', '14')
"""

import json
import os
import random
import re

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 112  # 4 x 28: an 8x8 grid of 14-px patches, 16 image tokens after the 2x2 merge
CELL = 28  # one image token covers a 28x28 cell; a dot or a bar block fills one cell
COLOURS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220)}
TASKS = ("toy", "toy-dots")
TEST_SEED_OFFSET = 10_000_000  # test seeds start here; train seeds are 0..TEST_SEED_OFFSET-1
BASE_SEED_OFFSET = 20_000_000  # the toy base model's own training problems (00), seen by no later stage
DOT_RADIUS = 9

# The two-step task ("toy").
FAMILIES = ("times_plus", "plus_times")
MAX_DOTS = 8  # n: 1-8 dots, two rows of four
MAX_ADDEND = 9  # c: 1-9
# m: 2..MAX_MULTIPLIER[family]. The one difficulty knob of each family, set so that the base model's
# one-step first attempts are right about half the time (00_base_model.py's gate, G1); the check's
# single operations stay small tables either way.
MAX_MULTIPLIER = {"times_plus": 15, "plus_times": 15}
STEP_CUE = " Check it step by step."  # appended to a question: the check procedure as its own task

# The dots task ("toy-dots"), kept as the contrast.
DOTS_FAMILIES = ("count", "add", "subtract", "compare", "bar")
MAX_PER_COLOUR = 4


def check_task(task):
    if task not in TASKS:
        raise ValueError(f"unknown toy task {task!r}; choose from {list(TASKS)}")
    return task


def make_problem(seed: int, task: str = "toy") -> dict:
    """One problem of `task`, fully determined by `seed`.

    Returns a dict with `id`, `family`, `question`, `answer` (str), `choices` (list of option
    texts, empty for free-form answers), `solution` (JSON: the values read off the image, the
    operation, and for `toy` the constants m and c) and `image` (PIL RGB, 112x112).
    """
    return _two_step_problem(seed) if check_task(task) == "toy" else _dots_problem(seed)


# ----------------------------------------------------------------------------------------------
# The two-step task ("toy")


def _draw_count(rng, colour, n):
    """n dots of one colour in reading order (left to right, then the next row), one per cell."""
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for i in range(n):
        row, col = divmod(i, IMAGE_SIZE // CELL)
        cx = col * CELL + CELL // 2 + rng.randint(-3, 3)
        cy = row * CELL + CELL // 2 + rng.randint(-3, 3)
        draw.ellipse([cx - DOT_RADIUS, cy - DOT_RADIUS, cx + DOT_RADIUS, cy + DOT_RADIUS], fill=COLOURS[colour])
    return img


def check_steps(op, n, m, c):
    """The check procedure: the two single operations of a two-step problem, [(x, sign, y, result)].

    Example: check_steps("times_plus", 5, 7, 3) == [(5, "x", 7, 35), (35, "+", 3, 38)]
    """
    if op == "times_plus":  # n x m + c
        return [(n, "x", m, n * m), (n * m, "+", c, n * m + c)]
    if op == "plus_times":  # (n + c) x m
        return [(n, "+", c, n + c), (n + c, "x", m, (n + c) * m)]
    raise ValueError(f"not a two-step operation: {op!r}")


def _expression(op, x, m, c):
    """The question's expression with x (a colour or a number) for n, e.g. 'blue x 7 + 3'."""
    return f"{x} x {m} + {c}" if op == "times_plus" else f"( {x} + {c} ) x {m}"


def _two_step_values(rng):
    """A two-step problem's (family, colour, n, m, c), the first draws of its seed's generator."""
    family = FAMILIES[rng.randrange(len(FAMILIES))]
    colour = rng.choice(list(COLOURS))
    n = rng.randint(1, MAX_DOTS)
    return family, colour, n, rng.randint(2, MAX_MULTIPLIER[family]), rng.randint(1, MAX_ADDEND)


def _two_step_problem(seed):
    rng = random.Random(seed)
    family, colour, n, m, c = _two_step_values(rng)
    image = _draw_count(rng, colour, n)
    result = check_steps(family, n, m, c)[-1][-1]
    solution = json.dumps({"reads": [[colour, n]], "op": family, "m": m, "c": c, "result": result})
    return {"id": f"toy-{seed}", "family": family, "question": f"What is {_expression(family, colour, m, c)}?",
            "answer": str(result), "choices": [], "solution": solution, "image": image}


def single_step_problem(seed):
    """A text-only single operation, one of the check's sub-skills, as (question, target), without
    drawing an image: the base model learns these as the paper's base model knows its arithmetic (00 only).

    Which of the two steps is asked is the first draw of Random(seed), the same draw that picks the
    family, so times_plus always gives its n x m step and plus_times its (n + c) x m step: these are
    all multiplications ("What is 5 x 7?"); the additions are learned only inside the check, which is
    why times_plus (an addition to a large product) has the weaker check. Kept as it is so that
    `make base` rebuilds the shipped model.
    """
    family, _, n, m, c = _two_step_values(random.Random(seed))
    x, sign, y, z = check_steps(family, n, m, c)[random.Random(seed).randrange(2)]
    return f"What is {x} {sign} {y}?", f"<think> {x} {sign} {y} = {z}.</think>\n<answer>{z}</answer>"


def _steps_text(steps):
    return " ".join(f"{x} {sign} {y} = {z}." for x, sign, y, z in steps)


# ----------------------------------------------------------------------------------------------
# The dots task ("toy-dots")


def _draw_dots(rng, counts):
    """A dot chart: each colour's dots in its own row (red, green, blue from the top), from the
    left, one jittered dot per cell, so dots never touch and each is one blob.

    Why cells of 28 px: each cell is exactly one image token of Qwen2.5-VL (14-px patches, 2x2
    merge). Why rows from the left: a ~1M-parameter model learns to read such a chart in ~300
    steps; with dots at random cells it was still at chance after 450 (the count is then a sum over
    16 tokens rather than a position in a row of 4, as with the bars).
    """
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for colour, n in counts.items():
        row = list(COLOURS).index(colour)
        for col in range(n):
            cx = col * CELL + CELL // 2 + rng.randint(-3, 3)
            cy = row * CELL + CELL // 2 + rng.randint(-3, 3)
            r = DOT_RADIUS
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=COLOURS[colour])
    return img


def _draw_bars(heights):
    """Three bars (red, green, blue, in the first three columns) of `heights` cells each."""
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for i, (colour, h) in enumerate(heights.items()):
        x0 = i * CELL + 4
        draw.rectangle([x0, IMAGE_SIZE - CELL * h, x0 + CELL - 9, IMAGE_SIZE - 1], fill=COLOURS[colour])
    return img


def _dots_problem(seed):
    rng = random.Random(seed)
    family = DOTS_FAMILIES[rng.randrange(len(DOTS_FAMILIES))]
    c1, c2 = rng.sample(list(COLOURS), 2)
    choices = []
    if family == "bar":
        heights = dict(zip(COLOURS, rng.sample(range(1, 5), 3)))
        tallest = max(heights, key=heights.get)
        choices = list(COLOURS)
        question = "Which bar is the tallest? Choices: A. red B. green C. blue"
        reads, op, result = list(heights.items()), "max", tallest
        answer = "ABC"[choices.index(tallest)]
        image = _draw_bars(heights)
    else:
        n1, n2 = rng.randint(1, MAX_PER_COLOUR), rng.randint(1, MAX_PER_COLOUR)
        if family == "subtract":  # "how many more" needs n1 > n2
            n2 = rng.randint(1, MAX_PER_COLOUR - 1)
            n1 = rng.randint(n2 + 1, MAX_PER_COLOUR)
        if family == "count":
            counts = {c1: n1}
        else:
            counts = {c1: n1, c2: n2}
        # Distractor dots of the third colour make reading harder than "count everything".
        third = next(c for c in COLOURS if c not in counts)
        counts[third] = rng.randint(0, 2)
        image = _draw_dots(rng, counts)
        reads = [(c1, n1)] if family == "count" else [(c1, n1), (c2, n2)]
        if family == "count":
            question, op, result = f"How many {c1} dots are there?", "read", n1
        elif family == "add":
            question, op, result = f"How many {c1} and {c2} dots are there in total?", "+", n1 + n2
        elif family == "subtract":
            question, op, result = f"How many more {c1} dots than {c2} dots are there?", "-", n1 - n2
        else:  # compare
            choices = [c1, c2, "equal"]
            question = f"Are there more {c1} or {c2} dots? Choices: A. {c1} B. {c2} C. equal"
            result = c1 if n1 > n2 else c2 if n2 > n1 else "equal"
            op = "compare"
        answer = "ABC"[choices.index(result)] if choices else str(result)
    solution = json.dumps({"reads": reads, "op": op, "result": result})
    return {"id": f"dots-{seed}", "family": family, "question": question, "answer": answer,
            "choices": choices, "solution": solution, "image": image}


def solve(reads, op):
    """The arithmetic step of a dots solution, from the values read off the image."""
    values = [v for _, v in reads]
    if op == "read":
        return values[0]
    if op == "+":
        return values[0] + values[1]
    if op == "-":
        return values[0] - values[1]
    if op == "compare":
        (c1, n1), (c2, n2) = reads
        return c1 if n1 > n2 else c2 if n2 > n1 else "equal"
    return max(reads, key=lambda kv: kv[1])[0]  # "max": tallest bar


def solution_text(reads, op) -> str:
    """Chain of thought for a dots solution, e.g. 'red: 3. blue: 2. 3 + 2 = 5.'"""
    text = " ".join(f"{c}: {v}." for c, v in reads)
    result = solve(reads, op)
    if op in "+-":
        text += f" {reads[0][1]} {op} {reads[1][1]} = {result}."
    elif op == "compare":
        text += f" so {result}." if result == "equal" else f" {result} has more."
    elif op == "max":
        text += f" {result} is the tallest."
    return text


# ----------------------------------------------------------------------------------------------
# Both tasks: answers, chain-of-thought targets, the toy teacher, datasets


def is_two_step(problem) -> bool:
    return json.loads(problem["solution"])["op"] in FAMILIES


def answer_from_reads(problem: dict, reads) -> str:
    """The answer (option letter or number) that `reads`, [(colour, value)] in the solution's order, lead to."""
    sol = json.loads(problem["solution"])
    if sol["op"] in FAMILIES:
        return str(check_steps(sol["op"], reads[0][1], sol["m"], sol["c"])[-1][-1])
    result = solve(reads, sol["op"])
    return "ABC"[problem["choices"].index(result)] if problem["choices"] else str(result)


def cot_response(problem: dict, reads=None, stepwise=False) -> str:
    """Plain chain-of-thought target `<think>...</think>\\n<answer>...</answer>` for `problem`.

    `reads` overrides the values read off the image (used to make a deliberately wrong answer).
    Two-step task: the first attempt reads n and writes the result in one step ("blue: 5. 5 x 7 + 3
    = 38."); `stepwise` runs the check procedure instead ("blue: 5. 5 x 7 = 35. 35 + 3 = 38.").
    """
    sol = json.loads(problem["solution"])
    reads = reads if reads is not None else [tuple(r) for r in sol["reads"]]
    answer = answer_from_reads(problem, reads)
    # The space after <think> makes the first colour the same token as in the question (" red"), which
    # the tiny model copies far sooner than a different token ("red").
    if sol["op"] in FAMILIES:
        (colour, n), = reads
        work = _steps_text(check_steps(sol["op"], n, sol["m"], sol["c"])) if stepwise else \
            f"{_expression(sol['op'], n, sol['m'], sol['c'])} = {answer}."
        return f"<think> {colour}: {n}. {work}</think>\n<answer>{answer}</answer>"
    return f"<think> {solution_text(reads, sol['op'])}</think>\n<answer>{answer}</answer>"


_READ_RE = re.compile(r"\b(red|green|blue): (\d+)")
_RESULT_RE = re.compile(r"= (\d+)\.")


def oracle_reflection(problem: dict, policy_cot: str, policy_correct: bool, reread: bool = True) -> str:
    """The toy teacher: a reflection, a stand-in for the paper's o4-mini.

    Two-step task: the check procedure in the form the base model runs it when asked (toy.STEP_CUE),
    written from the image (the colour and the n drawn) and the first attempt alone: n read again,
    the two single operations, then whether they agree with the first attempt's result, e.g.
    "Check: blue: 5. 5 x 7 = 35. 35 + 3 = 38. The first answer is wrong." Nothing in it is
    something the student could not reproduce (`policy_correct` is not used: the verdict compares
    the check with the result the first attempt wrote). `reread=False` leaves out "blue: 5." (an exercise).
    Dots task: like the paper's teacher it sees the policy's reasoning and the correct answer; for a
    wrong answer it names the first wrong step and redoes the reasoning from there; for a right one
    it confirms the steps in the shortest form.
    """
    sol = json.loads(problem["solution"])
    if sol["op"] in FAMILIES:
        (colour, n), = sol["reads"]
        steps = check_steps(sol["op"], n, sol["m"], sol["c"])
        written = _RESULT_RE.findall((policy_cot or "").split("</think>")[0])  # the first attempt's result
        verdict = "right" if written and int(written[-1]) == steps[-1][-1] else "wrong"
        read = f"{colour}: {n}. " if reread else ""
        return f"Check: {read}{_steps_text(steps)} The first answer is {verdict}."
    truth = [tuple(r) for r in sol["reads"]]
    seen = dict((c, int(v)) for c, v in _READ_RE.findall(policy_cot or ""))
    fix = solution_text(truth, sol["op"])
    for colour, value in truth:  # the first wrong step: a value never read, or misread
        if colour not in seen:
            return f"The {colour} value was never read off the image. Reading again: {fix}"
        if seen[colour] != value:
            lead = "The answer is right by luck, but the" if policy_correct else "The"
            return f"{lead} {colour} value is wrong: it is {value}, not {seen[colour]}. Reading again: {fix}"
    if policy_correct:
        return f"The reading is right and the steps are short enough: {fix}"
    return f"The values are read right but the last step is wrong. Redo it: {fix}"


def toy_dataset(split: str = "train", n: int = 2000, seed: int = 0, task: str = "toy"):
    """`n` problems of `task` as a `datasets.Dataset` with an Image feature. Test seeds never meet train seeds."""
    import datasets

    check_task(task)
    if split not in ("train", "test"):
        raise ValueError(f"toy split must be 'train' or 'test', got {split!r}")
    start = seed * n + (TEST_SEED_OFFSET if split == "test" else 0)
    assert start + n <= TEST_SEED_OFFSET or split == "test", "train seeds would reach the test range"
    assert split == "train" or start + n <= BASE_SEED_OFFSET, "test seeds would reach the base model's range"
    rows = [make_problem(s, task) for s in range(start, start + n)]
    features = datasets.Features({
        "id": datasets.Value("string"), "family": datasets.Value("string"),
        "question": datasets.Value("string"), "answer": datasets.Value("string"),
        "choices": datasets.List(datasets.Value("string")), "solution": datasets.Value("string"),
        "image": datasets.Image(),
    })
    return datasets.Dataset.from_list(rows, features=features)


def problem_from_id(pid: str) -> dict:
    """The problem behind a toy id ('toy-123' or 'dots-123'), image included (the report draws it again)."""
    prefix, _, seed = pid.partition("-")
    return make_problem(int(seed), {"toy": "toy", "dots": "toy-dots"}[prefix])


def count_blobs(image: Image.Image, colour: str) -> int:
    """Connected components of pixels close to `colour` (used by tests to check images vs answers)."""
    arr = np.asarray(image.convert("RGB")).astype(int)
    mask = (np.abs(arr - np.array(COLOURS[colour])).sum(-1) < 60)
    seen = np.zeros_like(mask)
    blobs = 0
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        blobs += 1
        stack = [(y, x)]
        seen[y, x] = True
        while stack:
            cy, cx = stack.pop()
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
    return blobs

