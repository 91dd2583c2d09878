"""Parsing, grading and the reflection-aware rewards of SRPO (arXiv 2506.01713, Stage 2).

A reflective response looks like this (the RL system prompt's layout; the SFT targets of Stage 1
have no second <think>):

    <think>first reasoning</think> <answer>first answer</answer>
    <reflection>critique of the first attempt</reflection>
    <think>second reasoning</think> <answer>final answer</answer>

Every reward below is a pure function of (response text, gold answer) and returns a dict with the
same keys (REWARD_KEYS), so training can log all components whatever the variant. Always
total == format + accuracy + effectiveness + reflection_format + length.

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

Grading (is_correct) tries a plain fast path first (normalised strings, numbers, fractions,
percent, degrees and units, option letters) and falls back to math-verify, the authors' grader,
for LaTeX. math-verify gets at most MAX_ANSWER_CHARS characters and MATH_VERIFY_BUDGET_S seconds
per comparison (a SIGALRM timer, so main thread only; other threads get only the cheap filters).
Model output is never eval'ed.

Helpers for the other scripts: parse_response, extract_boxed, extract_answer (the final answer),
first_answer, extract_choice_letter(s), is_correct, default_count_tokens, f_len.
"""

import functools
import logging
import math
import re
import signal
import threading

from math_verify import parse as mv_parse
from math_verify import verify as mv_verify

FORMAT_REWARD = 0.5  # R_format, Eq. (5)
ACCURACY_REWARD = 0.5  # R_accuracy for a right first answer, Eq. (5)
REFLECTION_FORMAT_REWARD = 0.25  # I_ref, Eq. (6)
# I_eff, Eq. (7): (first answer right, final answer right) -> reward
EFFECTIVENESS = {(True, True): 0.25, (False, True): 0.5, (True, False): -0.25, (False, False): 0.0}
# released code: accuracy folds I_eff in; (first right, last right) -> accuracy
RELEASED_ACCURACY = {(True, True): 0.75, (False, True): 1.0, (True, False): 0.25, (False, False): 0.0}
GRPO_ACCURACY = 1.0
VARIANTS = ("paper", "released", "grpo")
PAPER_LAYOUTS = (("think", "answer", "reflection", "think", "answer"),  # RL prompt's layout
                 ("think", "answer", "reflection", "answer"))  # SFT targets' layout
REWARD_KEYS = (
    "total",  # the reward; = format + accuracy + effectiveness + reflection_format + length
    "format", "accuracy", "effectiveness", "reflection_format",  # R_format, R_accuracy, I_eff, I_ref
    "length",  # alpha * f_len
    "f_len",  # Eq. (8) before weighting, for logging
    "first_correct", "final_correct", "has_reflection",  # 0/1: first answer right, last answer
)  # right (what evaluation scores), a non-empty <reflection> block present
MAX_ANSWER_CHARS = 1000  # longer answers are graded wrong without parsing them
MATH_VERIFY_BUDGET_S = 0.25  # wall-clock limit of one math-verify comparison (main thread only)
MAX_NESTING = 6  # answers with deeper brackets are not handed to math-verify

# ----------------------------------------------------------------------------------------------
# Parsing

_TAG = re.compile(r"<\s*(/?)\s*(think|answer|reflection)\s*>")  # "< /think >" counts too
_TOKEN = re.compile(r"\w+|[^\w\s]")
_BRACE = re.compile(r"\\boxed\s*\{|\\[{}]|[{}]")


def default_count_tokens(text: str) -> int:
    """Crude token count: words and single punctuation marks. Training passes the policy tokenizer.

    Example: default_count_tokens("<answer>12.5</answer>") == 10
    """
    return len(_TOKEN.findall(text or ""))


def extract_boxed(text):
    """Contents of the last brace-matched `\\boxed{...}` in `text`, stripped; None if there is none.

    Escaped braces `\\{ \\}` do not count.
    Example: extract_boxed(r"so \\boxed{\\frac{1}{2}}") == r"\\frac{1}{2}"
    """
    if not text or "\\boxed" not in text:
        return None
    stack, last = [], None  # stack: content start of each open brace that begins a \boxed, else None
    for m in _BRACE.finditer(text):  # one pass, so a 100k-character brace soup stays linear
        tok = m.group()
        if tok in ("\\{", "\\}"):
            continue
        if tok != "}":
            stack.append(m.end() if tok != "{" else None)
        elif stack:
            start = stack.pop()
            if start is not None and (last is None or start > last[0]):
                last = (start, m.start())
    return text[last[0]:last[1]].strip() if last else None


def _tags(text):
    """(start, end, name, closing) for every <think>/<answer>/<reflection> tag, in order."""
    return [(m.start(), m.end(), m.group(2), m.group(1) == "/") for m in _TAG.finditer(text)]


def _blocks(text, tags):
    """Lenient blocks: each opening tag paired with the next closing tag of its name, as
    re.findall(r"<think>(.*?)</think>") would, sorted by position. Blocks may nest or overlap."""
    blocks, open_at = [], {}
    for start, end, name, closing in tags:
        if not closing:
            open_at.setdefault(name, (start, end))  # an opening tag inside an open block is content
        elif name in open_at:
            s, e = open_at.pop(name)
            blocks.append((s, name, text[e:start]))
    return [(name, content) for _, name, content in sorted(blocks)]


def _flat_layout(text, tags, allow_prefix=False):
    """[(name, content), ...] when the tags form flat blocks <x>...</x> separated only by whitespace
    (any text before the first block too if allow_prefix), else None."""
    if not tags or len(tags) % 2:
        return None
    layout, prev_end = [], 0
    for (s1, e1, n1, c1), (s2, e2, n2, c2) in zip(tags[::2], tags[1::2]):
        if c1 or not c2 or n1 != n2:
            return None  # not <x> followed by its </x>: nested, crossed or unmatched tags
        if text[prev_end:s1].strip() and not (allow_prefix and prev_end == 0):
            return None
        layout.append((n1, text[e1:s2]))
        prev_end = e2
    return None if text[prev_end:].strip() else layout


def parse_response(text: str) -> dict:
    """Split a response into its blocks. Robust to whitespace, missing blocks and extra text.

    Returns `think1, answer1, reflection, think2, answer2` (stripped contents, None when missing):
    the first reflection splits the response; before it the first think and first answer, after
    it the first think and the LAST answer. Without a reflection, everything after the first
    answer counts as the second attempt. Also `answers` (every answer block, in order), `thinks`,
    `reflections`, and `layout`: the tuple of block names if the response is nothing but flat
    blocks and whitespace, else None.

    Example: parse_response("<think>1+1</think><answer>2</answer><reflection>ok</reflection>"
                            "<answer>2</answer>")["answer2"] == "2"   (SFT layout: think2 is None)
    """
    text = text or ""
    tags = _tags(text)
    blocks = _blocks(text, tags)
    names = [n for n, _ in blocks]
    split = names.index("reflection") if "reflection" in names else None
    if split is None and "answer" in names:
        split = names.index("answer")
    before = blocks[:split] if split is not None else blocks
    after = blocks[split + 1:] if split is not None else []

    def first(bs, name):
        return next((c.strip() for n, c in bs if n == name), None)

    layout = _flat_layout(text, tags)
    out = {
        "think1": first(before, "think"),
        "answer1": first(before, "answer"),
        "reflection": first(blocks, "reflection"),
        "think2": first(after, "think"),
        "answer2": next((c.strip() for n, c in reversed(after) if n == "answer"), None),
        "answers": [c.strip() for n, c in blocks if n == "answer"],
        "thinks": [c.strip() for n, c in blocks if n == "think"],
        "reflections": [c.strip() for n, c in blocks if n == "reflection"],
        "layout": tuple(n for n, _ in layout) if layout is not None else None,
    }
    if split is not None and names[split] == "answer":  # no reflection: the split block is answer1
        out["answer1"] = blocks[split][1].strip()
    return out


def _graded_text(block):
    """What gets graded in an answer block: its last \\boxed{} if any, else the whole block."""
    if block is None:
        return None
    boxed = extract_boxed(block)
    return boxed if boxed is not None else block.strip()


def first_answer(text: str):
    """The answer before the reflection (boxed contents if boxed), or None."""
    return _graded_text(parse_response(text)["answer1"])


def extract_answer(text: str):
    """The FINAL answer: the last <answer> block (its last \\boxed{} if any); without answer blocks
    the last \\boxed{} anywhere; else None. This is what evaluation scores.

    Example: extract_answer("<answer>3</answer><reflection>x</reflection><answer>\\boxed{4}</answer>") == "4"
    """
    return _final_text(parse_response(text), text)


def _final_text(p, text):
    return _graded_text(p["answers"][-1]) if p["answers"] else extract_boxed(text or "")


# ----------------------------------------------------------------------------------------------
# Grading

_WRAPPER = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_ANSWER_PREFIX = re.compile(
    r"^\s*(?:(?:so|thus|therefore|hence)\s*,?\s*)?(?:the\s+)?(?:final\s+|correct\s+|best\s+)?"
    r"(?:answer|option|choice)(?:\s+is)?\s*[:：]?\s*", re.I)
_UNITS = (r"degrees?|deg|cm|mm|km|meters?|metres?|inch(?:es)?|in|ft|feet|foot|yards?|yd|miles?|mi|"
          r"square\s+units|sq\s*units|units?|kg|grams?|mg|lbs?|pounds?|seconds?|secs?|minutes?|mins?|"
          r"hours?|hrs?|days?|weeks?|years?|dollars?|cents?|percent|liters?|litres?|ml|people|students")
_UNIT_TAIL = re.compile(rf"(?<=[\d}}])\s*(?:(?:{_UNITS})|\s[mgslh])(?:\s*\^\s*\{{?[23]\}}?|²|³)?\.?$", re.I)
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?")
_NUM = r"[+-]?\d+(?:\.\d+)?"
_FRACTION = re.compile(rf"([+-]?)\\frac\{{({_NUM})\}}\{{({_NUM})\}}|([+-]?)\\frac(\d)(\d)|({_NUM})/({_NUM})")
_LIST_SEPARATOR = re.compile(r"\b(?:or|and)\b|\\lor|\\vee|\\\\|[,;\n]", re.I)
# inputs that could keep sympy busy for seconds: power towers, huge exponents, big factorials
_EXPENSIVE = re.compile(r"\^[\s{(]*[\w.]*\s*\^|\^[\s{(]*\d{4,}|(?:\d{3,}|[)}])\s*!")


def _unwrap(s: str) -> str:
    """Drop math delimiters, \\text{}-style wrappers and markdown emphasis; keep case and spaces."""
    s = s.strip()
    if "\\boxed" in s:
        s = extract_boxed(s) or s
    for _ in range(2):
        s = _WRAPPER.sub(r"\1", s)
    for d in ("$", "\\(", "\\)", "\\[", "\\]", "**"):
        s = s.replace(d, "")
    return s.strip().strip("\"'`").strip()


def _normalize(s: str) -> str:
    """Canonical string for plain equality: no LaTeX spacing, degrees, units or whitespace; lowercase.

    Example: _normalize(r"$145^{\\circ}$") == "145", _normalize("[1, 2]") == "[1,2]"
    """
    s = _unwrap(s)
    s = _ANSWER_PREFIX.sub("", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\%", "%")
    s = re.sub(r"\\(?:left|right|displaystyle)(?![a-zA-Z])", "", s)
    s = re.sub(r"\\[,;:! ]|\\q?quad|~", " ", s)
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?|°|\\circ|\\degree", "", s)
    s = _UNIT_TAIL.sub("", s).strip().rstrip(".")
    s = re.sub(r"^[a-zA-Z]\s*=\s*", "", s)  # "x = 7" -> "7"
    return re.sub(r"\s+", "", s).lower()


def _to_number(s: str):
    """(value, is_percent) for a normalised plain number or numeric fraction, else None."""
    pct = s.endswith("%")
    s = s[:-1] if pct else s
    if re.fullmatch(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):  # thousands separators
        s = s.replace(",", "")
    try:
        if _NUMBER.fullmatch(s):
            value = float(s)
        elif m := _FRACTION.fullmatch(s):
            sign, num, den = (m[1], m[2], m[3]) if m[2] else (m[4], m[5], m[6]) if m[5] else ("", m[7], m[8])
            value = (-1 if sign == "-" else 1) * float(num) / float(den)
        else:
            return None
    except (ValueError, ZeroDivisionError, OverflowError):
        return None
    return (value, pct) if math.isfinite(value) else None


def _numbers_match(x, y) -> bool:
    (a, pa), (b, pb) = x, y
    if pa == pb and float(a).is_integer() and float(b).is_integer():
        return a == b  # whole numbers match exactly: 999999 is not 1000000 (within rel_tol 1e-6)
    if math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9):
        return True  # "25%" == "25"
    if pa != pb:  # "25%" == "0.25"
        return math.isclose(a / 100 if pa else a, b / 100 if pb else b, rel_tol=1e-6, abs_tol=1e-9)
    return False


class _OutOfTime(BaseException):
    """Raised by our timer; a BaseException so math-verify's `except Exception` lets it through."""


_armed = False  # True only while _symbolic_equal runs math-verify under its timer


def _out_of_time(signum, frame):
    if _armed:  # an alarm that lands after the verdict is in must not raise in unrelated code
        raise _OutOfTime


def _disarm():
    global _armed
    _armed = False
    signal.setitimer(signal.ITIMER_REAL, 0)


@functools.lru_cache(maxsize=1 << 14)
def _math_verify(pred: str, gold: str) -> bool:
    """math-verify's verdict without its own (whole-second, signal-based) timeouts. Only finished
    verdicts are cached: an interrupted call raises and lru_cache stores nothing."""
    g = mv_parse(f"${gold}$", parsing_timeout=None)
    p = mv_parse(f"${pred}$", parsing_timeout=None)
    return bool(g and p and mv_verify(g, p, timeout_seconds=None))


@functools.cache
def _warm_up():
    """The LaTeX parser (ANTLR) and sympy are several times slower on their first inputs (~1 s in
    all); warm them once, outside the time budget. math-verify's one-time warning that its own
    timeouts are off is muted here: _symbolic_equal keeps the time instead."""
    log = logging.getLogger("math_verify")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        for s in ("x^2+2x+1", r"\frac{\sqrt{2}}{2}", "[1, 2]", "(3,-4)", r"\{1,2\}", r"2\pi r"):
            _math_verify(s, "(x+1)^2")
    except Exception:
        pass
    finally:
        log.setLevel(level)


def _symbolic_equal(pred: str, gold: str) -> bool:
    """math-verify's verdict within MATH_VERIFY_BUDGET_S seconds (False when out of time).

    The budget is a SIGALRM timer, which only the main thread can set; in other threads there is
    no time limit and only the cheap filters below (length, nesting, _EXPENSIVE) apply."""
    if len(pred) > MAX_ANSWER_CHARS or any(_EXPENSIVE.search(s) or _nesting(s) > MAX_NESTING
                                           for s in (pred, gold)):
        return False
    _warm_up()
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        try:
            return _math_verify(pred, gold)
        except Exception:
            return False
    global _armed
    verdict = False  # out of time, or sympy failed: not provably equal
    previous = signal.signal(signal.SIGALRM, _out_of_time)
    try:
        try:
            _armed = True
            # The alarm repeats every 50 ms after the budget: Python swallows an exception raised
            # inside a __del__ or weakref callback (sympy runs many), so one alarm is not enough.
            signal.setitimer(signal.ITIMER_REAL, MATH_VERIFY_BUDGET_S, 0.05)
            verdict = _math_verify(pred, gold)
        finally:
            _disarm()
    except (_OutOfTime, Exception):
        _disarm()  # a late alarm may have cut the first _disarm short
    finally:
        signal.signal(signal.SIGALRM, previous)
    return verdict


def _nesting(s: str) -> int:
    """Deepest bracket nesting; the LaTeX parser slows down sharply with depth."""
    depth = deepest = 0
    for ch in s:
        if ch in "([{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in ")]}":
            depth = max(depth - 1, 0)
    return deepest


def _separators(s: str) -> set:
    """List separators in s. math-verify reads "35°, 145°" as 145, so we refuse lists first."""
    return {m.group().lower() for m in _LIST_SEPARATOR.finditer(s)}


def _same_value(pred: str, gold: str, symbolic=True) -> bool:
    """Free-form comparison: plain equality, then numbers, then (if symbolic) math-verify."""
    p, g = _normalize(pred), _normalize(gold)
    if not p or not g:
        return False
    if p == g:
        return True
    x, y = _to_number(p), _to_number(g)
    if x is not None and y is not None:
        return _numbers_match(x, y)
    pred, gold = _unwrap(pred), _unwrap(gold)
    if not symbolic or _separators(pred) - _separators(gold):  # "7, 8" for gold "7": several answers
        return False
    return _symbolic_equal(pred, gold)


def extract_choice_letters(text: str) -> set:
    """Option letters a short answer names: "B", "(B)", "B.", "Option B", "The answer is B",
    "B. 145°" -> {"B"}; "A, C" or "A B C D" -> several (graded wrong); free text -> set().

    Lone letters ("b", "A and B") may be any case; letters inside text must be capitals marked as
    options ("(B)", "B.", "answer is B"), so the article in "B. A triangle" does not count.
    """
    s = _unwrap(text or "")
    for _ in range(2):
        s = _ANSWER_PREFIX.sub("", s)
    tokens = [t for t in re.split(r"[\s,;/&().:*\[\]]+|\b(?:and|or)\b", s) if t]
    if tokens and all(len(t) == 1 and t.isascii() and t.isalpha() for t in tokens):
        return {t.upper() for t in tokens}
    found = set(re.findall(r"\(([A-Z])\)", s))  # (B)
    found |= set(re.findall(r"(?:^|\s)([A-Z])[.:)](?=\s|$)", s))  # B. text / B) text
    found |= set(re.findall(r"(?i:answer|option|choice)\s*(?:is)?\s*[:：]?\s*\(?([A-Z])(?!\w)", s))
    return found


def extract_choice_letter(text: str):
    """The one option letter `text` names, or None (no letter, or several)."""
    letters = extract_choice_letters(text)
    return letters.pop() if len(letters) == 1 else None


def _gold_option(gold: str, choices):
    """Index of the gold option: gold is a letter ("B", "(B)") or the text of exactly one option."""
    m = re.fullmatch(r"\(?([A-Z])\)?\.?", _unwrap(gold))
    if m and ord(m[1]) - 65 < (len(choices) if choices else 26):
        return ord(m[1]) - 65
    if choices:
        hits = [i for i, c in enumerate(choices) if _same_value(gold, c, symbolic=False)]
        if len(hits) == 1:
            return hits[0]
    return None


def is_correct(prediction, gold, choices=None) -> bool:
    """Whether `prediction` (an extracted answer) matches `gold`.

    Multiple choice (gold is a letter, or `choices` lists option texts in order A, B, C, ...):
    right iff the prediction is the exact text of the gold option, or names exactly the gold
    letter, or, naming no letter, equals the value of the gold option and of no other. Otherwise numbers, fractions, percent, degrees, units and
    LaTeX via math-verify. Predictions over MAX_ANSWER_CHARS characters are wrong.

    Example: is_correct("\\frac{1}{2}", "0.5"), is_correct("(B) 145°", "145°", ["35°", "145°"])
    """
    if prediction is None or gold is None:
        return False
    pred, gold = str(prediction).strip(), str(gold).strip()
    if not pred or not gold or len(pred) > MAX_ANSWER_CHARS:
        return False
    choices = [str(c) for c in choices] if choices else None
    option = _gold_option(gold, choices)
    if option is not None:
        if choices and len(_normalize(pred)) > 1:  # an option's exact text before letters, for
            # MathVision options like "A, B, C or D"; a lone letter stays a letter though
            exact = [i for i, c in enumerate(choices) if _normalize(c) == _normalize(pred)]
            if len(exact) == 1:
                return exact == [option]
        letters = extract_choice_letters(pred)
        if letters:
            return letters == {chr(65 + option)}
        if not choices:
            return False
        hits = [i for i, c in enumerate(choices) if _same_value(pred, c, symbolic=False)]
        # one math-verify call at most, against the gold option, so ten options stay cheap
        return hits == [option] if hits else _same_value(pred, choices[option])
    return _same_value(pred, gold)


# ----------------------------------------------------------------------------------------------
# Rewards


def f_len(L: float, first_len: float) -> float:
    """Eq. (8): length reward, 1 at L = T_target = 2 * first_len, 1/e at T_max = 2.5 * first_len.

    `first_len` is the token length of the first solution (first think + first answer); 0 when
    there is none. Example: f_len(20, 10) == 1.0, f_len(25, 10) == f_len(15, 10) == exp(-1)
    """
    if first_len <= 0:
        return 0.0
    t_target, t_max = 2.0 * first_len, 2.5 * first_len
    return math.exp(-((abs(L - t_target) / (t_max - t_target)) ** 2))  # Eq. (8)


def _result(fmt=0.0, acc=0.0, eff=0.0, ref=0.0, f=0.0, alpha=0.0, first=False, final=False, has_refl=False):
    out = {"format": fmt, "accuracy": acc, "effectiveness": eff, "reflection_format": ref,
           "length": alpha * f, "f_len": f, "first_correct": float(first),
           "final_correct": float(final), "has_reflection": float(has_refl)}
    out["total"] = fmt + acc + eff + ref + alpha * f
    return {k: float(out[k]) for k in REWARD_KEYS}


def _grader(gold, choices):
    """is_correct(text, gold, choices), memoised for one reward call: first, second and final
    answer are often the same text, and an out-of-time verdict is not cached anywhere else."""
    return functools.lru_cache(maxsize=None)(lambda text: is_correct(text, gold, choices))


def _first_solution_len(p, count_tokens):
    return count_tokens(p["think1"] or "") + count_tokens(p["answer1"] or "")


def paper_reward(response, gold, *, count_tokens=None, alpha=0.1, use_length=True,
                 use_effectiveness=True, choices=None) -> dict:
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
    the reflection. Bounds: 0 <= total <= 1.5 + alpha.
    """
    count_tokens = count_tokens or default_count_tokens
    p, grade = parse_response(response), _grader(gold, choices)
    has_refl = bool(p["reflection"])
    first = grade(_graded_text(p["answer1"]))
    final = grade(_final_text(p, response))
    fmt = FORMAT_REWARD if p["layout"] in PAPER_LAYOUTS and all(
        p[k] for k in ("think1", "answer1", "reflection", "answer2")) and p["think2"] != "" else 0.0
    acc = ACCURACY_REWARD * first  # Eq. (5): R_task = R_format + R_accuracy, first answer only
    if not has_refl:  # our choice, see the docstring
        return _result(fmt, acc, first=first, final=final)
    second = grade(_graded_text(p["answer2"]))
    eff = 0.0
    if use_effectiveness and p["answer1"] is not None:
        eff = EFFECTIVENESS[(first, second)]  # Eq. (7)
    one_reflection = sum(name == "reflection" for _, _, name, _ in _tags(response)) == 2 \
        and len(p["reflections"]) == 1 and not _TAG.search(p["reflection"])
    ref = REFLECTION_FORMAT_REWARD if one_reflection and p["answer1"] is not None \
        and p["answer2"] is not None else 0.0
    f = f_len(count_tokens(response), _first_solution_len(p, count_tokens)) if use_length else 0.0
    # Eqs. (4) and (6): R = R_format + R_accuracy + I_eff + I_ref + alpha * f_len
    return _result(fmt, acc, eff, ref, f, alpha, first, final, has_refl)


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
    Differences: answers are graded by our is_correct (math-verify behind a fast path) rather than
    math-verify alone, and their "unparsable gold earns 1.0" branch is not reproduced.
    Bounds: 0 <= total <= 1.5 + alpha.
    """
    count_tokens = count_tokens or default_count_tokens
    p, grade = parse_response(response), _grader(gold, choices)
    answers, has_refl = p["answers"], bool(p["reflection"])
    first = bool(answers) and grade(_graded_text(answers[0]))
    final = grade(_final_text(p, response))
    if len(p["thinks"]) < 2 or len(answers) < 2:  # their length term raises: everything is 0
        return _result(first=first, final=final, has_refl=has_refl)
    last = grade(_graded_text(answers[-1]))
    acc = RELEASED_ACCURACY[(first, last)]
    letter = re.sub(r"[\s()]", "", str(gold)).lower()
    said = answers[-1].lower()
    if acc == 0.0 and len(letter) == 1 and letter in "abcd" and letter in said \
            and not any(c in said for c in "abcd" if c != letter):
        acc = RELEASED_ACCURACY[(False, True)]  # the letter fallback
    layout = _flat_layout(response, _tags(response), allow_prefix=True)
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
    p, grade = parse_response(response), _grader(gold, choices)
    final = grade(_final_text(p, response))
    fmt = FORMAT_REWARD if p["layout"] == ("think", "answer") and p["think1"] and p["answer1"] else 0.0
    first = grade(_graded_text(p["answer1"]))
    return _result(fmt, GRPO_ACCURACY * final, first=first, final=final, has_refl=bool(p["reflection"]))


def srpo_reward(response: str, gold: str, *, count_tokens=None, variant="paper", alpha=0.1,
                use_length=True, use_effectiveness=True, choices=None) -> dict:
    """Reward of one response, every component included (keys: REWARD_KEYS, all floats).

    variant: "paper" (Eqs. 4-8, default), "released" (the authors' code) or "grpo" (baseline).
    count_tokens: text -> token count (the policy's tokenizer in training; default_count_tokens).
    Ablations: use_length=False drops alpha*f_len ("no f_len"), use_effectiveness=False drops I_eff
    ("no I_eff", paper variant only), alpha weighs f_len (0.1; the paper also tries 0.05 and 0.3).
    "released" honours alpha and use_length; "grpo" ignores all three.
    choices: option texts in order A, B, C, ... for multiple choice, else None.

    Example: srpo_reward("<think>1+1=2</think><answer>2</answer><reflection>Checked.</reflection>"
                         "<answer>2</answer>", "2")["total"]   # 1.5 + 0.1 * f_len
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown reward variant {variant!r}; choose from {VARIANTS}")
    if alpha < 0:
        raise ValueError("alpha must be >= 0")
    response = response or ""
    choices = list(choices) if choices else None
    if variant == "grpo":
        return grpo_reward(response, gold, choices=choices)
    if variant == "released":
        return released_reward(response, gold, count_tokens=count_tokens, alpha=alpha,
                               use_length=use_length, choices=choices)
    return paper_reward(response, gold, count_tokens=count_tokens, alpha=alpha, use_length=use_length,
                        use_effectiveness=use_effectiveness, choices=choices)
