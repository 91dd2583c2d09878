"""The toy world (toy/world.py, toy/model.py): problems are deterministic, the pictures agree with the answers, the splits
never overlap, and the toy teacher writes what the task's reflection should say. The dots task
("toy-dots", the contrast) first, then the two-step task ("toy", the default).

Nothing here is mocked: answers are checked against what is actually drawn in the images, by counting
connected blobs of each colour (`toy.count_blobs`) and measuring bar heights in pixels.
"""

import json
import re

import datasets
import numpy as np
import pytest
from PIL import Image, ImageDraw

import toy

N = 150  # problems per check: every family appears many times, and it stays fast
COLOURS = list(toy.COLOURS)
COT_RE = re.compile(r"<think>(.+)</think>\n<answer>(.+)</answer>", re.DOTALL)


@pytest.fixture(scope="module")
def problems():
    return [dots(s) for s in range(N)] + [dots(toy.TEST_SEED_OFFSET + s) for s in range(N)]


def dots(seed):
    return toy.make_problem(seed, "toy-dots")


def _reads(p):
    return [(c, v) for c, v in json.loads(p["solution"])["reads"]]


def _bar_heights_px(image):
    """Height in pixels and left edge (x) of each colour's bar, measured in the image."""
    arr = np.asarray(image.convert("RGB")).astype(int)
    out = {}
    for colour, rgb in toy.COLOURS.items():
        mask = np.abs(arr - np.array(rgb)).sum(-1) < 60
        ys, xs = np.nonzero(mask)
        out[colour] = (len(np.unique(ys)), xs.min()) if len(ys) else (0, None)
    return out


# ----------------------------------------------------------------------------------------------
# Determinism and the image/answer agreement


def test_make_problem_is_deterministic_per_seed():
    for seed in (0, 7, toy.TEST_SEED_OFFSET + 3):
        a, b = dots(seed), dots(seed)
        for key in ("id", "family", "question", "answer", "choices", "solution"):
            assert a[key] == b[key], (seed, key)
        assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"])), seed
        assert a["image"].size == (toy.IMAGE_SIZE, toy.IMAGE_SIZE) and a["image"].mode == "RGB"
    # ...and different seeds really give different problems (not one problem repeated).
    assert len({(p["question"], p["answer"], np.asarray(p["image"]).tobytes()) for p in map(dots, range(30))}) == 30


def test_count_blobs_on_a_hand_drawn_image():
    img = Image.new("RGB", (40, 20), (255, 255, 255))
    d = ImageDraw.Draw(img)
    d.rectangle([1, 1, 4, 4], fill=toy.COLOURS["red"])
    d.rectangle([10, 1, 14, 4], fill=toy.COLOURS["red"])
    d.rectangle([14, 4, 18, 8], fill=toy.COLOURS["red"])  # touches the previous one: same blob
    d.rectangle([30, 10, 35, 15], fill=toy.COLOURS["blue"])
    assert (toy.count_blobs(img, "red"), toy.count_blobs(img, "blue"), toy.count_blobs(img, "green")) == (2, 1, 0)


def test_dot_images_agree_with_solution_and_answer(problems):
    n_checked = 0
    for p in problems:
        if p["family"] == "bar":
            continue
        counts = {c: toy.count_blobs(p["image"], c) for c in COLOURS}
        reads = _reads(p)
        # The values in the structured solution are what is drawn.
        for colour, value in reads:
            assert counts[colour] == value, (p["id"], colour, counts)
        # Distractor dots: only colours not asked about, at most 2 of them; everything fits the 4x4 grid.
        asked = {c for c, _ in reads}
        assert all(counts[c] <= 2 for c in COLOURS if c not in asked), (p["id"], counts)
        assert sum(counts.values()) <= 16
        # The gold answer follows from the image and the question alone.
        named = re.findall(r"\b(red|green|blue)\b", p["question"])
        n = [counts[c] for c in named]
        if p["family"] == "count":
            expected = str(n[0])
        elif p["family"] == "add":
            expected = str(n[0] + n[1])
        elif p["family"] == "subtract":
            assert n[0] > n[1], p["id"]  # "how many more" is never negative
            expected = str(n[0] - n[1])
        else:  # compare: named colours appear twice (in the question and in the choices)
            result = named[0] if n[0] > n[1] else named[1] if n[1] > n[0] else "equal"
            expected = "ABC"[p["choices"].index(result)]
        assert p["answer"] == expected, (p["id"], p["question"], counts, p["answer"])
        n_checked += 1
    assert n_checked > 150


def test_bar_images_agree_with_solution_and_answer(problems):
    bars = [p for p in problems if p["family"] == "bar"]
    assert len(bars) > 20
    for p in bars:
        measured = _bar_heights_px(p["image"])
        # One unit is one 28-px cell (one image token), drawn up from the bottom edge.
        for colour, units in _reads(p):
            assert measured[colour][0] == toy.CELL * units, (p["id"], colour, measured)
        # Bars stand left to right in the order of the options A, B, C; the answer is the tallest one.
        left_to_right = sorted(COLOURS, key=lambda c: measured[c][1])
        assert left_to_right == p["choices"] == ["red", "green", "blue"]
        tallest = max(left_to_right, key=lambda c: measured[c][0])
        assert p["answer"] == "ABC"[left_to_right.index(tallest)], (p["id"], measured, p["answer"])


# ----------------------------------------------------------------------------------------------
# The Dataset


def test_dataset_columns_features_and_families():
    ds = toy.toy_dataset("train", 100, task="toy-dots")
    assert isinstance(ds, datasets.Dataset) and len(ds) == 100
    assert set(ds.column_names) == {"id", "family", "question", "answer", "choices", "solution", "image"}
    assert isinstance(ds.features["image"], datasets.Image)
    row = ds[0]
    assert isinstance(row["image"], Image.Image) and row["image"].size == (toy.IMAGE_SIZE, toy.IMAGE_SIZE)
    assert isinstance(row["choices"], list) and isinstance(row["answer"], str)
    # The stored image is the drawn one (lossless round trip through the Image feature).
    p = dots(0)
    assert row["id"] == p["id"] and row["question"] == p["question"]
    assert np.array_equal(np.asarray(row["image"].convert("RGB")), np.asarray(p["image"]))
    for split in ("train", "test"):
        assert set(toy.toy_dataset(split, 60, task="toy-dots")["family"]) == set(toy.DOTS_FAMILIES), split
        assert set(toy.toy_dataset(split, 60)["family"]) == set(toy.FAMILIES), split
    # Deterministic: the same call gives the same rows.
    again = toy.toy_dataset("train", 100, task="toy-dots")
    assert again["id"] == ds["id"] and again["answer"] == ds["answer"]


def test_train_and_test_never_share_a_seed():
    train_ids = set(toy.toy_dataset("train", 300)["id"]) | set(toy.toy_dataset("train", 300, seed=1)["id"])
    test_ids = set(toy.toy_dataset("test", 300)["id"]) | set(toy.toy_dataset("test", 300, seed=1)["id"])
    assert len(train_ids) == 600 and len(test_ids) == 600  # different dataset seeds: different problems
    assert not train_ids & test_ids
    assert all(int(i.split("-")[1]) < toy.TEST_SEED_OFFSET for i in train_ids)
    assert all(int(i.split("-")[1]) >= toy.TEST_SEED_OFFSET for i in test_ids)
    with pytest.raises(ValueError):
        toy.toy_dataset("validation", 5)


# ----------------------------------------------------------------------------------------------
# Answers, chain-of-thought targets and the toy teacher


def test_multiple_choice_answers_are_letters_matching_the_solution(problems):
    n_mc = 0
    for p in problems:
        result = json.loads(p["solution"])["result"]
        if p["choices"]:
            n_mc += 1
            assert len(p["choices"]) == 3 and p["answer"] in ("A", "B", "C"), p["id"]
            assert p["choices"]["ABC".index(p["answer"])] == result, p["id"]
            assert f"Choices: A. {p['choices'][0]} B. {p['choices'][1]} C. {p['choices'][2]}" in p["question"]
        else:
            assert p["family"] in ("count", "add", "subtract")
            assert p["answer"] == str(result) and re.fullmatch(r"\d+", p["answer"]), p["id"]
    assert n_mc > 40


def test_cot_response_format_and_answer(problems):
    for p in problems:
        cot = toy.cot_response(p)
        m = COT_RE.fullmatch(cot)
        assert m, cot
        assert m.group(2) == p["answer"], (p["id"], cot)
        for colour, value in _reads(p):  # the reasoning reads the values off the image
            assert f"{colour}: {value}." in m.group(1)


def test_cot_response_with_wrong_reads_gives_the_wrong_answer_for_counts():
    p = next(p for p in map(dots, range(100)) if p["family"] == "add")
    (c1, n1), (c2, n2) = _reads(p)
    cot = toy.cot_response(p, reads=[(c1, n1 + 1), (c2, n2)])
    assert COT_RE.fullmatch(cot).group(2) == str(n1 + n2 + 1) != p["answer"]


def _corrupt(reads, index):
    """The reads with reads[index]'s value changed (and stays a plausible count)."""
    return [(c, (v % 5) + 1 if i == index else v) for i, (c, v) in enumerate(reads)]


def test_oracle_reflection_names_the_first_wrong_value(problems):
    for p in problems[:60]:
        sol = json.loads(p["solution"])
        reads = _reads(p)
        truth_text = toy.solution_text(reads, sol["op"])
        # Right CoT -> confirmed, with the (short) correct steps.
        ok = toy.oracle_reflection(p, toy.cot_response(p), True)
        assert ok.startswith("The reading is right") and truth_text in ok and "wrong" not in ok
        # Every read corrupted -> the FIRST one is named, with the true and the seen value.
        bad = _corrupt(reads, 0)
        for i in range(1, len(reads)):
            bad = _corrupt(bad, i)
        (c0, v0), (_, w0) = reads[0], bad[0]
        msg = toy.oracle_reflection(p, toy.cot_response(p, reads=bad), False)
        assert f"The {c0} value is wrong: it is {v0}, not {w0}." in msg and truth_text in msg, msg
        # Only a later read corrupted -> that one is named.
        if len(reads) > 1:
            bad = _corrupt(reads, len(reads) - 1)
            (c, v), (_, w) = reads[-1], bad[-1]
            msg = toy.oracle_reflection(p, toy.cot_response(p, reads=bad), False)
            assert msg.startswith(f"The {c} value is wrong: it is {v}, not {w}."), msg


def test_oracle_reflection_missing_read_and_wrong_arithmetic():
    p = next(p for p in map(dots, range(100)) if p["family"] == "add")
    (c1, n1), (c2, n2) = _reads(p)
    msg = toy.oracle_reflection(p, "<think>I just guess.</think>\n<answer>9</answer>", False)
    assert msg.startswith(f"The {c1} value was never read off the image")
    wrong_sum = f"<think>{c1}: {n1}. {c2}: {n2}. {n1} + {n2} = {n1 + n2 + 1}.</think>\n<answer>{n1 + n2 + 1}</answer>"
    msg = toy.oracle_reflection(p, wrong_sum, False)
    assert msg.startswith("The values are read right but the last step is wrong")
    assert f"{n1} + {n2} = {n1 + n2}." in msg


# ----------------------------------------------------------------------------------------------
# The two-step task ("toy"): n dots of one colour, two operations on n


TWO_STEP_RE = re.compile(r"What is (?:(red|green|blue) x (\d+) \+ (\d+)|\( (red|green|blue) \+ (\d+) \) x (\d+))\?")


def _arith(x, sign, y):
    return {"x": x * y, "+": x + y}[sign]


@pytest.fixture(scope="module")
def two_step():
    return [toy.make_problem(s) for s in range(N)] + [toy.make_problem(toy.TEST_SEED_OFFSET + s) for s in range(N)]


def test_two_step_images_and_answers_follow_from_picture_and_question(two_step):
    families = set()
    for p in two_step:
        m = TWO_STEP_RE.fullmatch(p["question"])
        assert m, p["question"]
        colour = m[1] or m[4]
        counts = {c: toy.count_blobs(p["image"], c) for c in COLOURS}
        n = counts[colour]
        assert 1 <= n <= toy.MAX_DOTS and sum(counts.values()) == n, (p["id"], counts)  # one colour only
        expected = n * int(m[2]) + int(m[3]) if m[1] else (n + int(m[5])) * int(m[6])
        assert p["answer"] == str(expected) and p["choices"] == [], (p["id"], p["question"], n)
        assert p["id"] == f"toy-{p['id'].split('-')[1]}" and toy.is_two_step(p)
        families.add(p["family"])
        sol = json.loads(p["solution"])
        assert 2 <= sol["m"] <= toy.MAX_MULTIPLIER[p["family"]] and 1 <= sol["c"] <= toy.MAX_ADDEND
    assert families == set(toy.FAMILIES)


def test_two_step_first_attempt_and_check_procedure(two_step):
    for p in two_step[:60]:
        (colour, n), = json.loads(p["solution"])["reads"]
        one = COT_RE.fullmatch(toy.cot_response(p))
        step = COT_RE.fullmatch(toy.cot_response(p, stepwise=True))
        assert one and step and one[2] == step[2] == p["answer"]
        # The first attempt reads n, then writes the whole expression and its value in one step.
        assert one[1].startswith(f" {colour}: {n}. ") and one[1].count("=") == 1
        # The check: two single operations, each right, the second starting from the first's result.
        ops = re.findall(r"(\d+) ([x+]) (\d+) = (\d+)\.", step[1])
        assert len(ops) == 2 and step[1].startswith(f" {colour}: {n}. ")
        for x, sign, y, z in ops:
            assert _arith(int(x), sign, int(y)) == int(z), step[1]
        assert ops[1][0] == ops[0][3] and ops[1][3] == p["answer"]
        # A misread n gives the answer that n leads to, by the same procedure.
        wrong = COT_RE.fullmatch(toy.cot_response(p, reads=[(colour, n % toy.MAX_DOTS + 1)]))
        assert wrong[2] == toy.answer_from_reads(p, [(colour, n % toy.MAX_DOTS + 1)]) != p["answer"]


def test_two_step_teacher_checks_from_the_image_and_the_first_attempt(two_step):
    for p in two_step[:40]:
        (colour, n), = json.loads(p["solution"])["reads"]
        # The check procedure's own form: what the base model writes when asked to check step by step.
        check = COT_RE.fullmatch(toy.cot_response(p, stepwise=True))[1].strip()
        assert re.fullmatch(rf"{colour}: {n}\. \d+ [x+] \d+ = \d+\. \d+ [x+] \d+ = \d+\.", check), check
        right = COT_RE.fullmatch(toy.cot_response(p))[1]
        off = right.replace(f"= {p['answer']}.", f"= {int(p['answer']) + 1}.")
        assert toy.oracle_reflection(p, right, True) == f"Check: {check} The first answer is right."
        assert toy.oracle_reflection(p, off, False) == f"Check: {check} The first answer is wrong."
        # The verdict comes from the first attempt's own result, not from a hidden flag...
        assert toy.oracle_reflection(p, right, False) == toy.oracle_reflection(p, right, True)
        # ...also when it is handed the whole first attempt, answer block included.
        assert toy.oracle_reflection(p, toy.cot_response(p), False).endswith("is right.")
        # A misread n (or colour): the check reads the n drawn in the image again.
        misread = toy.cot_response(p, reads=[("red" if colour != "red" else "blue", n % toy.MAX_DOTS + 1)])
        assert toy.oracle_reflection(p, misread, False) == f"Check: {check} The first answer is wrong."


def test_single_step_problems_are_text_only_and_right():
    for seed in range(50):
        question, target = toy.single_step_problem(toy.BASE_SEED_OFFSET + seed)
        x, sign, y = re.fullmatch(r"What is (\d+) ([x+]) (\d+)\?", question).groups()
        z = re.fullmatch(rf"<think> {x} {re.escape(sign)} {y} = (\d+)\.</think>\n<answer>(\d+)</answer>", target)
        assert z and int(z[1]) == int(z[2]) == _arith(int(x), sign, int(y))


def test_two_step_tokenizer_writes_every_number_as_one_token():
    tok = toy.build_tokenizer()
    top = max(toy.check_steps(op, toy.MAX_DOTS, toy.MAX_MULTIPLIER[op], toy.MAX_ADDEND)[-1][-1] for op in toy.FAMILIES)
    for i in range(top + 1):
        assert len(tok.tokenize(f" {i}")) == 1 and len(tok.tokenize(f"{i}")) == 1, i
    assert tok.tokenize(" blue") == tok.tokenize("What is blue")[-1:]  # the colour the reads copy


def test_problem_from_id_rebuilds_either_task():
    for p in (toy.make_problem(12), dots(12)):
        q = toy.problem_from_id(p["id"])
        assert q["question"] == p["question"] and np.array_equal(np.asarray(q["image"]), np.asarray(p["image"]))
    with pytest.raises(ValueError, match="unknown toy task"):
        toy.make_problem(1, "toy-bars")


def test_the_oracle_check_without_the_reread_drops_only_the_reread():
    for seed in range(20):
        p = toy.make_problem(seed)
        (colour, n), = json.loads(p["solution"])["reads"]
        cot = toy.cot_response(p)
        full, bare = toy.oracle_reflection(p, cot, True), toy.oracle_reflection(p, cot, True, reread=False)
        assert full.startswith(f"Check: {colour}: {n}. ") and full == bare.replace("Check: ", f"Check: {colour}: {n}. ", 1)
