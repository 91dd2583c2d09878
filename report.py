"""The demo's one page: a self-contained HTML report of a toy run (images inlined, no network).

    python report.py                      # runs/demo/report.html from runs/demo and runs/toy
    python report.py --seeds runs/demo-seed0,runs/demo-seed1,runs/demo-seed2   # the table across seeds
    python report.py --ablations runs/ablations/eval   # the paper's ablation table beside ours (make ablations)

What it shows, all read from files the stages wrote:
  1. the comparison table of 04_eval.py (comparison.json) with the paired differences, and its chart;
  2. the RL curves of every 03_grpo.py run found (metrics.jsonl): reward, final accuracy,
     wrong->right and right->wrong per step;
  3. real responses of the reflective model (default `srpo`) of each kind, wrong->right,
     right->wrong and right->right, with their images and every reward component (rewards.py).
"""

import base64
import dataclasses
import html
import io
import json
import math
import os
import re
from dataclasses import dataclass

from machinery import cli, dataset, policy, scoring
import rewards
import toy


def paired_difference(rows_a, rows_b):
    """Final-answer accuracy of model a minus model b on the items both answered, with a 95% interval.

    Paired: each item contributes (a right) - (b right) in {-1, 0, 1}, so the interval is that of the
    mean of those differences (normal approximation), much narrower than two independent intervals
    when the models agree on most items. Fractions, like the headline figures.
    Example: a right on 3 of 4 items, b on 1 of them -> difference 0.5.
    """
    b = {r["id"]: bool(r["correct"]) for r in rows_b}
    d = [float(bool(r["correct"])) - float(b[r["id"]]) for r in rows_a if r["id"] in b]
    if not d:
        return None
    n, mean = len(d), sum(d) / len(d)
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1)) if n > 1 else 0.0
    half = 1.96 * sd / math.sqrt(n)
    return {"difference": round(mean, 4), "ci95": [round(mean - half, 4), round(mean + half, 4)], "n": n}


@dataclass
class Args:
    """Write the demo's report.html from the outputs of 04_eval.py and 03_grpo.py."""

    demo_dir: str = "runs/demo"
    """04_eval.py's --out_dir of the comparison (the report is written here)"""
    benchmark: str = "toy-test"
    """the comparison's folder inside demo_dir (04_eval.py names it <benchmark>-<split>)"""
    runs_dir: str = "runs/toy"
    """where the 03_grpo.py runs are (every subfolder with a metrics.jsonl is plotted)"""
    model: str = "srpo"
    """the comparison's model whose responses are shown"""
    examples: int = 3
    """responses shown of each kind"""
    title: str = "SRPO on the toy task"
    """the page's title"""
    seeds: str = ""
    """instead of the page: demo_dirs of several seeds, comma-separated -> the table across them (printed,
    and written beside the first: runs/demo-seed0,... -> runs/demo-seeds.md)"""
    pairs: str = "sft-base,srpo-sft,srpo-grpo"
    """--seeds: the paired differences to show, a-b"""
    ablations: str = ""
    """instead of the page: 04_eval.py's --out_dir of `make ablations` -> the ablation table (printed, and
    written to ablations.md there)"""
    ablations_dir: str = "runs/ablations/eval"
    """the page shows this `make ablations` table too, when it has been made"""
    answers: str = ""
    """instead of the page: the folder of `make exercise` runs (runs/exercises) -> the teacher's answer key
    (printed, and written to --answers_out)"""
    answers_out: str = "docs/answers.md"
    """--answers: where the key is written"""
    dots_demo_dir: str = "runs/demo-dots"
    """--answers: 04_eval.py's --out_dir of `make demo-dots` (exercise 18 reads its comparison)"""


KINDS = (("wrong-to-right", "wrong → right: the reflection fixed the first answer", False, True),
         ("right-to-wrong", "right → wrong: the reflection broke a right first answer", True, False),
         ("right-to-right", "right → right: the reflection kept a right first answer", True, True))
CURVES = ("reward", "final_accuracy", "wrong_to_right", "right_to_wrong")
STYLE = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}img{max-width:100%}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:4px 8px;text-align:right}
th{background:#eee}td:first-child,th:first-child{text-align:left}
.example{display:flex;gap:1em;border-top:1px solid #ddd;padding:1em 0}
.example img{image-rendering:pixelated;width:168px;height:168px;border:1px solid #ccc}
pre{white-space:pre-wrap;background:#f6f6f6;padding:.5em;margin:.3em 0}.small{font-size:85%;color:#555}"""


def png_data_uri(png):
    """A PIL image, a PNG file's path or PNG bytes as a data: URI (so the page needs no other file)."""
    if isinstance(png, str):
        with open(png, "rb") as f:
            png = f.read()
    elif not isinstance(png, bytes):
        buf = io.BytesIO()
        png.save(buf, format="PNG")
        png = buf.getvalue()
    return "data:image/png;base64," + base64.b64encode(png).decode()


def curves_png(runs):
    """One figure, a panel per metric, a line per RL run. runs: {name: metric rows}. Returns the PNG's bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVES), figsize=(4 * len(CURVES), 3), squeeze=False)
    for ax, key in zip(axes[0], CURVES):
        for name, rows in runs.items():
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if pts:
                ax.plot(*zip(*pts), label=name)
        ax.set_title(key)
        ax.set_xlabel("RL step")
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def pct(x):
    return "-" if x is None else f"{100 * x:.1f}"


def comparison_table(comparison):
    head = ["model", "n", "final answer %", "first answer %", "wrong→right %", "right→wrong %", "reflection %"]
    rows = [f"<tr>{''.join(f'<th>{h}</th>' for h in head)}</tr>"]
    for name, c in comparison.items():
        cells = [html.escape(name), str(c.get("n", "")), f"<b>{pct(c['final_accuracy'])}</b>", pct(c["first_accuracy"]),
                 pct(c["wrong_to_right"]), pct(c["right_to_wrong"]), pct(c.get("reflection_rate"))]
        rows.append(f"<tr class=\"model\" data-model=\"{html.escape(name)}\">{''.join(f'<td>{x}</td>' for x in cells)}</tr>")
    out = f"<table id=\"comparison\">{''.join(rows)}</table>"
    names = list(comparison)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[:i] if comparison[a].get("paired", {}).get(b)]
    if pairs:
        rows = ["<tr><th>model</th><th>vs</th><th>difference (points)</th><th>95% interval</th></tr>"]
        for a, b in pairs:
            p = comparison[a]["paired"][b]
            rows.append(f"<tr><td>{html.escape(a)}</td><td>{html.escape(b)}</td><td>{100 * p['difference']:+.1f}</td>"
                        f"<td>[{100 * p['ci95'][0]:+.1f}, {100 * p['ci95'][1]:+.1f}]</td></tr>")
        out += ("<p>Paired differences in final accuracy, over the same test problems:</p>"
                f"<table id=\"paired\">{''.join(rows)}</table>")
    return out


def markdown_table_html(markdown, table_id):
    """A Markdown table (the first block of |-lines) as an HTML table; ** marks bold."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in markdown.splitlines()
            if line.startswith("|") and not set(line) <= set("|-: ")]
    cell = lambda tag, c: f"<{tag}>{html.escape(c).replace('**', '')}</{tag}>"  # noqa: E731
    body = [f"<tr>{''.join(cell('th', c) for c in rows[0])}</tr>"]
    body += [f"<tr>{''.join(cell('td', c) for c in r)}</tr>" for r in rows[1:]]
    return f"<table id=\"{table_id}\">{''.join(body)}</table>"


def headroom_html(comparison):
    """The gauge (04_eval.py --samples k) of every model that has one, or ''."""
    gauges = {name: c["headroom"] for name, c in comparison.items() if c.get("headroom")}
    if not gauges:
        return ""
    return ("<h2>Headroom</h2><p>What RL can gain: each test problem answered greedily and sampled k times at "
            "T = 1. Reachable: greedy wrong, at least 1/4 of the samples right; fragile: greedy right, fewer "
            "than half right; band: 1/4 to 3/4 right (% of problems).</p>"
            + markdown_table_html(scoring.headroom_markdown(gauges), "headroom"))


def example_html(row, count_tokens):
    """One response with its image, gold answer and every reward component of the paper's reward."""
    problem = toy.problem_from_id(row["id"])
    r = rewards.srpo_reward(row["response"], problem["answer"], choices=problem["choices"] or None,
                            count_tokens=count_tokens)
    parts = ", ".join(f"{k} {r[k]:.2f}" for k in ("format", "accuracy", "effectiveness", "reflection_format", "length"))
    return (f"<div class=\"example\"><img alt=\"{html.escape(row['id'])}\" src=\"{png_data_uri(problem['image'])}\">"
            f"<div><b>{html.escape(problem['question'])}</b> <span class=\"small\">(gold {html.escape(problem['answer'])}, "
            f"{html.escape(row['id'])})</span><pre>{html.escape(row['response'])}</pre>"
            f"<span class=\"small\">reward {r['total']:.2f} = {parts}</span></div></div>")


def write_report(args: Args):
    """Write demo_dir/report.html; returns its path."""
    bench_dir = os.path.join(args.demo_dir, args.benchmark)
    with open(os.path.join(bench_dir, "comparison.json")) as f:
        comparison = json.load(f)
    body = [f"<h1>{html.escape(args.title)}</h1>",
            "<p>Greedy answers to the toy test problems, the last answer scored. wrong→right and right→wrong are "
            "shares of all problems, so final = first + wrong→right − right→wrong.</p>",
            "<h2>Comparison</h2>", comparison_table(comparison)]
    chart = os.path.join(bench_dir, "comparison.png")
    if os.path.exists(chart):
        body.append(f"<img id=\"chart\" alt=\"final accuracy per family\" src=\"{png_data_uri(chart)}\">")
    body.append(headroom_html(comparison))
    if os.path.exists(os.path.join(args.ablations_dir, args.benchmark, "comparison.json")):
        table = ablations_markdown(dataclasses.replace(args, ablations=args.ablations_dir))
        body += ["<h2>The paper's ablations on the toy (<code>make ablations</code>)</h2>",
                 markdown_table_html(table, "ablations")]
    runs = {}
    if os.path.isdir(args.runs_dir):
        for name in sorted(os.listdir(args.runs_dir)):
            rows = dataset.read_jsonl(os.path.join(args.runs_dir, name, "metrics.jsonl"))
            if rows and "reward" in rows[0]:  # 03's metrics (02's have a loss, not a reward)
                runs[name] = rows
    if runs:
        body += ["<h2>RL curves</h2>", f"<img id=\"curves\" alt=\"RL curves\" src=\"{png_data_uri(curves_png(runs))}\">",
                 f"<p class=\"small\">runs: {', '.join(html.escape(n) for n in runs)} (each step: every sampled response "
                 "of the step's prompts, at temperature 1)</p>"]
    model_dir = os.path.join(bench_dir, comparison[args.model]["folder"]) if args.model in comparison else ""
    items = [r for r in dataset.read_jsonl(os.path.join(model_dir, "items.jsonl")) if not r.get("error")] if model_dir else []
    if items:
        count_tokens = None
        with open(os.path.join(model_dir, "run.json")) as f:
            model_path = json.load(f)["model"]
        if policy.is_toy_dir(model_path):  # the policy's own token counts, as in training
            tok = policy.load_processor(model_path).tokenizer
            count_tokens = lambda s: len(tok(s, add_special_tokens=False).input_ids)  # noqa: E731
        body.append(f"<h2>What {html.escape(args.model)} writes</h2>")
        body.append(DRIFT_NOTE)
        for anchor, title, first, final in KINDS:
            chosen = [r for r in items if bool(r["first_correct"]) == first and bool(r["correct"]) == final]
            body.append(f"<h3 id=\"{anchor}\">{html.escape(title)} ({len(chosen)} of {len(items)})</h3>")
            body += [example_html(r, count_tokens) for r in chosen[:args.examples]] or ["<p>none</p>"]
    page = (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{html.escape(args.title)}</title>"
            f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>")
    path = os.path.join(args.demo_dir, "report.html")
    with open(path, "w") as f:
        f.write(page)
    print(f"report: {path}")
    return path


# Shown above the responses: what a reader otherwise takes for a bug.
DRIFT_NOTE = ("<p class=\"small\">Read the reflection's words with the reward in mind: no reward term reads them. "
              "The reward pays for the answers (R_accuracy, I_eff), the layout (R_format, I_ref) and the length "
              "(f_len), so the verdict (\"The first answer is wrong.\") and the colour the check names are what "
              "SFT left them: the verdict its data's majority, said whether the first answer was right or not "
              "(the model never learned to compare), the colour whatever it writes most. The numbers are "
              "checked, the words are not (EXERCISES.md, exercise 14).</p>")


# The paper's 7B ablation (average over MathVista, MathVerse, MathVision, MMMU-Pro and Physics) and ours:
# (model name in `make ablations`, what it is, the paper's average or None)
ABLATIONS = (
    ("srpo", "SRPO: reflection SFT, then RL with the paper's reward", 53.5),
    ("no_sft", "without reflection SFT (SRPO's RL from the base model)", 51.2),
    ("sft", "without reflection RL (reflection SFT alone)", 46.6),
    ("no_flen", "without f_len (alpha x f_len dropped)", 53.1),
    ("no_ieff", "without I_eff", 52.0),
    ("grpo", "plain-CoT SFT + plain GRPO (the demo's `grpo`)", 51.4),
    ("base_grpo", "plain GRPO from the base model", 49.8),
    ("base", "the base model", None),
    ("no_iref", "without I_ref (ours)", None),
    ("no_acc", "without R_accuracy (ours)", None),
    ("released", "the authors' released reward (ours)", None),
    ("sft_grpo", "reflection SFT + RL on the final answer alone (ours)", None),
    ("scratchpad", "the check as the first attempt, no reflection, + plain GRPO (ours)", None),
)


def difference_cell(p):
    """A paired difference (paired_difference) in points with its 95% interval, or '-'."""
    return "-" if p is None else f"{100 * p['difference']:+.1f} [{100 * p['ci95'][0]:+.1f}, {100 * p['ci95'][1]:+.1f}]"


def ablations_markdown(args: Args):
    """The paper's ablation rows beside ours: final accuracy, the paired difference to SRPO, and what each
    switch changes besides accuracy (first answer, wrong->right, right->wrong, reflections, length)."""
    bench = os.path.join(args.ablations, args.benchmark)
    with open(os.path.join(bench, "comparison.json")) as f:
        comparison = json.load(f)
    items = {m: dataset.read_jsonl(os.path.join(bench, c["folder"], "items.jsonl")) for m, c in comparison.items()}
    head = ["row", "paper (7B avg)", "toy final %", "− SRPO (95% interval)", "first %", "w→r %", "r→w %",
            "reflection %", "response tokens"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for name, what, paper in ABLATIONS:
        if name not in comparison:
            continue
        c, p = comparison[name], paired_difference(items[name], items["srpo"]) if "srpo" in items else None
        diff = "" if name == "srpo" or p is None else difference_cell(p)
        cells = [what, "-" if paper is None else f"{paper}", f"**{pct(c['final_accuracy'])}**", diff,
                 pct(c["first_accuracy"]), pct(c["wrong_to_right"]), pct(c["right_to_wrong"]),
                 pct(c["reflection_rate"]), f"{c['reflection']['mean_response_tokens']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def ablations_table(args: Args):
    """ablations_markdown, printed and written to ablations.md in --ablations. Returns the Markdown."""
    markdown = ablations_markdown(args)
    with open(os.path.join(args.ablations, "ablations.md"), "w") as f:
        f.write(markdown)
    print(markdown + f"\n-> {os.path.join(args.ablations, 'ablations.md')}")
    return markdown


def seeds_table(args: Args):
    """Final accuracy of every model on each seed's test set, the paired differences with 95% intervals
    per seed, and pooled over all seeds' problems (each seed draws different ones). Returns the Markdown."""
    dirs = [d for d in args.seeds.split(",") if d]
    comparisons, items = [], []
    for d in dirs:
        bench = os.path.join(d, args.benchmark)
        with open(os.path.join(bench, "comparison.json")) as f:
            comparisons.append(json.load(f))
        items.append({m: dataset.read_jsonl(os.path.join(bench, c["folder"], "items.jsonl"))
                      for m, c in comparisons[-1].items()})
    models = list(comparisons[0])
    pairs = [tuple(p.split("-", 1)) for p in args.pairs.split(",") if p]
    pairs = [(a, b) for a, b in pairs if a in models and b in models]
    head = ["seed", "n", *[f"{m} %" for m in models], "srpo w→r / r→w %" if "srpo" in models else None,
            *[f"{a} − {b} (95% interval)" for a, b in pairs]]
    head = [h for h in head if h]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]

    for comp, rows in zip(comparisons, items):
        seed = comp[models[0]]["args"]["seed"]
        cells = [str(seed), str(comp[models[0]]["n"]), *[pct(comp[m]["final_accuracy"]) for m in models]]
        if "srpo" in models:
            cells.append(f"{pct(comp['srpo']['wrong_to_right'])} / {pct(comp['srpo']['right_to_wrong'])}")
        cells += [difference_cell(paired_difference(rows[a], rows[b])) for a, b in pairs]
        lines.append("| " + " | ".join(cells) + " |")
    pooled = {m: [r for rows in items for r in rows[m]] for m in models}
    n = len(pooled[models[0]])
    cells = ["all", str(n), *[pct(sum(bool(r["correct"]) for r in pooled[m]) / max(1, len(pooled[m]))) for m in models]]
    if "srpo" in models:
        s = pooled["srpo"]
        w2r = sum(not r["first_correct"] and r["correct"] for r in s) / max(1, len(s))
        r2w = sum(r["first_correct"] and not r["correct"] for r in s) / max(1, len(s))
        cells.append(f"{pct(w2r)} / {pct(r2w)}")
    cells += [difference_cell(paired_difference(pooled[a], pooled[b])) for a, b in pairs]
    lines.append("| " + " | ".join(cells) + " |")
    gauged = [m for m in models if all(comp[m].get("headroom") for comp in comparisons)]
    if gauged:  # 04 --samples k: the headroom of each model on each seed (final answer)
        k = comparisons[0][gauged[0]]["headroom"]["k"]
        lines += ["", f"Headroom of the final answer (k = {k} samples at T = 1; % of test problems):", "",
                  "| seed | model | greedy | pass@1 | reachable | fragile | band |", "|---|---|---:|---:|---:|---:|---:|"]
        for comp in comparisons:
            for m in gauged:
                h = comp[m]["headroom"]["final"]
                lines.append(f"| {comp[models[0]]['args']['seed']} | {m} | {h['greedy']:.1f} | {h['pass@1']:.1f} | "
                             f"{h['reachable']:.1f} | {h['fragile']:.1f} | {h['band']:.1f} |")
    markdown = "\n".join(lines) + "\n"
    first = os.path.normpath(dirs[0])  # runs/demo-seed0 -> runs/demo-seeds.md
    path = os.path.join(os.path.dirname(first) or ".", re.sub(r"-?seed\d*$", "", os.path.basename(first)) + "-seeds.md")
    with open(path, "w") as f:
        f.write(markdown)
    print(markdown + f"\n-> {path}")
    return markdown


# The answer key (`make answers`): what each exercise's run measured, beside its reference, and what students
# should notice. Per exercise: (its question in a few words, training-log keys to average over the last ten
# steps of both runs, what to notice: a sentence formatted with the run's figures, see exercise_figures).
EXERCISES = {
    1: ("70% right first answers in the reflection set", (),
        "The share of rows that reflect (exercise 2) sets how often SFT reflects; the verdicts in the data decide what "
        "its reflection concludes. The reference SFT says \"right\" on {ref[said_right]:.0f}% of its verdicts, this "
        "one on {ex[said_right]:.0f}%: the majority verdict of its data, whether the first answer was right "
        "({ex[right_if_right]:.0f}%) or wrong ({ex[right_if_wrong]:.0f}%), since it has not learned to compare."),
    2: ("the paper's set, no direct rows", (),
        "Every row of the paper's set reflects: SFT reflects on {ex[reflects]:.0f}% of answers (the recipe's: "
        "{ref[reflects]:.0f}%) and scores as the interval says; RL adds less from it (RESULTS.md, the recipe), "
        "its samples all reflecting and leaving little to choose between."),
    3: ("the teacher's check without the re-read", (),
        "The re-read (\"blue: 5.\") opens the check the base model was trained on (its gate G3). An early recipe "
        "without it fell to 15%, its checks copying wrong numbers from the first attempt (docs/notebook.md); read "
        "the interval for today's recipe (w→r {ref[w2r]:.1f} → {ex[w2r]:.1f}). Where it no longer matters, the "
        "cause is not isolated: the direct rows, the larger pool and the rebuilt base all changed since."),
    4: ("reflection SFT for 1 epoch", (),
        "The budget sets how sharply SFT fits the set's habit (half the rows reflect): the reflection rate "
        "{ref[reflects]:.0f}% → {ex[reflects]:.0f}%; read loss.png of both runs."),
    5: ("the first attempt masked out of the SFT loss", (),
        "Masked out of the loss, the first attempt is never trained, yet the model writes it at test time as "
        "before: it was the policy's own output, so imitating it taught little (first answers {ref[first]:.1f}% "
        "→ {ex[first]:.1f}%). What the mask must not hide is the line break after it, where the model decides "
        "to reflect (reflects {ref[reflects]:.0f}% → {ex[reflects]:.0f}%; docs/notebook.md)."),
    6: ("no length reward (alpha 0)", ("f_len", "response_tokens"),
        "f_len over the reference's last ten steps is {log_ref[f_len]:.2g}, so alpha x f_len is about "
        "{log_ref[length]:.1g} against rewards of 0-1.6: dropping it removes no signal, and any difference is noise."),
    7: ("no I_eff", ("wrong_to_right", "right_to_wrong"),
        "Without I_eff no term looks at the answer after the reflection (R_accuracy grades the first), so nothing "
        "stops a reflection from breaking a right answer: r→w {ref[r2w]:.1f} → {ex[r2w]:.1f}."),
    8: ("the authors' released reward", ("reward", "format", "zero_spread_groups"),
        "The released reward pays 0 without a second <think>, which our SFT model does not write: groups of "
        "all-equal rewards carry no signal (zero_spread_groups above), and the model reflects on "
        "{ex[reflects]:.0f}% of answers against {ref[reflects]:.0f}%."),
    9: ("a k3 KL, beta 0.1", ("kl", "final_accuracy"),
        "beta x KL pulls the policy back towards the SFT model it started from; the reference's kl reads 0 "
        "because at beta 0 it is not computed. Read the interval for what the leash cost at this beta."),
    10: ("G = 2 at 256 samples a step", ("zero_spread_groups", "groups_kept"),
         "Two rewards a group have zero spread whenever both samples earn the same, so fewer groups carry a "
         "signal at the same 256 samples a step (zero_spread_groups and groups_kept above)."),
    11: ("no accuracy filter", ("groups_kept", "step_s"),
         "The filter drops the groups whose answers are (nearly) all right or all wrong (groups_kept above); "
         "without it they train on the spread of the other terms alone, at the cost in step_s."),
    12: ("4 optimizer steps a rollout", ("clip_frac", "ratio_max", "approx_kl"),
         "The first optimizer step of a rollout sees ratio 1 (pi_theta = pi_old, so the reference's clip_frac is "
         "0); from the second on the policy has moved, and the clip stops the share of tokens in clip_frac."),
    13: ("sequence-mean loss aggregation", ("response_tokens", "loss"),
         "A group's responses here share one layout and about {ref[tokens]:.0f} tokens, so weighing tokens or "
         "responses equally moves the gradient little; it matters when long wrong answers hold most tokens."),
    14: ("an honest-verdict term (--verdict_reward 0.25)", ("verdict_honest", "first_correct"),
         "No paper term reads the verdict: SRPO says \"wrong\" on {ref[said_wrong]:.0f}% of its verdicts, right "
         "first answer or not, as its SFT model did (exercise 1's reference): neither learned to compare the "
         "check with the first answer. Paid 0.25 for an honest verdict, RL says \"right\" on {ex[right_if_right]:.0f}% of right first "
         "answers, and the first answer goes {ref[first]:.1f}% → {ex[first]:.1f}%. Where honesty rises with "
         "fewer right first answers, RL took the cheaper path rewards.py describes (a wrong first answer "
         "fixed under an honest \"wrong\" ties a right one under a false one): a reward hack, not honesty."),
}
BASE_GATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "toy", "base_model", "eval.json")


def last_means(metrics_path, keys, last=10):
    """{key: mean over the last `last` rows (all rows: last=0)} of a training log ({} where it is missing)."""
    if not os.path.exists(metrics_path):
        return {}
    rows = dataset.read_jsonl(metrics_path)[-last:]  # [-0:] is every row
    return {k: sum(r[k] for r in rows) / len(rows) for k in keys if rows and all(k in r for r in rows)}


def verdict_figures(rows):
    """What the reflections' verdicts ("The first answer is right/wrong.") say, in %: said_right and said_wrong
    of all verdicts; right_if_right / right_if_wrong: the share saying "right" over right / wrong first answers.
    An honest verdict has right_if_right near 100 and right_if_wrong near 0; a constant one has them equal."""
    said = [(v, first) for v, first in ((rewards.said_verdict(r["response"]), r["first_correct"]) for r in rows) if v]
    share = lambda xs: 100 * sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    return {"said_right": share([v == "right" for v, _ in said]), "said_wrong": share([v == "wrong" for v, _ in said]),
            "right_if_right": share([v == "right" for v, first in said if first]),
            "right_if_wrong": share([v == "right" for v, first in said if not first])}


def read_json(path):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def reading(p, n):
    """What a paired difference (paired_difference) says, in words."""
    if p is None:
        return "no problems in common"
    lo, hi = p["ci95"]
    return (f"{difference_cell(p)} points on {n:,} problems: "
            + ("the interval holds 0, so no difference is measurable at this size." if lo <= 0 <= hi else
               f"the interval excludes 0, a real {'gain' if lo > 0 else 'loss'}."))


def exercise_figures(comp, name, rows):
    """The figures of one model of an exercise's comparison that the key's table and notices use."""
    c, rf = comp[name], comp[name]["reflection"]
    return {"final": 100 * c["final_accuracy"], "first": rf["first_acc"], "reflects": rf["reflection_rate"],
            "w2r": rf["wrong_to_right"], "r2w": rf["right_to_wrong"], "tokens": rf["mean_response_tokens"],
            **verdict_figures(rows)}


def exercise_section(n, what, keys, notice, folder):
    """The key's lines for one exercise that trains a model (1-14), or "not run"."""
    comp = read_json(os.path.join(folder, "eval", "toy-test", "comparison.json"))
    if comp is None:
        return [f"## {n}. {what}", "", "not run", ""]
    ref = comp["reference"]
    rows = {m: dataset.read_jsonl(os.path.join(folder, "eval", "toy-test", comp[m]["folder"], "items.jsonl"))
            for m in ("reference", f"ex{n}")}
    figs = {"ref": exercise_figures(comp, "reference", rows["reference"]),
            "ex": exercise_figures(comp, f"ex{n}", rows[f"ex{n}"])}
    seconds, commit = (open(p).read().strip() if os.path.exists(p) else "?"
                       for p in (os.path.join(folder, "seconds.txt"), os.path.join(folder, "commit")))
    lines = [f"## {n}. {what}", "", f"`make exercise N={n}`: {seconds} s on this machine, at commit {commit}.", "",
             "| model | final % | first % | reflects % | w→r / r→w % | tokens | says \"right\" % if first right / wrong |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for label, f in (("reference", figs["ref"]), (f"exercise {n}", figs["ex"])):
        lines.append(f"| {label} | {f['final']:.1f} | {f['first']:.1f} | {f['reflects']:.1f} | {f['w2r']:.1f} / "
                     f"{f['r2w']:.1f} | {f['tokens']:.0f} | {f['right_if_right']:.0f} / {f['right_if_wrong']:.0f} |")
    lines += ["", "Exercise − reference: " + reading(paired_difference(rows[f"ex{n}"], rows["reference"]),
                                                      comp[f"ex{n}"]["n"])]
    log = "updates.jsonl" if n == 12 else "metrics.jsonl"
    figs["log_ex"] = last_means(os.path.join(folder, "model", log), keys)
    figs["log_ref"] = last_means(os.path.join(ref["model"], "metrics.jsonl"), (*keys, "length"))
    if keys:
        show = lambda log, k: f"{log[k]:.4g}" if k in log else "not logged"  # noqa: E731
        cells = [f"{k} {show(figs['log_ref'], k)} → {show(figs['log_ex'], k)}" for k in keys]
        lines.append(f"Training log, mean of the last ten {'optimizer steps' if n == 12 else 'steps'} "
                     f"(reference → exercise): " + "; ".join(cells) + ".")
    try:
        lines += ["", "*Notice*: " + notice.format(**figs)]
    except KeyError as missing:  # a log without the key (e.g. a reference run made before it was logged)
        lines += ["", f"*Notice*: (needs {missing} in the training logs: rerun `make demo`)"]
    return lines + [""]


def answers_markdown(args: Args):
    """The teacher's key: for every exercise, the figures of its run against its reference on the same test
    problems (1-14), the gauge (15) and the figures the reading exercises point to (0, 16-18), each with what
    to notice. Returns the Markdown."""
    import importlib
    import subprocess

    import torch

    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "?"
    except OSError:  # no git
        commit = "?"
    lines = ["# Answer key (written by `make answers`; do not edit)", "",
             f"Written at commit {commit}. Each exercise of EXERCISES.md as `make exercise N=<n>` ran it on the",
             "current defaults, beside its reference from `make demo` (stage 1: the reflection SFT; stage 2: SRPO),",
             "greedy on the same 500 test problems; intervals are paired 95% intervals of the difference in points,",
             "about 1.4 times as wide as on the demo's 1,000. Each exercise names the commit it ran at: rerun",
             "`make answers` when a default changes, `make exercise N=<n>` when code that exercise runs does."]
    took = os.path.join(args.answers, "answers_seconds.txt")
    if os.path.exists(took):
        lines.append(f"`make answers` took {int(open(took).read()) / 60:.0f} min here, besides `make demo`.")
    lines.append("")
    r = torch.tensor([1.0, 0.0, 0.0, 1.0])
    advantages = importlib.import_module("03_grpo").group_advantages(r[None])[0]  # the project's Eq. 3
    lines += ["## 0. Find the equations", "",
              f"Rewards [1, 0, 0, 1]: advantages ±{advantages.abs()[0]:.3f} with torch's std "
              f"(n − 1: {r.std():.3f}), ±{((r - r.mean()) / r.std(unbiased=False)).abs()[0]:.3f} with the population "
              "std (n). All-equal rewards: 0 (spread 0; the eps keeps it finite), and the accuracy filter drops "
              "such groups before the loss. Eq. 3 writes std without saying which; the factor is the same for "
              "every group of size G, so with Adam it barely changes the update.", ""]
    for n, (what, keys, notice) in EXERCISES.items():
        lines += exercise_section(n, what, keys, notice, os.path.join(args.answers, f"ex{n}"))
    demo = read_json(os.path.join(args.demo_dir, args.benchmark, "comparison.json")) or {}
    gauge = read_json(os.path.join(args.answers, "ex15", "toy-test", "sft", "summary.json"))
    lines += ["## 15. The headroom gauge of reflection SFT", ""]
    if gauge and "sft" in demo:
        h = gauge["headroom"]["final"]
        lines += [f"Greedy {h['greedy']:.1f}%, pass@1 {h['pass@1']:.1f}%, reachable {h['reachable']:.1f}%, "
                  f"fragile {h['fragile']:.1f}% of {gauge['n']} problems. SRPO − SFT in the demo: "
                  + reading(demo["srpo"]["paired"]["sft"], demo["srpo"]["n"]), "",
                  "*Notice*: RL flips mostly reachable problems (greedy wrong, some samples right) and may break "
                  "fragile ones, so reachable is the prediction's scale; RESULTS.md shows the reachable share "
                  "falling to about 3% after SRPO: RL spent it.", ""]
    else:
        lines += ["not run", ""]
    lines += ["## 16. Reflection against plain GRPO", ""]
    runs = {r: last_means(os.path.join(args.runs_dir, r, "metrics.jsonl"), ("step_s", "response_tokens"), last=0)
            for r in ("srpo", "grpo")}
    if "grpo" in demo and all(len(m) == 2 for m in runs.values()):
        lines += [f"SRPO {pct(demo['srpo']['final_accuracy'])}%, grpo {pct(demo['grpo']['final_accuracy'])}%; "
                  "SRPO − grpo: " + reading(demo["srpo"]["paired"]["grpo"], demo["srpo"]["n"]),
                  f"Per RL step, mean over the run: SRPO {runs['srpo']['step_s']:.1f} s and "
                  f"{runs['srpo']['response_tokens']:.0f} tokens a response, grpo {runs['grpo']['step_s']:.1f} "
                  f"s and {runs['grpo']['response_tokens']:.0f} tokens.", "",
                  "*Notice*: the reflective response is longer (a first attempt, the check, a second answer), so "
                  "each step costs more time, as the paper's 31.2 h against 25.8 h at 7B.", ""]
    else:
        lines += ["not run", ""]
    lines += ["## 17. Does the dots model know when it is wrong?", ""]
    probes = {m: read_json(os.path.join(args.answers, "ex17", f"{m}.json")) for m in ("base", "sft")}
    if all(p and p.get("auc_within_family_ci95") for p in probes.values()):
        for m, pr in probes.items():
            lo, hi = pr["auc_within_family_ci95"]
            lines.append(f"- {m}: AUC within families {pr['auc_within_family']:.2f} [{lo:.2f}, {hi:.2f}] "
                         f"(pooled {pr['auc_pooled']:.2f}); the best re-read threshold per family, chosen on the "
                         f"test problems, takes {100 * pr['first_accuracy_from_reads']:.1f}% to "
                         f"{100 * pr['reread_bound']:.1f}%.")
        lines += ["", "*Notice*: 0.5 is no signal, 1 a perfect split: the confidence separates right reads from "
                      "wrong ones only weakly. Even the re-read at each family's best threshold, chosen on the test "
                      "problems themselves (a bound no model can reach), gains only the points above, while the "
                      "reflection SFT the model learned loses points against its base (exercise 18).", ""]
    else:
        lines += ["not run", ""]
    lines += ["## 18. When can a second look beat the first?", ""]
    dots = read_json(os.path.join(args.dots_demo_dir, "toy-dots-test", "comparison.json"))
    gate = (read_json(BASE_GATE) or {}).get("gate")
    if dots and "sft" in demo and gate:
        for task, comp in (("two-step (toy)", demo), ("dots (toy-dots)", dots)):
            rf = comp["sft"]["reflection"]
            lines.append(f"- {task}: reflection SFT − base " + reading(comp["sft"]["paired"]["base"], comp["sft"]["n"])
                         + f" Its reflection: w→r {rf['wrong_to_right']:.1f}%, r→w {rf['right_to_wrong']:.1f}%.")
        lines += [f"- The two-step base's gate: first attempts right {100 * gate['G1_first']:.1f}%, the check asked "
                  f"as its own task {100 * gate['G3_check']:.1f}%.", "",
                  "*Notice*: a reflection pays where checking is easier than answering (G3 above G1); on the dots "
                  "task the second look is the same glance as the first.", ""]
    else:
        lines += ["not run (needs `make demo-dots`)", ""]
    markdown = "\n".join(lines)
    with open(args.answers_out, "w") as f:
        f.write(markdown)
    print(markdown + f"\n-> {args.answers_out}")
    return markdown


if __name__ == "__main__":
    parsed = cli.parse_args(Args)
    if parsed.answers:
        answers_markdown(parsed)
    else:
        seeds_table(parsed) if parsed.seeds else ablations_table(parsed) if parsed.ablations else write_report(parsed)
