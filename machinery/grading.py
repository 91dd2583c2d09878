"""Parsing and grading of responses: what the answers are, and whether one matches the gold.

The rewards (rewards.py, arXiv 2506.01713 Eqs. 4-8), the reflection data (01) and the evaluation (04)
all read responses with these functions, so "the first answer", "the final answer", "has a
reflection" and "right" mean the same thing in every stage. A reflective response:

    <think>first reasoning</think> <answer>first answer</answer>
    <reflection>critique of the first attempt</reflection>
    <think>second reasoning</think> <answer>final answer</answer>

(the RL system prompt's layout; the SFT targets of Stage 1 have no second <think>).

Parsing (parse_response) is lenient: whitespace, missing blocks and extra text are tolerated, and
`layout` says whether the response is nothing but flat blocks. The final answer (extract_answer) is
the last <answer> block, its last \\boxed{} if any; this is what evaluation scores.

Grading (is_correct) tries a plain fast path first (normalised strings, numbers, fractions, percent,
degrees and units, option letters) and falls back to math-verify, the grader of the authors' code,
for LaTeX. math-verify gets at most MAX_ANSWER_CHARS characters and MATH_VERIFY_BUDGET_S seconds per
comparison (a SIGALRM timer, so main thread only; other threads get only the cheap filters). Model
output is never eval'ed.
"""

import functools
import logging
import math
import re
import signal
import threading

from math_verify import parse as mv_parse
from math_verify import verify as mv_verify

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


def find_tags(text):
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


def flat_layout(text, tags, allow_prefix=False):
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
    tags = find_tags(text)
    blocks = _blocks(text, tags)
    names = [n for n, _ in blocks]
    split = names.index("reflection") if "reflection" in names else None
    if split is None and "answer" in names:
        split = names.index("answer")
    before = blocks[:split] if split is not None else blocks
    after = blocks[split + 1:] if split is not None else []

    def first(bs, name):
        return next((c.strip() for n, c in bs if n == name), None)

    layout = flat_layout(text, tags)
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


def graded_text(block):
    """What gets graded in an answer block: its last \\boxed{} if any, else the whole block."""
    if block is None:
        return None
    boxed = extract_boxed(block)
    return boxed if boxed is not None else block.strip()


def first_answer(text: str, parsed=None):
    """The answer before the reflection (boxed contents if boxed), or None.
    `parsed`: parse_response(text), when the caller has it already."""
    return graded_text((parsed or parse_response(text))["answer1"])


def extract_answer(text: str, parsed=None):
    """The FINAL answer: the last <answer> block (its last \\boxed{} if any); without answer blocks
    the last \\boxed{} anywhere; else None. This is what evaluation scores.
    `parsed`: parse_response(text), when the caller has it already.

    Example: extract_answer("<answer>3</answer><reflection>x</reflection><answer>\\boxed{4}</answer>") == "4"
    """
    answers = (parsed or parse_response(text))["answers"]
    return graded_text(answers[-1]) if answers else extract_boxed(text or "")


def has_reflection(text: str, parsed=None) -> bool:
    """Whether the response reflects: its first <reflection> block is non-empty. Training logs this
    (the reward's `has_reflection`) and evaluation reports its rate, so both count the same thing;
    whether the reflection is also well placed is the reward's I_ref (rewards.py).
    `parsed`: parse_response(text), when the caller has it already."""
    return bool((parsed or parse_response(text))["reflection"])


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
    letter, or, naming no letter, equals the value of the gold option and of no other.
    Otherwise numbers, fractions, percent, degrees, units and LaTeX via math-verify.
    Predictions over MAX_ANSWER_CHARS characters are wrong.

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
