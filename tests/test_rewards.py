"""Unit and property tests for machinery/grading.py (parsing, grading) and rewards.py (the four reward variants)."""

import json
import math
import os
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from machinery import grading as G
import rewards as R

SHARED_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data")
count = G.default_count_tokens
THINK1 = " ".join(f"step{i}" for i in range(60))  # long enough that padding can hit T_target
MC4 = ["35°", "145°", "55°", "25°"]  # MathVista-style options; gold "B" or "145°"


def reflective(first, final, *, second_think=True, pad=None):
    """A well-formed reflective response. With pad=None the reflection is padded so that
    L == T_target exactly (f_len == 1) under default_count_tokens."""
    def build(n):
        return (f"<think>{THINK1}</think>\n<answer>{first}</answer>\n"
                f"<reflection>{' '.join(['check'] * n)}</reflection>\n"
                + ("<think>Redo the sum.</think>\n" if second_think else "")
                + f"<answer>{final}</answer>")
    if pad is not None:
        return build(pad)
    target = 2 * (count(THINK1) + count(first))
    for n in range(1, 500):
        if count(build(n)) == target:
            return build(n)
    raise AssertionError("could not reach T_target")


def plain(answer):
    return f"<think>{THINK1}</think>\n<answer>{answer}</answer>"


def components_sum(r):
    return r["format"] + r["accuracy"] + r["effectiveness"] + r["reflection_format"] + r["length"] + r["verdict"]


# ----------------------------------------------------------------------------------------------
# Parsing

def test_parse_rl_layout():
    text = ("<think>a</think> <answer>\\boxed{3}</answer> <reflection>wrong sum</reflection> "
            "<think>b</think> <answer>\\boxed{4}</answer>")
    p = G.parse_response(text)
    assert (p["think1"], p["answer1"], p["reflection"], p["think2"], p["answer2"]) == \
        ("a", "\\boxed{3}", "wrong sum", "b", "\\boxed{4}")
    assert p["layout"] == R.PAPER_LAYOUTS[0]
    assert G.first_answer(text) == "3" and G.extract_answer(text) == "4"


def test_parse_sft_layout_has_no_second_think():
    text = "<think>\n3+4=8\n</think>\n<answer>8</answer>\n<reflection>3+4 is 7</reflection>\n<answer>7</answer>\n"
    p = G.parse_response(text)
    assert p["think2"] is None and p["answer1"] == "8" and p["answer2"] == "7"
    assert p["think1"] == "3+4=8"  # stripped
    assert p["layout"] == R.PAPER_LAYOUTS[1]


def test_parse_missing_and_extra():
    p = G.parse_response("Sure! <think>x</think><answer>5</answer> Hope this helps.")
    assert p["answer1"] == "5" and p["reflection"] is None and p["answer2"] is None
    assert p["layout"] is None  # text outside the blocks
    p = G.parse_response("<think>x</think><answer>5")  # truncated: no closed answer
    assert p["answer1"] is None and p["answers"] == []
    p = G.parse_response("")
    assert all(p[k] is None for k in ("think1", "answer1", "reflection", "think2", "answer2"))
    # two attempts without a reflection: the later answer is the second one
    p = G.parse_response("<think>a</think><answer>1</answer><think>b</think><answer>2</answer>")
    assert (p["answer1"], p["think2"], p["answer2"]) == ("1", "b", "2")


def test_parse_tolerates_spaces_inside_tags():
    text = "< think >a</ think >\n<answer >7< /answer>\n<reflection>ok</reflection>\n<answer>7</answer>"
    p = G.parse_response(text)
    assert (p["think1"], p["answer1"], p["answer2"], p["layout"]) == ("a", "7", "7", R.PAPER_LAYOUTS[1])


def test_parse_nested_tags_are_not_flat():
    p = G.parse_response("<think>x<answer>5</answer></think><answer>5</answer>")
    assert p["layout"] is None
    assert p["answers"] == ["5", "5"]


def test_extract_boxed():
    assert G.extract_boxed(r"\boxed{\frac{1}{2}}") == r"\frac{1}{2}"
    assert G.extract_boxed(r"first \boxed{3} then \boxed{ 4 }") == "4"  # last one wins
    assert G.extract_boxed(r"\boxed{\{1,2\}}") == r"\{1,2\}"  # escaped braces do not count
    assert G.extract_boxed(r"\boxed{3} and \boxed{4") == "3"  # unbalanced one ignored
    assert G.extract_boxed("no box") is None and G.extract_boxed(None) is None
    assert G.extract_boxed(r"\boxed {x^{2}}") == "x^{2}"


def test_extract_answer_fallbacks():
    assert G.extract_answer("<answer>7</answer>") == "7"
    assert G.extract_answer(r"<answer>The result is \boxed{7}.</answer>") == "7"
    assert G.extract_answer(r"so the answer is \boxed{12}") == "12"  # no answer block
    assert G.extract_answer("the answer is 12") is None
    assert G.extract_answer("<answer>3</answer><reflection>r</reflection><answer>4</answer>") == "4"


@pytest.mark.parametrize("text", ["B", "(B)", "B.", "b", "Option B", "The answer is B", "answer: (B)",
                                  "B. 145°", "(B) 145°", r"\text{B}", "**B**", "$B$", "I think the answer is B",
                                  "B. A triangle"])
def test_choice_letter_single(text):
    assert G.extract_choice_letter(text) == "B"


@pytest.mark.parametrize("text", ["A B C D", "A, B, C or D", "(A)(B)(C)(D)", "A/B", "A and B", "A. 1 B. 2"])
def test_choice_letter_several(text):
    assert G.extract_choice_letter(text) is None
    assert len(G.extract_choice_letters(text)) >= 2


def test_choice_letter_none():
    assert G.extract_choice_letters("145°") == set()
    assert G.extract_choice_letters("Both are equal") == set()


# ----------------------------------------------------------------------------------------------
# Grading

@pytest.mark.parametrize("pred,gold", [
    ("7", "7.0"), ("1,000", "1000"), ("1680", "1,680"), ("0.50", "0.5"), ("-2", "-2.0"),
    (r"\frac{1}{2}", "0.5"), (r"\dfrac{3}{4}", "0.75"), ("3/4", r"\frac{3}{4}"), (r"-\frac{3}{4}", "-0.75"),
    ("25%", "25"), (r"25\%", "0.25"),
    ("145", "145°"), (r"145^\circ", "145°"), (r"145^{\circ}", "145"), ("145 degrees", "145"),
    ("5 cm", "5"), (r"5\text{ cm}", "5"), ("12 square units", "12"),
    ("[1,2]", "[1, 2]"), ("(3, -4)", "(3,-4)"), ("x = 7", "7"), (r"$\boxed{7}$", "7"),
    ("4.8", "4.80"), (r"\text{Yes}", "yes"),
    (r"\frac{\sqrt{2}}{2}", r"\sqrt{2}/2"), ("(x+1)^2", "x^2+2x+1"), (r"\{1,2\}", r"\{2,1\}"),
    (r"2\pi", r"2 \pi"), (r"\sqrt{8}", r"2\sqrt{2}"),
])
def test_grading_equal(pred, gold):
    assert G.is_correct(pred, gold)


@pytest.mark.parametrize("pred,gold", [
    ("8", "7"), ("2x", "2"), ("7 or 8", "7"), ("8 or 7", "7"), ("7, 8", "7"), ("35°, 145°", "145°"),
    (r"7 \lor 8", "8"), ("3 4", "7"), (r"3 \quad 4", "7"), ("0.33", r"\frac{1}{3}"), ("1,2", "12"),
    ("", "7"), (None, "7"), ("7", None), ("   ", "7"), ("7" * 2000, "7" * 2000),
])
def test_grading_not_equal(pred, gold):
    assert not G.is_correct(pred, gold)


def test_mathvista_multi_choice():
    for pred in ["B", "(B) 145°", "145", r"145^{\circ}", "145°", "The answer is B"]:
        assert G.is_correct(pred, "145°", MC4), pred  # gold given as option text
        assert G.is_correct(pred, "B", MC4), pred  # gold given as letter
    for pred in ["A", "35°", "A, B", "A B C D", "35° or 145°", "E"]:
        assert not G.is_correct(pred, "145°", MC4), pred


def test_mathvision_letters_and_options():
    assert G.is_correct("E", "E", ["A", "B", "C", "D", "E"])  # options drawn in the image
    assert not G.is_correct("D", "E", ["A", "B", "C", "D", "E"])
    opts = ["$720^{\\circ}$", "$600^{\\circ}$", "$450^{\\circ}$", "$360^{\\circ}$", "$300^{\\circ}$"]
    assert G.is_correct("720°", "A", opts) and not G.is_correct("600", "A", opts)
    opts = ["$3$", "$\\frac{3}{2}$", "$4$", "$5$", "$\\frac{5}{2}$"]
    assert G.is_correct("2.5", "E", opts) and G.is_correct(r"\frac{5}{2}", "E", opts)
    assert G.is_correct("(E)", "E", opts) and not G.is_correct("1.5", "E", opts)
    assert G.is_correct(r"\frac{3}{4}", r"\frac{3}{4}") and G.is_correct("0.75", r"\frac{3}{4}")
    assert G.is_correct("C", "C")  # a letter gold without options (MathVision has some)
    opts = ["either A or B", "only C", "only D", "either C or D", "A, B, C or D"]
    assert G.is_correct("A, B, C or D", "E", opts) and G.is_correct("E", "E", opts)
    assert G.is_correct("only D", "C", opts) and not G.is_correct("either A or B", "C", opts)


def test_mathvision_testmini_answers():
    path = os.path.join(SHARED_DATA, "mathvision_testmini", "testmini.jsonl")
    if not os.path.exists(path):
        pytest.skip("shared MathVision testmini data not present")
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    for row in rows:
        gold, options = row["answer"], row["options"] or None
        assert G.is_correct(gold, gold, options), row["id"]
        if options and gold in "ABCDE":
            i = "ABCDE".index(gold)
            assert G.is_correct(f"The answer is ({gold})", gold, options), row["id"]
            assert not G.is_correct("ABCDE"[(i + 1) % 5], gold, options), row["id"]
            if len(options[i]) > 1:
                assert G.is_correct(options[i], gold, options), row["id"]


def test_mmmu_pro_ten_options():
    opts = [f"option text {i}" for i in range(10)]
    assert G.is_correct("J", "J", opts) and G.is_correct("(I)", "I", opts)
    assert not G.is_correct("I", "J", opts)
    assert not G.is_correct("A B C D E F G H I J", "J", opts)
    assert not G.is_correct("K", "J", opts)  # not an option
    assert G.is_correct("option text 9", "J", opts)


def test_grading_is_safe_and_bounded(tmp_path):
    marker = tmp_path / "pwned"
    assert not G.is_correct(f"__import__('pathlib').Path('{marker}').touch()", "7")
    assert not marker.exists()  # model output is never executed
    t0 = time.perf_counter()
    assert not G.is_correct(r"9^{9^{9^{9}}}", "7")  # would keep sympy busy
    assert not G.is_correct("99999!", "7")
    assert time.perf_counter() - t0 < 0.5


def test_math_verify_time_budget(monkeypatch):
    # Timed per grading call: one call may run more than one budgeted math-verify comparison.
    for pred in ("((((((2))))))", r"\int_0^1 x^{100} e^x dx"):  # slow for the LaTeX parser; the budget cuts it
        t0 = time.perf_counter()
        G.is_correct(pred, "7")
        assert time.perf_counter() - t0 < 2 * G.MATH_VERIFY_BUDGET_S + 0.3, pred
    monkeypatch.setattr(G, "MATH_VERIFY_BUDGET_S", 1e-6)
    assert not G.is_correct(r"\sqrt{18}", r"3\sqrt{2}")  # out of time: not provably equal
    monkeypatch.undo()
    assert G.is_correct(r"\sqrt{18}", r"3\sqrt{2}")  # and the interrupted verdict was not cached


def test_math_verify_budget_survives_a_swallowed_alarm(monkeypatch):
    # Python ignores an exception raised inside a __del__ or weakref callback (sympy runs many), so
    # the first alarm can be lost; CI once saw a 0.25 s budget run for 1.9 s that way.
    swallowed = []

    def stubborn(pred, gold):
        while True:
            try:
                while True:
                    pass
            except G._OutOfTime:
                if swallowed:
                    raise
                swallowed.append(1)  # the first alarm is lost, as in a weakref callback

    monkeypatch.setattr(G, "_math_verify", stubborn)
    t0 = time.perf_counter()
    assert G._symbolic_equal(r"\sqrt{18}", r"3\sqrt{2}") is False
    assert swallowed and time.perf_counter() - t0 < G.MATH_VERIFY_BUDGET_S + 0.3
    time.sleep(0.15)  # the repeating alarm is off again: nothing raises after the call


def test_grading_in_worker_thread():
    out = {}

    def work():  # math-verify's signal timeout only works in the main thread
        out["ok"] = G.is_correct(r"\frac{\sqrt{3}}{3}", r"\sqrt{3}/3 + 0")
        out["no"] = G.is_correct(r"\frac{\sqrt{5}}{3}", r"\sqrt{3}/3")

    t = threading.Thread(target=work)
    t.start()
    t.join(timeout=30)
    assert out == {"ok": True, "no": False}


# ----------------------------------------------------------------------------------------------
# Rewards: the paper variant (Eqs. 4-8)

PAPER_TOTALS = {("7", "7"): 1.6, ("8", "7"): 1.35, ("7", "8"): 1.1, ("8", "8"): 0.85}


@pytest.mark.parametrize("second_think", [True, False])
@pytest.mark.parametrize("first,final", list(PAPER_TOTALS))
def test_paper_totals_at_flen_one(first, final, second_think):
    r = R.srpo_reward(reflective(first, final, second_think=second_think), "7")
    assert r["f_len"] == pytest.approx(1.0)
    assert r["total"] == pytest.approx(PAPER_TOTALS[(first, final)])
    assert r["format"] == 0.5 and r["reflection_format"] == 0.25 and r["length"] == pytest.approx(0.1)
    assert r["accuracy"] == (0.5 if first == "7" else 0.0)
    assert r["effectiveness"] == R.EFFECTIVENESS[(first == "7", final == "7")]
    assert (r["first_correct"], r["final_correct"], r["has_reflection"]) == (first == "7", final == "7", 1.0)


def test_paper_boxed_and_letter_answers():
    assert R.srpo_reward(reflective(r"\boxed{7}", r"\boxed{7}"), "7")["total"] == pytest.approx(1.6)
    assert R.srpo_reward(reflective("A", "B"), "B", choices=MC4)["total"] == pytest.approx(1.35)
    assert R.srpo_reward(reflective("B", "145°"), "145°", choices=MC4)["total"] == pytest.approx(1.6)


def test_paper_no_reflection_policy():
    right, wrong = R.srpo_reward(plain("7"), "7"), R.srpo_reward(plain("8"), "7")
    assert right["total"] == 0.5 and wrong["total"] == 0.0
    assert right["format"] == 0 and right["effectiveness"] == 0 and right["length"] == 0
    assert right["has_reflection"] == 0.0 and right["final_correct"] == 1.0
    # below every well-formed reflective response, even wrong -> wrong
    assert right["total"] < R.srpo_reward(reflective("8", "8", pad=500), "7")["total"]
    empty = "<think>x</think><answer>7</answer><reflection> </reflection><answer>7</answer>"
    assert R.srpo_reward(empty, "7")["total"] == 0.5  # an empty reflection is no reflection


def test_paper_length_term():
    r = R.srpo_reward(reflective("7", "7", pad=1), "7")
    B = count(THINK1) + count("7")
    assert r["f_len"] == pytest.approx(R.f_len(count(reflective("7", "7", pad=1)), B))
    assert 0 < r["f_len"] < 1 and r["length"] == pytest.approx(0.1 * r["f_len"])
    assert R.f_len(20, 10) == 1.0
    assert R.f_len(25, 10) == pytest.approx(math.exp(-1)) == pytest.approx(R.f_len(15, 10))
    assert R.f_len(100, 0) == 0.0 and R.f_len(10**6, 1) == 0.0
    chars = R.srpo_reward(reflective("7", "7"), "7", count_tokens=len)  # counting function is used
    assert chars["f_len"] != pytest.approx(1.0)


def test_paper_format_rules():
    ok = reflective("7", "7")
    assert R.srpo_reward(ok, "7")["format"] == 0.5
    assert R.srpo_reward("\n  " + ok + "\n\n", "7")["format"] == 0.5  # whitespace is fine
    bad = {
        "text before": "Answer: " + ok,
        "text after": ok + " Done.",
        "empty think": ok.replace(f"<think>{THINK1}</think>", "<think> </think>"),
        "empty final": ok[: ok.rindex("<answer>")] + "<answer></answer>",
        "no first think": ok.replace(f"<think>{THINK1}</think>", ""),
        "two reflections": ok.replace("<think>Redo", "<reflection>again</reflection><think>Redo"),
        "three answers": ok + "<answer>7</answer>",
        "out of order": ok.replace("<think>Redo the sum.</think>", "").replace("<answer>7</answer>\n<reflection>",
                                                                             "<reflection>", 1) + "<answer>7</answer>",
        "crossed": "<think>a<answer></think>7</answer><reflection>r</reflection><answer>7</answer>",
        "uppercase": ok.replace("<reflection>", "<REFLECTION>").replace("</reflection>", "</REFLECTION>"),
    }
    for name, text in bad.items():
        assert R.srpo_reward(text, "7")["format"] == 0.0, name


def test_paper_reflection_segment_without_full_format():
    text = "<answer>7</answer><reflection>fine</reflection><answer>7</answer>"  # no think at all
    r = R.srpo_reward(text, "7")
    assert r["format"] == 0 and r["reflection_format"] == 0.25 and r["effectiveness"] == 0.25
    nested = "<think>t</think><answer>7</answer><reflection>x<answer>9</answer></reflection><answer>7</answer>"
    assert R.srpo_reward(nested, "7")["reflection_format"] == 0.0
    no_first = "<think>t</think><reflection>r</reflection><answer>7</answer>"
    r = R.srpo_reward(no_first, "7")
    assert r["effectiveness"] == 0 and r["reflection_format"] == 0  # nothing to correct


@pytest.mark.parametrize("first,final", list(PAPER_TOTALS))
def test_paper_ablations(first, final):
    text, right1, right2 = reflective(first, final), first == "7", final == "7"
    no_len = R.srpo_reward(text, "7", use_length=False)
    assert no_len["total"] == pytest.approx(PAPER_TOTALS[(first, final)] - 0.1)
    assert no_len["length"] == 0 and no_len["f_len"] == 0
    no_eff = R.srpo_reward(text, "7", use_effectiveness=False)
    assert no_eff["effectiveness"] == 0
    assert no_eff["total"] == pytest.approx(0.5 + 0.5 * right1 + 0.25 + 0.1)
    for alpha in (0.0, 0.05, 0.3):
        r = R.srpo_reward(text, "7", alpha=alpha)
        assert r["total"] == pytest.approx(PAPER_TOTALS[(first, final)] - 0.1 + alpha)
        assert r["length"] == pytest.approx(alpha)
    assert R.EFFECTIVENESS[(right1, right2)] == R.srpo_reward(text, "7")["effectiveness"]
    no_acc = R.srpo_reward(text, "7", use_accuracy=False)
    assert no_acc["accuracy"] == 0 and no_acc["first_correct"] == right1
    assert no_acc["total"] == pytest.approx(PAPER_TOTALS[(first, final)] - 0.5 * right1)
    no_ref = R.srpo_reward(text, "7", use_reflection_format=False)
    assert no_ref["reflection_format"] == 0 and no_ref["total"] == pytest.approx(PAPER_TOTALS[(first, final)] - 0.25)


# ----------------------------------------------------------------------------------------------
# Rewards: the released-code variant and the plain-GRPO baseline

RELEASED_TOTALS = {("7", "7"): 1.35, ("8", "7"): 1.6, ("7", "8"): 0.85, ("8", "8"): 0.6}


@pytest.mark.parametrize("first,final", list(RELEASED_TOTALS))
def test_released_totals_at_flen_one(first, final):
    r = R.srpo_reward(reflective(first, final), "7", variant="released")
    assert r["total"] == pytest.approx(RELEASED_TOTALS[(first, final)])
    assert r["accuracy"] == R.RELEASED_ACCURACY[(first == "7", final == "7")]
    assert r["format"] == 0.5 and r["reflection_format"] == 0 and r["effectiveness"] == 0
    assert r["f_len"] == pytest.approx(1.0)


def test_released_quirks():
    sft = reflective("8", "7", second_think=False)  # only one <think>: their code scores 0
    r = R.srpo_reward(sft, "7", variant="released")
    assert r["total"] == 0 and r["format"] == 0 and r["accuracy"] == 0 and r["final_correct"] == 1.0
    assert R.srpo_reward(plain("7"), "7", variant="released")["total"] == 0
    assert R.srpo_reward("7", "7", variant="released")["total"] == 0
    ok = reflective("7", "7")
    assert R.srpo_reward("Let me think. " + ok, "7", variant="released")["format"] == 0.5  # prefix tolerated
    assert R.srpo_reward(ok + " done", "7", variant="released")["format"] == 0.0
    empty = ok.replace("<think>Redo the sum.</think>", "<think></think>")
    assert R.srpo_reward(empty, "7", variant="released")["format"] == 0.0
    # letter fallback: substring test on the last answer block, gold a-d only
    two = "<think>t</think><answer>{}</answer><reflection>r</reflection><think>t</think><answer>{}</answer>"
    assert R.srpo_reward(two.format("C", "b is it"), "B", variant="released")["accuracy"] == 1.0
    assert R.srpo_reward(two.format("C", "Bad"), "B", variant="released")["accuracy"] == 0.0
    assert R.srpo_reward(two.format("C", "e is it"), "E", variant="released")["accuracy"] == 0.0
    r = R.srpo_reward(reflective("7", "7"), "7", variant="released", use_length=False)
    assert r["total"] == pytest.approx(1.25) and r["length"] == 0


def test_grpo_baseline():
    assert R.srpo_reward(plain("7"), "7", variant="grpo")["total"] == 1.5
    assert R.srpo_reward(plain("8"), "7", variant="grpo")["total"] == 0.5
    assert R.srpo_reward(plain(r"\boxed{B}"), "B", variant="grpo", choices=MC4)["total"] == 1.5
    assert R.srpo_reward(r"The answer is \boxed{7}", "7", variant="grpo")["total"] == 1.0
    r = R.srpo_reward(reflective("8", "7"), "7", variant="grpo")  # graded on the final answer
    assert (r["format"], r["accuracy"], r["has_reflection"], r["first_correct"]) == (0.0, 1.0, 1.0, 0.0)
    assert R.srpo_reward("<think></think><answer>7</answer>", "7", variant="grpo")["format"] == 0


def test_final_answer_reward():
    """--reward final: the last answer's accuracy + the paper's format on the reflective layout, nothing else."""
    r = R.srpo_reward(reflective("8", "7"), "7", variant="final")  # corrected: the first answer is not graded
    assert (r["total"], r["format"], r["accuracy"]) == (1.5, 0.5, 1.0)
    assert (r["effectiveness"], r["reflection_format"], r["length"], r["first_correct"]) == (0.0, 0.0, 0.0, 0.0)
    assert R.srpo_reward(reflective("7", "7"), "7", variant="final")["total"] == 1.5  # kept: the same
    assert R.srpo_reward(reflective("7", "8"), "7", variant="final")["total"] == 0.5
    assert R.srpo_reward(reflective("8", "7", second_think=False), "7", variant="final")["total"] == 1.5  # SFT layout
    assert R.srpo_reward(reflective("7", "7", pad=3), "7", variant="final")["total"] == 1.5  # no length term
    assert R.srpo_reward(plain("7"), "7", variant="final")["total"] == 1.0  # no reflection: no format
    assert R.srpo_reward(plain("8"), "7", variant="final")["total"] == 0.0
    # The confound it removes: under the reflective prompt, 'grpo' pays a right answer 0.5 less for reflecting.
    for variant, reflecting_minus_plain in (("grpo", -0.5), ("final", +0.5), ("paper", +1.1)):
        right = [R.srpo_reward(x, "7", variant=variant)["total"] for x in (reflective("7", "7"), plain("7"))]
        assert right[0] - right[1] == pytest.approx(reflecting_minus_plain), variant


def test_verdict_term_pays_an_honest_verdict_only():
    """verdict_weight (not in the paper, exercise 14): paid when the reflection's last verdict sentence says
    what the first answer was; nothing for the opposite, none or a verdict outside the reflection; 0 weight
    changes no other term."""
    def said(first, final, verdict, where="reflection"):
        text = f"Check: blue: 5. The first answer is {verdict}."
        body = (f"<think>{THINK1}</think><answer>{first}</answer><reflection>{text if where == 'reflection' else 'ok'}"
                f"</reflection><think>Redo.</think><answer>{final}</answer>")
        return body + (f" {text}" if where == "after" else "")
    for first, verdict, honest in (("7", "right", 1.0), ("8", "wrong", 1.0), ("7", "wrong", 0.0), ("8", "right", 0.0)):
        off = R.srpo_reward(said(first, "7", verdict), "7")
        on = R.srpo_reward(said(first, "7", verdict), "7", verdict_weight=0.25)
        assert off["verdict_honest"] == on["verdict_honest"] == honest and off["verdict"] == 0
        assert on["verdict"] == 0.25 * honest and on["total"] == pytest.approx(off["total"] + 0.25 * honest)
        assert {k: v for k, v in on.items() if k not in ("verdict", "total")} == \
            {k: v for k, v in off.items() if k not in ("verdict", "total")}
    assert R.srpo_reward(said("7", "7", "right", where="after"), "7", verdict_weight=0.25)["verdict"] == 0
    assert R.srpo_reward(said("7", "7", "right").replace("right.", "right"), "7", verdict_weight=1)["verdict"] == 0
    assert R.honest_verdict("The first answer is right. No: The first answer is wrong.", False)  # the last counts
    assert R.srpo_reward(plain("7") + " The first answer is right.", "7", verdict_weight=1)["verdict"] == 0
    cut = "<think>a</think><answer>8</answer><reflection>The first answer is wrong.</reflection>"  # no answer after
    assert R.srpo_reward(cut, "7", verdict_weight=1)["verdict"] == 0  # paid only where I_ref would pay
    with pytest.raises(ValueError):
        R.srpo_reward(said("7", "7", "right"), "7", variant="grpo", verdict_weight=0.25)


def test_reward_api():
    for variant in R.VARIANTS:
        r = R.srpo_reward(reflective("8", "7"), "7", variant=variant)
        assert tuple(r) == R.REWARD_KEYS and all(type(v) is float for v in r.values())
    with pytest.raises(ValueError):
        R.srpo_reward("x", "7", variant="ppo")
    with pytest.raises(ValueError):
        R.srpo_reward("x", "7", alpha=-1)
    assert R.srpo_reward(None, "7")["total"] == 0.0


# ----------------------------------------------------------------------------------------------
# Gaming and adversarial inputs: nothing beats an honest right -> right response

HONEST_MAX = {"paper": 1.6, "released": 1.6, "grpo": 1.5, "final": 1.5}  # released pays wrong -> right most
RIGHT_RIGHT = {"paper": 1.6, "released": 1.35, "grpo": 1.5, "final": 1.5}
# 'final' has no length term and does not grade the first answer: these right final answers in the reflective
# layout earn what an honest response earns, by design (never more)
TIES_BY_DESIGN = {"final": {"long honest", "long reflection, right", "answer padded"}}
T, A = "<think>Add the bars.</think>", "<answer>{}</answer>"
GAMING = {
    "several answers": reflective("7 or 8", "7, 8"),
    "several boxed": reflective(r"\boxed{7}, \boxed{8}", r"\boxed{8} \boxed{9}"),
    "many numbers": reflective(" ".join(map(str, range(20))), " ".join(map(str, range(20)))),
    "empty blocks": "<think></think><answer>7</answer><reflection></reflection><think></think><answer>7</answer>",
    "out of order": "<answer>7</answer><think>x</think><reflection>r</reflection><answer>7</answer><think>y</think>",
    "nested": "<think>x<answer>7</answer></think><reflection>r<answer>7</answer></reflection><answer>7</answer>",
    "answers only": "<answer>7</answer>" * 50,
    "reflections only": "<reflection>r</reflection>" * 50,
    "tag soup": "<think><answer><reflection>7</reflection></answer></think>" * 20,
    "long honest": reflective("7", "7", pad=30_000),
    "long reflection, right": T + A.format(7) + "<reflection>" + "so " * 33_000 + "</reflection>" + A.format(7),
    "huge answer": T + A.format("7" * 100_000) + "<reflection>r</reflection>" + T + A.format("7" * 100_000),
    "answer padded": T + A.format("7 " + "7" * 99_000) + "<reflection>r</reflection>" + T + A.format(7),
}
GAMING_MC = {  # gold "B" of four options
    "every letter": reflective("A B C D", "A B C D"),
    "letters glued": reflective("ABCD", "ABCD"),
    "every letter, listed": reflective("(A) (B) (C) (D)", "A, B, C or D"),
    "all option texts": reflective("35°, 145°, 55°, 25°", "35° or 145° or 55° or 25°"),
    "boxed letters": reflective(r"\boxed{A, B, C, D}", r"\boxed{A}, \boxed{B}, \boxed{C}, \boxed{D}"),
}


@pytest.mark.parametrize("variant", R.VARIANTS)
@pytest.mark.parametrize("name", list(GAMING))
def test_gaming_strings_earn_less_than_honest(variant, name):
    r = R.srpo_reward(GAMING[name], "7", variant=variant)
    honest = R.srpo_reward(reflective("7", "7") if variant != "grpo" else plain("7"), "7", variant=variant)
    assert honest["total"] == pytest.approx(RIGHT_RIGHT[variant])
    assert r["total"] < honest["total"] - 1e-9 or variant == "released" and r["total"] <= HONEST_MAX[variant] \
        or name in TIES_BY_DESIGN.get(variant, ()) and r["total"] <= honest["total"] + 1e-9


@pytest.mark.parametrize("variant", R.VARIANTS)
@pytest.mark.parametrize("name", list(GAMING_MC))
def test_gaming_multiple_choice(variant, name):
    r = R.srpo_reward(GAMING_MC[name], "B", variant=variant, choices=MC4)
    assert r["first_correct"] == 0 and r["final_correct"] == 0, name
    assert r["total"] < RIGHT_RIGHT[variant] - 1e-9


LONG = {
    "letters": "a" * 100_000,
    "open tags": "<think>" * 14_300,
    "mixed tags": "<think><answer></think><reflection></answer>" * 2_200,
    "braces": "{" * 100_000,
    "boxes": "\\boxed{" * 14_300,
    "nested boxes": "<answer>" + "\\boxed{" * 10_000 + "7" + "}" * 10_000 + "</answer>",
    "digits": "<answer>" + "9" * 999 + "</answer>",
    "powers": "<answer>" + "x^" * 490 + "2</answer>",
    "fractions": "<answer>" + "\\frac{1}{" * 90 + "2" + "}" * 90 + "</answer>",
    "parentheses": "<think>t</think><answer>((((((2))))))</answer><reflection>r</reflection>"
                   "<answer>(((((3)))))</answer>",
    "symbols": "<answer>" + "+".join(f"x_{{{i}}}" for i in range(100)) + "</answer>",
    "long honest": GAMING["long honest"],
    "huge answer": GAMING["huge answer"],
    "punctuation": "<think>" + ".,;" * 33_000 + "</think><answer>7</answer>",
}


@pytest.mark.parametrize("name", list(LONG))
def test_long_inputs_are_fast(name):
    G.is_correct("x^2", "x^2 + 0")  # warm math-verify up outside the timing
    text = LONG[name]
    for variant in R.VARIANTS:
        t0 = time.perf_counter()
        r = R.srpo_reward(text, "7", variant=variant)
        assert time.perf_counter() - t0 < 0.75, (name, variant)  # worst case: 2 x MATH_VERIFY_BUDGET_S
        assert 0.0 <= r["total"] <= HONEST_MAX[variant]
    t0 = time.perf_counter()
    G.parse_response(text), G.extract_answer(text), G.extract_boxed(text)
    assert time.perf_counter() - t0 < 0.5


# ----------------------------------------------------------------------------------------------
# Property tests (hypothesis)

PIECES = ["<think>", "</think>", "<answer>", "</answer>", "<reflection>", "</reflection>", "7", "8", "B",
          r"\boxed{", "}", "{", " ", "\n", "step ", "A B C D", "7 or 8", r"\frac{14}{2}", "(B)", "<", ">"]
tag_soup = st.lists(st.sampled_from(PIECES), max_size=40).map("".join)
responses = st.one_of(st.text(max_size=300), tag_soup)
golds = st.sampled_from([("7", None), ("B", MC4), ("145°", MC4), ("B", None), (r"\frac{1}{2}", None)])
PROPS = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@PROPS
@given(responses, golds, st.sampled_from(R.VARIANTS), st.sampled_from([0.0, 0.05, 0.1, 0.3]),
       st.booleans(), st.booleans())
def test_property_reward_bounds(text, gold_choices, variant, alpha, use_length, use_eff):
    gold, choices = gold_choices
    r = R.srpo_reward(text, gold, variant=variant, alpha=alpha, use_length=use_length,
                      use_effectiveness=use_eff, choices=choices)
    assert tuple(r) == R.REWARD_KEYS and all(math.isfinite(v) for v in r.values())
    assert r["total"] == pytest.approx(components_sum(r))
    upper = 1.5 if variant in ("grpo", "final") else 1.5 + alpha
    assert -1e-9 <= r["total"] <= upper + 1e-9  # never above an honest response's best
    assert 0.0 <= r["f_len"] <= 1.0
    assert all(r[k] in (0.0, 1.0) for k in ("first_correct", "final_correct", "has_reflection"))


@PROPS
@given(responses, golds)
def test_property_final_is_paper_format_plus_last_answer(text, gold_choices):
    """'final' pays exactly the paper variant's R_format and 1.0 for the answer evaluation scores."""
    gold, choices = gold_choices
    f, p = (R.srpo_reward(text, gold, variant=v, choices=choices) for v in ("final", "paper"))
    assert f["format"] == p["format"] and f["accuracy"] == f["final_correct"] == p["final_correct"]
    assert f["total"] == f["format"] + f["accuracy"]


@PROPS
@given(tag_soup)
def test_property_soup_never_beats_honest(text):
    for variant in R.VARIANTS:
        assert R.srpo_reward(text, "7", variant=variant)["total"] <= HONEST_MAX[variant] + 1e-9
    assert R.srpo_reward(text, "7")["total"] <= R.srpo_reward(reflective("7", "7"), "7")["total"] + 1e-9


@PROPS
@given(st.text(max_size=300))
def test_property_parsing_never_raises(text):
    p = G.parse_response(text)
    assert set(p) >= {"think1", "answer1", "reflection", "think2", "answer2"}
    boxed = G.extract_boxed(text)
    assert boxed is None or boxed in text
    assert G.extract_answer(text) is None or isinstance(G.extract_answer(text), str)
    assert isinstance(G.extract_choice_letters(text), set)


@PROPS
@given(st.text(max_size=80), st.one_of(st.text(max_size=20), st.sampled_from(["7", "B", "0.5", "145°"])),
       st.sampled_from([None, MC4, ["A", "B", "C", "D", "E"]]))
def test_property_grading_never_raises(pred, gold, choices):
    assert G.is_correct(pred, gold, choices) in (True, False)


@settings(max_examples=200, deadline=None, database=None)
@given(st.integers(-10**6, 10**6), st.integers(-10**6, 10**6))
def test_property_integers(a, b):
    assert G.is_correct(str(a), str(b)) == (a == b)
    assert not G.is_correct(str(a), str(a + 1))  # found by this test: 999999 matched 1000000
    assert G.is_correct(f"{a:,}", str(a)) and G.is_correct(f"{a}.0", str(a))


@settings(max_examples=200, deadline=None, database=None)
@given(st.integers(-999, 999), st.integers(1, 999))
def test_property_fractions(n, d):
    assert G.is_correct(rf"\frac{{{n}}}{{{d}}}", f"{n}/{d}")
    assert G.is_correct(f"{n / d:.12f}", rf"\frac{{{n}}}{{{d}}}")
