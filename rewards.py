"""The reflection-aware rewards of SRPO (arXiv 2506.01713, Stage 2, Eqs. 4-8).

A reflective response looks like this (the RL system prompt's layout; the SFT targets of Stage 1
have no second <think>):

    <think>first reasoning</think> <answer>first answer</answer>
    <reflection>critique of the first attempt</reflection>
    <think>second reasoning</think> <answer>final answer</answer>

Every reward below is a pure function of (response text, gold answer) and returns a dict with the
same keys (REWARD_KEYS), so training can log all components whatever the variant. Always
total == format + accuracy + effectiveness + reflection_format + length + verdict (verdict is 0 unless
asked for: it is not in the paper, see below).

variant="paper" (default), Eqs. (4)-(8) of the paper:

    R            = R_task + R_reflection                        Eq. (4)
    R_task       = R_format + R_accuracy                        Eq. (5)
    R_reflection = I_eff + I_ref + alpha * f_len(L)             Eq. (6)

    first -> final | R_format | R_accuracy | I_eff (Eq. 7) | I_ref | alpha*f_len | total
    right -> right |   0.5    |    0.5     |    +0.25      | 0.25  |     0.1     | 1.6
    wrong -> right |   0.5    |    0       |    +0.5       | 0.25  |     0.1     | 1.35
    right -> wrong |   0.5    |    0.5     |    -0.25      | 0.25  |     0.1     | 1.1
    wrong -> wrong |   0.5    |    0       |     0         | 0.25  |     0.1     | 0.85
    no reflection  |   0      | 0.5 or 0   |     0         | 0     |     0       | 0.5 / 0   (our choice)

    f_len(L) = exp(-(|L - T_target| / (T_max - T_target))^2)    Eq. (8)
    L = tokens(response), T_target = 2 * B, T_max = 2.5 * B, B = tokens(first think + first answer)

  R_accuracy grades the FIRST answer; I_eff compares it with the answer after the reflection.
  Totals lie in [0, 1.5 + alpha]; only an honest right->right response of the target length
  reaches the top, so no layout trick can out-earn it.

variant="released": what the authors' code (SRPO_MLLMs, openrlhf srpo_reward_func.py) computes.
    total = format + accuracy + 0.1 * f_len, no separate I_ref, accuracy from a table:
    right->right 0.75 | wrong->right 1.0 | right->wrong 0.25 | wrong->wrong 0   (totals at f_len = 1:
    1.35 | 1.6 | 0.85 | 0.6, so "corrected" outranks "kept right", the opposite of the paper).
    Reproduced on purpose, quirks included (see released_reward). Totals in [0, 1.5 + alpha].

variant="grpo": the plain-GRPO baseline, <think>..</think><answer>..</answer>:
    accuracy 1.0 (final answer right) + format 0.5. Totals in [0, 1.5].

variant="final": RL on the final answer alone, for a policy that answers in the reflective layout (the
    ablation "reflection SFT + RL on the final answer"): accuracy 1.0 when the LAST answer is right +
    R_format 0.5 on the paper variant's layout; no I_eff, no I_ref, no f_len, and nothing for the first
    answer. So it differs from "paper" only by dropping the reflection terms, and from "grpo" only by the
    layout its format term asks for: "grpo" under the reflective prompt would pay 0.5 less to every
    response that reflects. Totals in [0, 1.5].

Not in the paper, off by default: verdict_weight (03 --verdict_reward, EXERCISES.md 14) adds to the paper
variant `verdict_weight` when the reflection's verdict sentence says what the first answer was: "The first
answer is right." over a right one, "... wrong." over a wrong one. No paper term reads the reflection's
words, so they stay what SFT left them (RESULTS.md); this term is the exercise's answer.
The sentence is the toy teacher's wording (VERDICT); a real teacher's reflections would need a pattern of
their own. It is paid only in a reflection I_ref would pay for. `verdict_honest` (0/1) is logged by the paper
variant whatever the weight (0 in the others). The term opens a cheaper path than honesty: at w = 0.25,
wrong -> right with an honest "wrong" earns 1.5 (+ alpha*f_len), as much as right -> right under a false
"wrong", so a policy that cannot yet tell its right first answers can make them wrong instead; on the toy it
does (EXERCISES.md 14, docs/answers.md). Honest right -> right (1.75) stays the top.

Responses are parsed and answers graded by machinery/grading.py (parse_response, first_answer,
extract_answer, is_correct), the same functions 01 and 04 use.
"""

import functools
import math
import re

from machinery import grading

FORMAT_REWARD = 0.5  # R_format, Eq. (5)
ACCURACY_REWARD = 0.5  # R_accuracy for a right first answer, Eq. (5)
REFLECTION_FORMAT_REWARD = 0.25  # I_ref, Eq. (6)
# I_eff, Eq. (7): (first answer right, final answer right) -> reward
EFFECTIVENESS = {(True, True): 0.25, (False, True): 0.5, (True, False): -0.25, (False, False): 0.0}
# released code: accuracy folds I_eff in; (first right, last right) -> accuracy
RELEASED_ACCURACY = {(True, True): 0.75, (False, True): 1.0, (True, False): 0.25, (False, False): 0.0}
GRPO_ACCURACY = 1.0
VERDICT = re.compile(r"The first answer is (right|wrong)\.")  # the toy teacher's verdict (toy/world.py)
VARIANTS = ("paper", "released", "grpo", "final")
PAPER_LAYOUTS = (("think", "answer", "reflection", "think", "answer"),  # RL prompt's layout
                 ("think", "answer", "reflection", "answer"))  # SFT targets' layout
REWARD_KEYS = (
    "total",  # the reward; = format + accuracy + effectiveness + reflection_format + length + verdict
    "format", "accuracy", "effectiveness", "reflection_format",  # R_format, R_accuracy, I_eff, I_ref
    "length",  # alpha * f_len
    "verdict",  # verdict_weight x verdict_honest: not in the paper, 0 by default
    "f_len",  # Eq. (8) before weighting, for logging
    "verdict_honest",  # 0/1: the reflection's verdict sentence matches the first answer, for logging
    "first_correct", "final_correct", "has_reflection",  # 0/1: first answer right, last answer
)  # right (what evaluation scores), a non-empty <reflection> block (grading.has_reflection)


def f_len(L: float, first_len: float) -> float:
    """Eq. (8): length reward, 1 at L = T_target = 2 * first_len, 1/e at T_max = 2.5 * first_len.

    `first_len` is the token length of the first solution (first think + first answer); 0 when
    there is none. Example: f_len(20, 10) == 1.0, f_len(25, 10) == f_len(15, 10) == exp(-1)
    """
    if first_len <= 0:
        return 0.0
    t_target, t_max = 2.0 * first_len, 2.5 * first_len
    return math.exp(-((abs(L - t_target) / (t_max - t_target)) ** 2))  # Eq. (8)


def _result(fmt=0.0, acc=0.0, eff=0.0, ref=0.0, f=0.0, alpha=0.0, first=False, final=False, has_refl=False,
            honest=False, verdict_weight=0.0):
    out = {"format": fmt, "accuracy": acc, "effectiveness": eff, "reflection_format": ref,
           "length": alpha * f, "verdict": verdict_weight * honest, "f_len": f, "verdict_honest": float(honest),
           "first_correct": float(first), "final_correct": float(final), "has_reflection": float(has_refl)}
    out["total"] = fmt + acc + eff + ref + alpha * f + out["verdict"]
    return {k: float(out[k]) for k in REWARD_KEYS}


def _grader(gold, choices):
    """is_correct(text, gold, choices), memoised for one reward call: first, second and final
    answer are often the same text, and an out-of-time verdict is not cached anywhere else."""
    return functools.lru_cache(maxsize=None)(lambda text: grading.is_correct(text, gold, choices))


def _first_solution_len(p, count_tokens):
    return count_tokens(p["think1"] or "") + count_tokens(p["answer1"] or "")


def said_verdict(text):
    """'right' or 'wrong': what the text's last verdict sentence (VERDICT) says; None where it has none."""
    said = VERDICT.findall(text or "")
    return said[-1] if said else None


def honest_verdict(reflection, first_correct) -> bool:
    """True when the reflection's last verdict sentence says what the first answer was; False when it says
    the opposite or has none. Not in the paper: exercise 14's term reads it."""
    said = said_verdict(reflection)
    return said is not None and (said == "right") == bool(first_correct)


def paper_format(p) -> float:
    """R_format (Eq. 5) of a parsed response: the paper variant's layout (see paper_reward), blocks non-empty."""
    return FORMAT_REWARD if p["layout"] in PAPER_LAYOUTS and all(
        p[k] for k in ("think1", "answer1", "reflection", "answer2")) and p["think2"] != "" else 0.0


def paper_reward(response, gold, *, count_tokens=None, alpha=0.1, use_length=True, use_effectiveness=True,
                 use_accuracy=True, use_reflection_format=True, verdict_weight=0.0, choices=None) -> dict:
    """SRPO reward as written in the paper, Eqs. (4)-(8); see the table at the top of the module.

    Format (R_format, our reading of the paper's template): the response is nothing but, in order,
        <think>..</think> <answer>..</answer> <reflection>..</reflection>
        [<think>..</think>] <answer>..</answer>
    with non-empty blocks, each tag once (think and answer at most twice) and only whitespace
    outside the blocks. The second <think> is optional: the SFT targets of Stage 1 have none, and
    a small policy that learned the SFT layout must still be able to earn format reward; the RL
    prompt's layout with the second think is accepted too.
    I_ref: exactly one non-empty <reflection> block, with no tags inside, between an answer and a
    later answer, whatever else the response contains.
    I_eff (Eq. 7) compares the first answer with the last answer after the reflection (a missing
    final answer counts as wrong; without a first answer there is nothing to correct and I_eff is
    0). L counts the whole response; B = tokens(first think) + tokens(first answer), stripped.

    No reflection (the paper is silent; our choice): R_format = 0 because the required format
    includes the reflection, and I_eff, I_ref and f_len are 0 because they judge a reflection
    that is not there; R_accuracy still pays 0.5 for a right answer. So a right answer without
    reflection earns 0.5, a wrong one 0; both rank below every well-formed reflective response
    (>= 0.75 + alpha*f_len), which is the habit SRPO trains, yet among non-reflective responses the
    right one still wins. Paying I_eff as if the answer were "kept" would instead reward skipping
    the reflection. Bounds: 0 <= total <= 1.5 + alpha (+ verdict_weight, not in the paper: see the module).
    """
    count_tokens = count_tokens or grading.default_count_tokens
    p, grade = grading.parse_response(response), _grader(gold, choices)
    has_refl = grading.has_reflection(response, p)
    first = grade(grading.first_answer(response, p))
    final = grade(grading.extract_answer(response, p))
    fmt = paper_format(p)
    acc = ACCURACY_REWARD * first * use_accuracy  # Eq. (5): R_task = R_format + R_accuracy, first answer only
    if not has_refl:  # our choice, see the docstring
        return _result(fmt, acc, first=first, final=final)
    second = grade(grading.graded_text(p["answer2"]))
    eff = 0.0
    if use_effectiveness and p["answer1"] is not None:
        eff = EFFECTIVENESS[(first, second)]  # Eq. (7)
    one_reflection = sum(name == "reflection" for _, _, name, _ in grading.find_tags(response)) == 2 \
        and len(p["reflections"]) == 1 and not grading.find_tags(p["reflection"])
    well_formed = one_reflection and p["answer1"] is not None and p["answer2"] is not None  # what I_ref pays
    ref = REFLECTION_FORMAT_REWARD if well_formed and use_reflection_format else 0.0
    f = f_len(count_tokens(response), _first_solution_len(p, count_tokens)) if use_length else 0.0
    honest = well_formed and honest_verdict(p["reflection"], first)  # not in the paper
    # Eqs. (4) and (6): R = R_format + R_accuracy + I_eff + I_ref + alpha * f_len (+ the verdict term, default 0)
    return _result(fmt, acc, eff, ref, f, alpha, first, final, has_refl, honest, verdict_weight)


def released_reward(response, gold, *, count_tokens=None, alpha=0.1, use_length=True, choices=None) -> dict:
    """The reward the authors' released code computes (reproduced on purpose, quirks included).

    - format 0.5 only for exactly <think><answer><reflection><think><answer>, each block at least
      one character, only whitespace between blocks and after the last </answer> (any tag-free
      text before the first <think> is tolerated, as by their regex). The SFT layout earns 0.
    - accuracy from the first and last <answer> blocks: RELEASED_ACCURACY, 0.75 / 1.0 / 0.25 / 0.
      Fallback: if that gives 0 and the gold is a letter a-d, the last answer block earns 1.0 when
      its lowercased text contains the gold letter and none of the other three (a plain substring
      test: "b is it" passes, "the answer is b" fails on the "a" of "answer").
    - length: alpha * f_len (alpha = 0.1 in their code) with B = tokens(first think) +
      tokens(first answer), L = tokens(response).
    - a response with fewer than two <think> or two <answer> blocks scores 0 everywhere (in their
      code the length term raises and the whole reward falls back to 0).
    Differences: answers are graded by grading.is_correct (math-verify behind a fast path) rather than
    math-verify alone, and their "unparsable gold earns 1.0" branch is not reproduced.
    Bounds: 0 <= total <= 1.5 + alpha.
    """
    count_tokens = count_tokens or grading.default_count_tokens
    p, grade = grading.parse_response(response), _grader(gold, choices)
    answers, has_refl = p["answers"], grading.has_reflection(response, p)
    first = bool(answers) and grade(grading.graded_text(answers[0]))
    final = grade(grading.extract_answer(response, p))
    if len(p["thinks"]) < 2 or len(answers) < 2:  # their length term raises: everything is 0
        return _result(first=first, final=final, has_refl=has_refl)
    last = grade(grading.graded_text(answers[-1]))
    acc = RELEASED_ACCURACY[(first, last)]
    letter = re.sub(r"[\s()]", "", str(gold)).lower()
    said = answers[-1].lower()
    if acc == 0.0 and len(letter) == 1 and letter in "abcd" and letter in said \
            and not any(c in said for c in "abcd" if c != letter):
        acc = RELEASED_ACCURACY[(False, True)]  # the letter fallback
    layout = grading.flat_layout(response, grading.find_tags(response), allow_prefix=True)
    fmt = FORMAT_REWARD if layout is not None and tuple(n for n, _ in layout) == PAPER_LAYOUTS[0] \
        and all(c for _, c in layout) else 0.0
    f = f_len(count_tokens(response), count_tokens(p["thinks"][0]) + count_tokens(answers[0])) \
        if use_length else 0.0
    return _result(fmt, acc, 0.0, 0.0, f, alpha, first, final, has_refl)


def grpo_reward(response, gold, *, choices=None) -> dict:
    """Plain-GRPO baseline: accuracy 1.0 when the final answer is right + format 0.5 when the
    response is exactly <think>..</think> <answer>..</answer> (non-empty, whitespace outside).
    The final answer is extract_answer's (last answer block, else last \\boxed{}). Bounds: [0, 1.5].
    """
    p, grade = grading.parse_response(response), _grader(gold, choices)
    final = grade(grading.extract_answer(response, p))
    fmt = FORMAT_REWARD if p["layout"] == ("think", "answer") and p["think1"] and p["answer1"] else 0.0
    first = grade(grading.first_answer(response, p))
    return _result(fmt, GRPO_ACCURACY * final, first=first, final=final,
                   has_refl=grading.has_reflection(response, p))


def final_reward(response, gold, *, choices=None) -> dict:
    """RL on the final answer alone: accuracy 1.0 when the last answer (extract_answer's) is right + the
    paper's R_format 0.5 when the response has its reflective layout (paper_format). No term looks at the
    first answer or the reflection. A plain <think>..</think><answer>..</answer> earns its accuracy and no
    format, as in the paper variant, whose format also includes the reflection. Bounds: [0, 1.5].
    """
    p, grade = grading.parse_response(response), _grader(gold, choices)
    final = grade(grading.extract_answer(response, p))
    first = grade(grading.first_answer(response, p))
    return _result(paper_format(p), GRPO_ACCURACY * final, first=first, final=final,
                   has_refl=grading.has_reflection(response, p))


def srpo_reward(response: str, gold: str, *, count_tokens=None, variant="paper", alpha=0.1,
                use_length=True, use_effectiveness=True, use_accuracy=True, use_reflection_format=True,
                verdict_weight=0.0, choices=None) -> dict:
    """Reward of one response, every component included (keys: REWARD_KEYS, all floats).

    variant: "paper" (Eqs. 4-8, default), "released" (the authors' code), "grpo" (baseline) or "final"
    (the final answer's accuracy + the reflective layout's format: the ablation without reflection terms).
    count_tokens: text -> token count (the policy's tokenizer in training; grading.default_count_tokens).
    Ablations: use_length=False drops alpha*f_len ("no f_len"), use_effectiveness=False drops I_eff
    ("no I_eff"), use_accuracy=False drops R_accuracy, use_reflection_format=False drops I_ref (these
    three: paper variant only), alpha weighs f_len (0.1; the paper also tries 0.05 and 0.3). verdict_weight
    (paper variant, default 0, not in the paper): paid for an honest verdict sentence (see the module).
    "released" honours alpha and use_length; "grpo" and "final" ignore them all.
    choices: option texts in order A, B, C, ... for multiple choice, else None.

    Example: srpo_reward("<think>1+1=2</think><answer>2</answer><reflection>Checked.</reflection>"
                         "<answer>2</answer>", "2")["total"]   # 1.5 + 0.1 * f_len
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown reward variant {variant!r}; choose from {VARIANTS}")
    if alpha < 0:
        raise ValueError("alpha must be >= 0")
    if verdict_weight and variant != "paper":
        raise ValueError(f"verdict_weight is a term of the paper variant only, not of {variant!r}")
    response = response or ""
    choices = list(choices) if choices else None
    if variant == "grpo":
        return grpo_reward(response, gold, choices=choices)
    if variant == "final":
        return final_reward(response, gold, choices=choices)
    if variant == "released":
        return released_reward(response, gold, count_tokens=count_tokens, alpha=alpha,
                               use_length=use_length, choices=choices)
    return paper_reward(response, gold, count_tokens=count_tokens, alpha=alpha, use_length=use_length,
                        use_effectiveness=use_effectiveness, use_accuracy=use_accuracy,
                        use_reflection_format=use_reflection_format, verdict_weight=verdict_weight, choices=choices)
