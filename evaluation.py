"""Scoring answers the way the paper's evaluation does, and the quick check of a toy model.

`score` reads the answers a response gives (the final one decides; the first one shows what the
reflection did) and hands them to the benchmark's own rules (benchmarks.SCORERS); `make_row` is one
answered item as 04_eval.py writes it; `summarize` turns rows into accuracy per category and the
reflection metrics. `check_toy` does all three for a model in memory on toy test problems: 00 prints
it for the base model, 02 before and after SFT, with the same rules as 04.
"""

from collections import defaultdict

import benchmarks
import dataset
import grading
import rollout


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
