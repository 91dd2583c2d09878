"""Scoring answers the way the paper's evaluation does, and the quick check of a toy model.

`score` reads the answers a response gives (the final one decides; the first one shows what the
reflection did) and hands them to the benchmark's own rules (benchmarks.SCORERS); `make_row` is one
answered item as 04_eval.py writes it; `summarize` turns rows into accuracy per category and the
reflection metrics. `check_toy` does all three for a model in memory on toy test problems: 00 prints
it for the base model, 02 before and after SFT, with the same rules as 04.
"""

from collections import defaultdict

from machinery import benchmarks, dataset, grading, rollout


def score(benchmark, item, response, extract=None):
    """Score `response` to `item` (a row in the benchmark's own schema) with the benchmark's rules.

    The FINAL answer decides `correct` (the last <answer> block, its \\boxed{} if any; else the last
    \\boxed{}; else, on the real benchmarks, the whole response, read by the benchmark's own
    heuristics). The first answer is scored the same way. `extract(question, text) -> text` is an
    optional judge. `has_reflection` is grading.has_reflection, the reward's has_reflection too.

    Example:
        >>> score("mathvision", {"answer": "6", "options": []},
        ...       "<think>..</think><answer>5</answer><reflection>I missed one.</reflection>"
        ...       "<think>..</think><answer>\\\\boxed{6}</answer>")["correct"]
        True
    """
    parsed = grading.parse_response(response)
    final = grading.extract_answer(response, parsed) or ""
    first = grading.first_answer(response, parsed) or ""
    # The toy tasks grade like the training reward (no answer found = wrong); on the real benchmarks
    # their own heuristics read the whole response when it has no answer
    if benchmark not in benchmarks.TOY_BENCHMARKS:
        final = final or response
    first = first or final
    if extract is not None:  # the judge reads the answer text; the benchmark's rules still decide
        question = item.get("_question") or item.get("question", "")
        same = first == final
        final = extract(question, final)
        first = final if same else extract(question, first)
    scorer = benchmarks.SCORERS[benchmark]
    final_score = scorer(item, final)
    first_score = final_score if first == final else scorer(item, first)
    return {"correct": bool(final_score["correct"]), "extracted": final_score["extracted"],
            "first_correct": bool(first_score["correct"]), "first_extracted": first_score["extracted"],
            "has_reflection": grading.has_reflection(response, parsed)}


def make_row(benchmark, item, response, extract=None):
    """The JSONL row for one answered item: what was asked, said, extracted and judged."""
    s = score(benchmark, item, response, extract)
    reflection = grading.parse_response(response)["reflection"] or ""
    return {"id": item["_id"], "category": item["_category"], "question": item["_question"],
            "answer": str(item.get("answer")), "response": response,
            "first_answer": s["first_extracted"], "final_answer": s["extracted"],
            "first_correct": s["first_correct"], "correct": s["correct"],
            "has_reflection": s["has_reflection"],
            "response_tokens": grading.default_count_tokens(response),
            "reflection_tokens": grading.default_count_tokens(reflection) if s["has_reflection"] else 0,
            "error": None}


def summarize(rows, benchmark):
    """Accuracy per category and overall, and the reflection metrics. Accuracies are percentages.

    Over the items in `overall` (all but MathVerse's "Text Only"):
      reflection_rate  share of responses with a reflection (a non-empty <reflection> block:
                       grading.has_reflection, what training logs as has_reflection too)
      first_acc        accuracy of the first answer; final_acc: of the final (last) answer
      wrong_to_right   share of ALL items whose first answer is wrong and final answer right
      right_to_wrong   share of ALL items whose first answer is right and final answer wrong
                       (so final_acc = first_acc + wrong_to_right - right_to_wrong)
      mean_response_tokens, mean_reflection_tokens  (grading.default_count_tokens; reflection: over
                       responses that have one)
    Items that errored count as wrong, so the denominator stays the benchmark's size; `errors` counts
    them.
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
    order = benchmarks.MATHVERSE_VERSIONS + ["Text Only"] if benchmark == "mathverse" else []
    names = [c for c in order if c in by_category] + sorted(c for c in by_category if c not in order)
    categories = {}
    for c in names:
        rs = by_category[c]
        categories[c] = {"n": len(rs), "first_acc": pct(rs, lambda r: r["first_correct"]),
                         "final_acc": pct(rs, lambda r: r["correct"]),
                         "errors": sum(bool(r.get("error")) for r in rs)}
    scored = [r for r in rows if r["category"] not in benchmarks.NOT_IN_OVERALL]
    in_overall = [c for c in names if c not in benchmarks.NOT_IN_OVERALL]
    if benchmark in benchmarks.MACRO_AVERAGED and in_overall:
        overall = {"n": len(scored), **{
            key: round(sum(categories[c][key] for c in in_overall) / len(in_overall), 2)
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


def check_toy(model, processor, *, n, prompt, max_new_tokens=128, batch_size=64, seed=0, desc="eval"):
    """Greedy answers of `model` to the first n test problems of its own toy task (`processor.task`)
    in the `prompt` format ('reflect' or 'plain'), scored and summarised as 04_eval.py does.
    Returns (summary, rows)."""
    task = getattr(processor, "task", "toy")
    items = benchmarks.load_items(task, "test", limit=n, seed=seed)
    texts = rollout.generate_responses(model, processor, [it["_question"] for it in items],
                                       [dataset.open_image(it["_image"]) for it in items],
                                       system_prompt=dataset.SYSTEM_PROMPTS[prompt],
                                       max_new_tokens=max_new_tokens, batch_size=batch_size, desc=desc)
    rows = [make_row(task, item, text) for item, text in zip(items, texts)]
    return summarize(rows, task), rows


# ----------------------------------------------------------------------------------------------
# The headroom gauge: what RL can gain, from k samples per item beside the greedy answer


REACHABLE_P = 0.25  # greedy wrong, but at least this share of samples right: RL can flip it
FRAGILE_P = 0.5  # greedy right, but fewer than this share of samples right: RL can break it


def sample_row(benchmark, item, responses, extract=None):
    """One item's k sampled responses, scored like greedy ones: a row of the samples JSONL."""
    scores = [score(benchmark, item, r, extract) for r in responses]
    return {"id": item["_id"], "category": item["_category"], "responses": responses,
            "first_correct": [s["first_correct"] for s in scores], "correct": [s["correct"] for s in scores]}


def headroom(greedy_rows, sample_rows):
    """RL raises greedy accuracy on problems that sampling already answers right some of the time, and only
    sharpens the others (Yue et al. 2025; the learning signal of a prompt scales with p (1 - p)). Per
    answer (final, first) and per category, in % of items, from each item's greedy answer and the share p
    of its k samples that are right:
      greedy, pass@1 (mean p), pass@k (any sample right);
      reachable  greedy wrong, p >= 1/4 (what RL can realistically flip);  any_right: greedy wrong, p > 0;
      fragile    greedy right, p < 1/2 (what RL can break);  band: 1/4 <= p <= 3/4 (where the signal is).
    """
    by_id = {r["id"]: r for r in sample_rows}
    pairs = [(g, by_id[g["id"]]) for g in greedy_rows if g["id"] in by_id and not g.get("error")]

    def figures(pairs, key):
        if not pairs:
            return None
        p = [sum(s[key]) / len(s[key]) for _, s in pairs]
        right = [bool(g[key]) for g, _ in pairs]
        share = lambda flags: round(100 * sum(flags) / len(flags), 2)  # noqa: E731
        return {"n": len(pairs), "greedy": share(right), "pass@1": round(100 * sum(p) / len(p), 2),
                "pass@k": share([any(s[key]) for _, s in pairs]),
                "reachable": share([not r and q >= REACHABLE_P for r, q in zip(right, p)]),
                "any_right": share([not r and q > 0 for r, q in zip(right, p)]),
                "fragile": share([r and q < FRAGILE_P for r, q in zip(right, p)]),
                "band": share([REACHABLE_P <= q <= 1 - REACHABLE_P for q in p])}

    categories = sorted({g["category"] for g, _ in pairs})
    return {"k": len(pairs[0][1]["correct"]) if pairs else 0,
            "final": figures(pairs, "correct"), "first": figures(pairs, "first_correct"),
            "categories": {c: {"final": figures([x for x in pairs if x[0]["category"] == c], "correct"),
                               "first": figures([x for x in pairs if x[0]["category"] == c], "first_correct")}
                           for c in categories}}


HEADROOM_COLUMNS = ("greedy", "pass@1", "pass@k", "reachable", "any_right", "fragile", "band")


def headroom_markdown(gauges):
    """{model: headroom(...)} -> a Markdown table of the final and first answers' figures."""
    k = next(iter(gauges.values()))["k"]
    head = ["model", "answer", *[c.replace("pass@k", f"pass@{k}") + " %" for c in HEADROOM_COLUMNS]]
    lines = [f"Headroom (k = {k} samples per item; reachable: greedy wrong, >= 1/4 of samples right; fragile: "
             "greedy right, < 1/2 right; band: 1/4 to 3/4 right):", "",
             "| " + " | ".join(head) + " |", "|---|---|" + "---:|" * len(HEADROOM_COLUMNS)]
    for name, g in gauges.items():
        for answer in ("final", "first"):
            if g[answer]:
                lines.append(f"| {name} | {answer} | " + " | ".join(f"{g[answer][c]:.1f}" for c in HEADROOM_COLUMNS) + " |")
    return "\n".join(lines) + "\n"
