"""Probe (toy only, not a stage of the paper): does the model know when it has misread the image?

A reflection can only fix a wrong answer without breaking right ones if something tells the model
which of its answers are wrong. On the toy most errors are misreads ("blue: 2." when there are 3),
so this asks the simplest version of that question. The model answers the toy test problems
greedily; for each value it read in its first <think> (the " 3" of "blue: 3.") the probe takes the
probability the model gave that value and its second choice, and reports:

1. per problem family, how well that probability separates right from wrong reads (ROC AUC:
   0.5 = no signal, 1 = perfect). The within-family figure is the one that matters: the family
   alone (bars are easy, busy dot charts are hard) is a signal a reflection could learn blindly.
2. the best a reflection could do with that signal alone: "re-read every value below a confidence
   threshold as the model's second choice", swept over thresholds, and at the best threshold of
   each family chosen on the test problems themselves (an optimistic bound). Answers are recomputed
   from the values read, so an answer the model wrote against its own reading (right or wrong by
   luck) counts as what its reading implies.

    python probe/probe_confidence.py                                   # the dots task's base model, plain prompt
    python probe/probe_confidence.py --model runs/toy-dots/sft --prompt reflect

It asks the model the test problems of its own toy task (the dots task for the models of
`make demo-dots`; on the two-step task, where n is read right almost always, there is little to probe).

Writes `--out` (JSON) and prints two tables.
"""

import json
import math
import os
import re
import sys
from collections import defaultdict
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
from machinery import cli, dataset, policy, rollout  # noqa: E402
import toy

READ_RE = re.compile(r"\b(red|green|blue): (\d+)\.")


@dataclass
class Args:
    """Does the model's confidence in a value it reads off the image predict whether the value is right?"""

    model: str = "runs/toy-dots/base"
    """model directory (a toy model; `make demo-dots` builds the dots task's)"""
    prompt: str = "plain"
    """system prompt: plain (base, plain-CoT models) or reflect (reflection SFT, SRPO)"""
    n: int = 300
    """toy test problems"""
    batch_size: int = 50
    """problems per forward pass"""
    max_new_tokens: int = 128
    """response length limit"""
    out: str = ""
    """JSON output (default: runs/probe/<model dir name>.json)"""


def auc(scores_right, scores_wrong):
    """ROC AUC: the chance that a random right read scored higher than a random wrong one (ties 1/2)."""
    if not scores_right or not scores_wrong:
        return None
    wins = sum((r > w) + 0.5 * (r == w) for r in scores_right for w in scores_wrong)
    return wins / (len(scores_right) * len(scores_wrong))


def auc_se(a, n_right, n_wrong):
    """Standard error of a ROC AUC `a` from n_right and n_wrong scores (Hanley & McNeil, 1982). It takes the
    reads as independent; two reads of one problem are not quite, so the interval it gives is a little narrow
    (and is not clipped to [0, 1])."""
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    return math.sqrt(max(a * (1 - a) + (n_right - 1) * (q1 - a * a) + (n_wrong - 1) * (q2 - a * a), 0.0)
                     / (n_right * n_wrong))


THRESHOLDS = [round(0.1 * i, 1) for i in range(10)]


def read_probabilities(model, processor, problems, responses, system_prompt):
    """For each response, the values read in its first <think>, in order: dicts with `colour`, `value`,
    `p` (the probability the model gave that value token), `second` (its likeliest other value 0-9),
    `p_second` and `token` (the value's index among the response's tokens).

    Only values written as one digit token count (the toy's are 0-4); a response with no </think>
    has no first <think> to probe and gives no reads.
    """
    tok = processor.tokenizer
    digit_ids = {}
    for d in range(10):
        ids = tok.encode(f" {d}", add_special_tokens=False)
        if len(ids) == 1:
            digit_ids[d] = ids[0]
    batch = dataset.encode_sft(processor, [p["question"] for p in problems], [p["image"] for p in problems],
                              responses, system_prompt)
    labels = batch.pop("labels")
    with torch.no_grad():
        probs = model(**batch).logits.float().softmax(-1)
    out = []
    for i, response in enumerate(responses):
        row = []
        out.append(row)
        if "</think>" not in response:
            continue
        # The response's own tokens with their character spans; in the batch they are the target
        # tokens (position k predicts token k + 1), followed by the end-of-turn token.
        enc = tok(response, add_special_tokens=False, return_offsets_mapping=True)
        targets = [(k, t) for k, t in enumerate(labels[i, 1:].tolist()) if t != -100]
        if [t for _, t in targets[:len(enc["input_ids"])]] != enc["input_ids"]:
            continue  # tokenised differently in context: no safe way to find the values
        for m in READ_RE.finditer(response[:response.index("</think>")]):
            start, value = m.start(2), int(m.group(2))
            j = next((j for j, (a, b) in enumerate(enc["offset_mapping"]) if a <= start < b), None)
            if j is None or enc["input_ids"][j] != digit_ids.get(value):
                continue  # a value of several tokens (e.g. " 1" "2"): no single probability
            k = targets[j][0]
            p = {d: probs[i, k, t].item() for d, t in digit_ids.items()}
            second = max((d for d in p if d != value), key=p.get)
            row.append({"colour": m.group(1), "value": value, "p": p[value], "second": second,
                        "p_second": p[second], "token": j})
    return out


def answer_from(problem, values):
    """The toy answer (letter or number) that the values read for `problem` lead to; None if one is missing."""
    colours = [c for c, _ in json.loads(problem["solution"])["reads"]]
    if any(c not in values for c in colours):
        return None
    return toy.answer_from_reads(problem, [(c, values[c]) for c in colours])


def reread(problem, reads, threshold):
    """Right/wrong of the answer after replacing every value read with p < threshold by the second choice."""
    values = {r["colour"]: r["second"] if r["p"] < threshold else r["value"] for r in reads}
    return answer_from(problem, values) == problem["answer"]


def main(args: Args):
    if args.n < 1 or args.prompt not in dataset.SYSTEM_PROMPTS:
        raise ValueError(f"--n must be at least 1 (got {args.n}) and --prompt one of "
                         f"{sorted(dataset.SYSTEM_PROMPTS)} (got {args.prompt!r})")
    model, processor = policy.load_policy(args.model)
    model.eval()
    test = toy.toy_dataset("test", args.n, task=processor.task)
    system_prompt = dataset.SYSTEM_PROMPTS[args.prompt]
    responses = rollout.generate_responses(model, processor, test["question"], test["image"],
                                          system_prompt=system_prompt, max_new_tokens=args.max_new_tokens,
                                          batch_size=args.batch_size, desc="answer")
    problems, all_reads = [], []
    for i in range(0, args.n, args.batch_size):
        chunk = [test[j] for j in range(i, min(i + args.batch_size, args.n))]
        problems += chunk
        all_reads += read_probabilities(model, processor, chunk, responses[i:i + len(chunk)], system_prompt)

    # 1. Confidence of right vs wrong reads.
    by_family = defaultdict(lambda: {"right": [], "wrong": []})
    for p, reads in zip(problems, all_reads):
        truth = dict(json.loads(p["solution"])["reads"])
        for r in reads:
            if r["colour"] in truth:  # a colour the question is not about is neither right nor wrong
                by_family[p["family"]]["right" if truth[r["colour"]] == r["value"] else "wrong"].append(r["p"])
    rows = {}
    for fam, s in sorted(by_family.items()):
        n = len(s["right"]) + len(s["wrong"])
        rows[fam] = {"reads": n, "read_right": len(s["right"]) / n,
                     "mean_prob_right": sum(s["right"]) / len(s["right"]) if s["right"] else None,
                     "mean_prob_wrong": sum(s["wrong"]) / len(s["wrong"]) if s["wrong"] else None,
                     "auc": auc(s["right"], s["wrong"])}
        if rows[fam]["auc"] is not None:
            rows[fam]["auc_se"] = auc_se(rows[fam]["auc"], len(s["right"]), len(s["wrong"]))
    pooled = auc([p for s in by_family.values() for p in s["right"]], [p for s in by_family.values() for p in s["wrong"]])
    scored = {f: r for f, r in rows.items() if r["auc"] is not None}
    total_reads = sum(r["reads"] for r in scored.values())
    weights = {f: r["reads"] / total_reads for f, r in scored.items()}
    within = sum(weights[f] * r["auc"] for f, r in scored.items()) if scored else None
    half = 1.96 * math.sqrt(sum((weights[f] * r["auc_se"]) ** 2 for f, r in scored.items())) if scored else None
    within_ci = [within - half, within + half] if scored else None  # families independent

    # 2. The best a confidence-driven re-read could do. Threshold 0 changes nothing (the first answer,
    # recomputed from the values read, so a written slip in the arithmetic does not count).
    n = len(problems)
    after = {t: [reread(p, r, t) for p, r in zip(problems, all_reads)] for t in THRESHOLDS}
    first = after[0.0]
    sweep = [{"threshold": t, "accuracy": sum(a) / n,
              "wrong_to_right": sum(x and not f for x, f in zip(a, first)) / n,
              "right_to_wrong": sum(f and not x for x, f in zip(a, first)) / n} for t, a in after.items()]
    best_per_family, bound_right = {}, 0
    for fam in sorted({p["family"] for p in problems}):
        idx = [i for i, p in enumerate(problems) if p["family"] == fam]
        right = {t: sum(a[i] for i in idx) for t, a in after.items()}
        t_best = max(THRESHOLDS, key=lambda t: (right[t], -t))
        best_per_family[fam] = {"threshold": t_best, "first": right[0.0] / len(idx), "after": right[t_best] / len(idx)}
        bound_right += right[t_best]
    bound = bound_right / n

    result = {"model": args.model, "prompt": args.prompt, "n": n, "per_family": rows,
              "auc_pooled": pooled, "auc_within_family": within, "auc_within_family_ci95": within_ci,
              "first_accuracy_from_reads": sum(first) / n, "reread_sweep": sweep,
              "reread_best_per_family": best_per_family, "reread_bound": bound}
    out = args.out or os.path.join("runs", "probe", os.path.basename(os.path.normpath(args.model)) + ".json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)

    fmt = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
    print(f"\n{args.model}: how sure is the model of the values it reads, right vs wrong?\n")
    print("| family | reads | read right % | mean p (right reads) | mean p (wrong reads) | AUC |")
    print("|---|---:|---:|---:|---:|---:|")
    for fam, r in rows.items():
        print(f"| {fam} | {r['reads']} | {100 * r['read_right']:.1f} | {fmt(r['mean_prob_right'])} | "
              f"{fmt(r['mean_prob_wrong'])} | {fmt(r['auc'])} |")
    print(f"\nAUC pooled over families {fmt(pooled)}, within families (weighted by reads) {fmt(within)} "
          f"[{fmt(within_ci and within_ci[0])}, {fmt(within_ci and within_ci[1])}] (95%, Hanley-McNeil); "
          "0.5 = no signal.")
    print("\nRe-reading every value below a threshold as the model's second choice:\n")
    print("| threshold | accuracy % | wrong→right % | right→wrong % |")
    print("|---:|---:|---:|---:|")
    for r in sweep:
        print(f"| {r['threshold']:.1f} | {100 * r['accuracy']:.1f} | {100 * r['wrong_to_right']:.1f} | "
              f"{100 * r['right_to_wrong']:.1f} |")
    print(f"\nBest threshold per family, chosen on these problems: {100 * bound:.1f}% "
          f"(first answers recomputed from the values read: {100 * sum(first) / n:.1f}%; "
          + ", ".join(f"{f} {100 * r['first']:.0f}->{100 * r['after']:.0f}% at {r['threshold']}"
                      for f, r in best_per_family.items()) + f"). -> {out}")
    return result


if __name__ == "__main__":
    cli.run(main, Args)
