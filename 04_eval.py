"""Evaluation (after stage 2): score policies on the paper's benchmarks (arXiv 2506.01713, Sec. 4).

The paper reports MathVista testmini, MathVerse testmini, MathVision test and MMMU-Pro, answered
greedily with up to 4096 new tokens; the toy tasks stand in for them here. Each item is answered
once. A reflective response reads

    <think>..</think> <answer>A1</answer> <reflection>..</reflection> <think>..</think> <answer>A2</answer>

and we score the LAST answer A2 (the authors' scripts scored A1, the pre-reflection one). A1 is
scored too, so we can see what the reflection did: wrong->right, right->wrong, and at what length.

`scoring.score(benchmark, item, response)` picks the answer texts (machinery/grading.py) and hands them to the
benchmark's own rules (machinery/benchmarks.py: the items and a port of each official scorer). With
--judge_base_url an OpenAI-compatible model extracts the answers first, as the authors did with
GPT-4o; the rules still decide.

    python 04_eval.py                                    # toy test split, runs/toy/srpo (~20 s, 2 CPU cores)
    python 04_eval.py --models base=toy/base_model@plain,sft=runs/toy/sft,srpo=runs/toy/srpo,grpo=runs/toy/grpo@plain
                                                         # what `make demo` compares
    python 04_eval.py --benchmark toy-dots --models base=runs/toy-dots/base@plain,srpo=runs/toy-dots/srpo
    # A local copy of a real benchmark (here MathVision's GitHub release: testmini.jsonl + images/).
    # Real benchmarks get 4096 new tokens by default: a toy model would take minutes per batch, so
    # cap both for a look.
    python 04_eval.py --benchmark mathvision --split testmini --data_dir data/mathvision_testmini \
        --model runs/toy/srpo --limit 16 --max_new_tokens 128
    python 04_eval.py --benchmark mathvista --model Qwen/Qwen2.5-VL-7B-Instruct --batch_size 32

Writes out_dir/<benchmark>-<split>/<model>/: items.jsonl (one row per item; a rerun skips the rows
already there), summary.json, summary.md; with several models also comparison.{md,json,png}.
"""

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm

from machinery import benchmarks, cli, dataset, llm_client, policy, scoring
import report
from machinery import rollout


@dataclass
class Args:
    """Evaluate one model, or compare several, on a benchmark; print and save the tables. Resume: rerun
    the same command (items already in items.jsonl are skipped)."""

    benchmark: str = "toy"
    """toy (the two-step task) | toy-dots (the dots task) | mathvista | mathverse | mathvision | mmmu_pro"""
    split: str = ""
    """split ('' = the benchmark's default, benchmarks.DEFAULT_SPLITS); for mmmu_pro the settings,
    comma-separated"""
    data_dir: str = ""
    """local copy in the official release layout (see benchmarks.load_items); '' = the Hugging Face hub"""
    model: str = "runs/toy/srpo"
    """the model to evaluate: a save_pretrained/LoRA directory or a hub id"""
    models: str = ""
    """comparison mode: name=path,name=path (overrides --model); one table and one bar chart across them"""
    prompt: str = "reflect"
    """system prompt: reflect (the trained answer-reflect-answer format) or plain (think, then answer)"""
    max_new_tokens: int = 0
    """new tokens per response (0 = 128 on toy, as 03_grpo.py trains; 4096 on the real benchmarks, as
    the paper)"""
    batch_size: int = 64
    """prompts per generate call, saved after each; CPU decoding is overhead-bound, so big batches are fast"""
    limit: int = 0
    """evaluate the first N items only (0 = all; on the toy tasks, 0 = 1,000 test problems)"""
    seed: int = 0
    """toy tasks: which test set to draw (a different seed, different problems; `make demo SEED=n`)"""
    out_dir: str = "runs/eval"
    """where results go"""
    dtype: str = "auto"
    """model dtype: auto (bf16 on GPU, fp32 on CPU), bfloat16, float16, float32"""
    load_in_4bit: bool = False
    """load the model in nf4 (bitsandbytes) to fit a small GPU"""
    samples: int = 0
    """the headroom gauge: also sample this many answers per item at --sample_temperature and report pass@1,
    pass@k and the reachable and fragile shares (scoring.headroom; 16 is a good k); 0 = greedy only"""
    sample_temperature: float = 1.0
    """temperature of those samples (GRPO samples at 1.0)"""
    judge_base_url: str = ""
    """OpenAI-compatible endpoint for answer extraction, e.g. https://api.openai.com/v1 or a vLLM /
    SGLang server's http://host:port/v1 ('' = rule-based)"""
    judge_model: str = "gpt-4o"
    """judge model name (the authors used GPT-4o)"""
    judge_api_key_env: str = "OPENAI_API_KEY"
    """environment variable holding the judge's API key (the key is never printed or saved)"""


# ----------------------------------------------------------------------------------------------
# Optional judge: an OpenAI-compatible chat model extracts the answer; the rules then score it.

JUDGE_PROMPT = ("Extract the final answer from a model's response to a question. Reply with the answer "
                "only: the option letter for a multiple-choice question, otherwise the number or "
                "expression, without units. Reply 'none' if the response gives no answer.")


def make_judge(base_url, model, api_key_env, timeout=60, max_retries=2):
    """extract(question, text) -> answer text, asked of `model` at `base_url` (llm_client).
    The API key is read from the environment variable `api_key_env` and never printed or saved.
    When the judge fails (retries used up, or the endpoint refuses the key or model) the text is
    returned unchanged, so the rules score it."""
    key = os.environ.get(api_key_env, "")
    if not key:
        raise cli.UserError(f"--judge_base_url is set but the environment variable {api_key_env} is empty")
    client = llm_client.ChatClient(base_url, model, key, timeout_s=timeout, max_retries=max_retries)

    def extract(question, text):
        messages = [{"role": "system", "content": JUDGE_PROMPT},
                    {"role": "user", "content": f"Question:\n{question}\n\nResponse:\n{text}"}]
        try:
            answer = client.complete(messages, temperature=0, max_tokens=64).strip()
        except (llm_client.RequestFailed, llm_client.EndpointRefused) as e:
            tqdm.write(f"[judge] {e}; scoring this answer with the rules")
            return text
        return "" if answer.lower() == "none" else answer

    return extract


# ----------------------------------------------------------------------------------------------
# The evaluation loop: generate in batches, score, append one JSONL row per item


def evaluate(items, generate, out_path, *, benchmark, batch_size=8, extract=None):
    """Answer and score every item not yet in `out_path`; return the rows for `items`, in order.

    generate(questions, images) -> responses (the real model by default, see make_generator). Rows are
    appended after each batch, so a rerun skips what is done. A bad image or a failed generation becomes
    a row with an `error` naming the item (and the image path); that row is retried on the next run.
    """
    todo = pending(items, out_path)
    print(f"[eval] {out_path}: {len(items) - len(todo)} of {len(items)} items done before, {len(todo)} to go")
    bar = tqdm(total=len(todo), desc=f"eval {benchmark}")
    for start in range(0, len(todo), batch_size):
        batch, ready, images = todo[start:start + batch_size], [], []
        for item in batch:
            try:
                images.append(dataset.open_image(item["_image"]))
                ready.append(item)
            except dataset.ImageError as e:
                _write_error(out_path, item, f"item {item['_id']}: {e}")
        responses = _generate_batch(generate, [it["_question"] for it in ready], images) if ready else []
        for item, response in zip(ready, responses):
            if isinstance(response, Exception):
                failure = f"{type(response).__name__}: {response}"
                _write_error(out_path, item, f"item {item['_id']}: generation failed: {failure}")
            else:
                dataset.append_jsonl(out_path, scoring.make_row(benchmark, item, response, extract))
        bar.update(len(batch))
    bar.close()
    latest = {r["id"]: r for r in dataset.read_jsonl(out_path)}  # the last row per id wins (a retried error)
    return [latest[it["_id"]] for it in items if it["_id"] in latest]


def pending(items, out_path):
    """Items without a finished row in `out_path` (rows with an error are not finished)."""
    done = {r["id"] for r in dataset.read_jsonl(out_path) if not r.get("error")}
    return [it for it in items if it["_id"] not in done]


def _generate_batch(generate, questions, images):
    """Responses for one batch; if the batch fails, item by item, so one bad item costs only its row."""
    try:
        return generate(questions, images)
    except Exception as batch_error:
        if len(questions) == 1:
            return [batch_error]
        responses = []
        for question, image in zip(questions, images):
            try:
                responses += generate([question], [image])
            except Exception as e:
                responses.append(e)
        return responses


def _write_error(out_path, item, message):
    tqdm.write(f"[error] {message}")
    dataset.append_jsonl(out_path, {
        "id": item["_id"], "category": item["_category"], "question": item["_question"],
        "answer": str(item.get("answer")), "response": None, "first_answer": "", "final_answer": "",
        "first_correct": False, "correct": False, "has_reflection": False, "response_tokens": 0,
        "reflection_tokens": 0, "error": message})


def make_generator(model_path, args, max_new_tokens, prompt):
    """Load the model; return (generate, sample): generate(questions, images) -> responses, greedy, in the
    chosen format; sample(questions, images, k, seed) -> k responses per question at --sample_temperature."""
    import torch

    local = model_path.startswith((".", "/", "runs")) or model_path.count("/") != 1  # not a hub id
    if local and not os.path.exists(model_path):
        raise cli.UserError(f"no model at {model_path}: train it first (see the README / Makefile) "
                         f"or pass --model")
    base, adapter = policy.resolve_model(model_path)  # a LoRA output dir names its base model
    model, processor = policy.load_policy(base, dtype=args.dtype, load_in_4bit=args.load_in_4bit,
                                          adapter_path=adapter)
    system = dataset.SYSTEM_PROMPTS[prompt]
    vision_start = processor.tokenizer.convert_tokens_to_ids("<|vision_start|>")

    def generate(questions, images):
        return rollout.generate_responses(model, processor, questions, images, system_prompt=system,
                                         max_new_tokens=max_new_tokens, temperature=0.0,
                                         batch_size=len(questions), desc="generate")

    def sample(questions, images, k, seed):
        enc = dataset.encode_prompts(processor, questions, images, system)
        group = dataset.repeat_for_group(enc, k, vision_start)
        torch.manual_seed(seed)
        texts = rollout.generate(model, processor, group, max_new_tokens=max_new_tokens,
                                 temperature=args.sample_temperature)[2]
        return [texts[i * k:(i + 1) * k] for i in range(len(questions))]

    return generate, sample


def evaluate_samples(items, sample, out_path, *, benchmark, k, batch_size, seed, extract=None):
    """The gauge's samples: k responses per item not yet in `out_path`, scored, one row per item appended
    after each batch (a rerun continues). Items whose image fails are left out (their greedy row says
    why). Each batch's draws are seeded by --seed and its first item."""
    done = {r["id"] for r in dataset.read_jsonl(out_path)}
    todo = [it for it in items if it["_id"] not in done]
    per_call = max(1, batch_size * 4 // k)  # items per generate call: batch_size x 4 sequences
    bar = tqdm(total=len(todo), desc=f"sample {k} x {benchmark}")
    for start in range(0, len(todo), per_call):
        ready, images = [], []
        for item in todo[start:start + per_call]:
            try:
                images.append(dataset.open_image(item["_image"]))
                ready.append(item)
            except dataset.ImageError:
                pass
        if ready:
            index = items.index(ready[0])  # the seed follows the item, not the position in this run
            responses = sample([it["_question"] for it in ready], images, k, seed * 1_000_003 + index)
            for item, rs in zip(ready, responses):
                dataset.append_jsonl(out_path, scoring.sample_row(benchmark, item, rs, extract))
        bar.update(len(todo[start:start + per_call]))
    bar.close()
    return dataset.read_jsonl(out_path)


# ----------------------------------------------------------------------------------------------
# Summaries, tables and the comparison chart


def _fmt(x):
    return "-" if x is None else f"{x:.1f}"


def summary_markdown(summary, title):
    """Two Markdown tables: accuracy per category (first and final answer), then the reflection metrics."""
    lines = [f"### {title}", "", "| category | n | first answer % | final answer % |", "|---|---:|---:|---:|"]
    for name, c in summary["categories"].items():
        lines.append(f"| {name} | {c['n']} | {_fmt(c['first_acc'])} | {_fmt(c['final_acc'])} |")
    o, r = summary["overall"], summary["reflection"]
    lines += [f"| **overall** | {o['n']} | **{_fmt(o['first_acc'])}** | **{_fmt(o['final_acc'])}** |", "",
              "| reflection % | first acc % | final acc % | wrong→right % | right→wrong % "
              "| response tokens | reflection tokens | errors |", "|---:|---:|---:|---:|---:|---:|---:|---:|",
              f"| {_fmt(r['reflection_rate'])} | {_fmt(r['first_acc'])} | {_fmt(r['final_acc'])} "
              f"| {_fmt(r['wrong_to_right'])} | {_fmt(r['right_to_wrong'])} "
              f"| {_fmt(r['mean_response_tokens'])} | {_fmt(r['mean_reflection_tokens'])} "
              f"| {summary['errors']} |"]
    if summary.get("headroom"):
        lines += ["", scoring.headroom_markdown({"": summary["headroom"]})]
    return "\n".join(lines) + "\n"


def write_comparison(summaries, out_dir, title, rows=None):
    """comparison.md / .json / .png across models: final accuracy per category and overall, first-answer
    accuracy, the reflection metrics, and (given each model's item `rows`) the paired difference in final
    accuracy between every two models. Returns the Markdown."""
    categories = list(dict.fromkeys(c for s in summaries.values() for c in s["categories"]))
    head = ["model", "overall %", "first answer %", *[f"{c} %" for c in categories],
            "reflection %", "wrong→right %", "right→wrong %", "response tokens"]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for name, s in summaries.items():
        r = s["reflection"]
        cells = [name, f"**{_fmt(s['overall']['final_acc'])}**", _fmt(s["overall"]["first_acc"]),
                 *[_fmt(s["categories"].get(c, {}).get("final_acc")) for c in categories],
                 _fmt(r["reflection_rate"]), _fmt(r["wrong_to_right"]), _fmt(r["right_to_wrong"]),
                 _fmt(r["mean_response_tokens"])]
        lines.append("| " + " | ".join(cells) + " |")
    names = list(summaries)
    paired = {}
    if rows:
        paired = {a: {b: report.paired_difference(rows[a], rows[b]) for b in names if b != a} for a in names}
    if paired:
        lines += ["", "Paired differences in final accuracy (points, 95% interval over the same items):", "",
                  "| model | vs | difference | 95% interval |", "|---|---|---:|---|"]
        for i, a in enumerate(names):
            for b in names[:i]:
                p = paired[a][b]
                if p:
                    lines.append(f"| {a} | {b} | {100 * p['difference']:+.1f} | "
                                 f"[{100 * p['ci95'][0]:+.1f}, {100 * p['ci95'][1]:+.1f}] |")
    gauges = {name: s["headroom"] for name, s in summaries.items() if s.get("headroom")}
    if gauges:
        lines += ["", scoring.headroom_markdown(gauges)]
    markdown = "\n".join(lines) + "\n"
    os.makedirs(out_dir, exist_ok=True)
    Path(out_dir, "comparison.md").write_text(markdown)
    # Headline fractions in [0, 1] first, then the full summary (percentages) of each model.
    frac = lambda x: None if x is None else round(x / 100, 4)  # noqa: E731
    headline = {name: {"final_accuracy": frac(s["overall"]["final_acc"]),
                       "first_accuracy": frac(s["overall"]["first_acc"]),
                       "wrong_to_right": frac(s["reflection"]["wrong_to_right"]),
                       "right_to_wrong": frac(s["reflection"]["right_to_wrong"]),
                       "reflection_rate": frac(s["reflection"]["reflection_rate"]),
                       **({"paired": paired[name]} if paired else {}), **s}
                for name, s in summaries.items()}
    Path(out_dir, "comparison.json").write_text(json.dumps(headline, indent=2))
    _bar_chart(summaries, categories, os.path.join(out_dir, "comparison.png"), title)
    return markdown


def _bar_chart(summaries, categories, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = categories + ["overall"]
    width = 0.8 / len(summaries)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(groups) * max(1, len(summaries) / 3)), 3.5))
    for i, (name, s) in enumerate(summaries.items()):
        values = [s["categories"].get(c, {}).get("final_acc") or 0 for c in categories]
        values.append(s["overall"]["final_acc"] or 0)
        offset = (i - (len(summaries) - 1) / 2) * width
        ax.bar([g + offset for g in range(len(groups))], values, width, label=name)
    crowded = len(groups) > 6
    ax.set_xticks(range(len(groups)), groups, rotation=30 if crowded else 0,
                  ha="right" if crowded else "center")
    ax.set_ylabel("final-answer accuracy (%)")
    ax.set_title(title)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the bars, not over them
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------


def parse_models(spec, default_prompt="reflect"):
    """'base=toy/base_model@plain,srpo=runs/toy/srpo' -> {"base": (path, "plain"), "srpo": (path, default)}.

    A bare path is named by its folder; `@prompt` picks the model's own prompt format (a model
    trained on plain chain of thought is evaluated in that format, as the paper evaluates its baselines).
    """
    models = {}
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        name, _, path = part.rpartition("=") if "=" in part else ("", "", part)
        path, _, prompt = path.partition("@")
        if (prompt or default_prompt) not in dataset.SYSTEM_PROMPTS:
            raise cli.UserError(f"unknown prompt {prompt!r} in --models {part!r}; "
                             f"choose from {list(dataset.SYSTEM_PROMPTS)}")
        models[name or Path(path.rstrip("/")).name] = (path, prompt or default_prompt)
    return models


def _check_run(model_dir, settings):
    """Refuse to resume a run made with other settings: its rows would silently mix with the new ones."""
    path = Path(model_dir, "run.json")
    if path.exists() and (old := json.loads(path.read_text())) != settings:
        raise cli.UserError(f"{model_dir} holds results made with {old}, not {settings}; "
                         f"delete it or choose another --out_dir")
    os.makedirs(model_dir, exist_ok=True)
    path.write_text(json.dumps(settings, indent=2))


def main(args):
    split = args.split or benchmarks.DEFAULT_SPLITS[args.benchmark]
    max_new_tokens = args.max_new_tokens or (128 if args.benchmark in benchmarks.TOY_BENCHMARKS else 4096)
    items = benchmarks.load_items(args.benchmark, split, args.data_dir, args.limit, args.seed)
    models = parse_models(args.models or args.model, args.prompt)
    extract = None
    if args.judge_base_url:
        extract = make_judge(args.judge_base_url, args.judge_model, args.judge_api_key_env)
    run_name = f"{args.benchmark}-{re.sub(r'[^A-Za-z0-9.-]+', '_', split).strip('_')}"
    run_dir = os.path.join(args.out_dir, run_name)
    scorer = f"judge {args.judge_model}" if extract else "rule-based"
    print(f"[eval] {run_name}: {len(items)} items, models {list(models)}, prompt {args.prompt!r}, "
          f"max_new_tokens {max_new_tokens}, scoring {scorer}")
    summaries, item_rows = {}, {}
    for name, (path, prompt) in models.items():
        folder = name if prompt == "reflect" else f"{name}-{prompt}"
        model_dir = os.path.join(run_dir, folder)
        _check_run(model_dir, {"model": path, "prompt": prompt, "max_new_tokens": max_new_tokens,
                               "judge": args.judge_model if extract else None})
        out_path = os.path.join(model_dir, "items.jsonl")
        samples_path = os.path.join(model_dir, f"samples{args.samples}_t{args.sample_temperature:g}.jsonl")
        sampling = args.samples and len(dataset.read_jsonl(samples_path)) < len(items)
        # the model is loaded only when there is work: a finished run just re-summarises its rows
        generate, sample = make_generator(path, args, max_new_tokens, prompt) if pending(items, out_path) \
            or sampling else (None, None)
        rows = evaluate(items, generate, out_path, benchmark=args.benchmark, batch_size=args.batch_size,
                        extract=extract)
        # args holds judge_api_key_env, the key's variable name, never the key
        summary = {**scoring.summarize(rows, args.benchmark), "model": path, "folder": folder, "split": split,
                   "prompt": prompt, "max_new_tokens": max_new_tokens, "args": asdict(args)}
        if args.samples:
            sampled = evaluate_samples(items, sample, samples_path, benchmark=args.benchmark, k=args.samples,
                                       batch_size=args.batch_size, seed=args.seed, extract=extract)
            summary["headroom"] = scoring.headroom(rows, sampled)
        markdown = summary_markdown(summary, f"{run_name} · {name}")
        Path(model_dir, "summary.json").write_text(json.dumps(summary, indent=2))
        Path(model_dir, "summary.md").write_text(markdown)
        print("\n" + markdown)
        summaries[name], item_rows[name] = summary, rows
    if len(summaries) > 1:
        print("\n" + write_comparison(summaries, run_dir, run_name, item_rows))
        print(f"[eval] comparison table and chart in {run_dir}/comparison.{{md,json,png}}")
    return summaries


if __name__ == "__main__":
    cli.run(main, Args)
