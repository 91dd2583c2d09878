"""Stage 0 (toy only): build the stand-in for Qwen2.5-VL-7B-Instruct.

The paper starts from an instruction-tuned model that already answers in <think>/<answer> format,
is right on some problems and wrong on others, and has the skills a careful check needs. Offline we
build that here: a tokenizer trained on the toy corpus, a tiny Qwen2.5-VL (the real architecture,
~1M parameters) and a short training run.

Two-step task (`--data toy`, the default): the base model learns three things, in a fixed mix:
  * the first attempt, plain chain of thought that reads n and writes the result in one step
    ("What is blue x 7 + 3?" -> "<think> blue: 5. 5 x 7 + 3 = 38.</think>"), often wrong;
  * the check procedure as its own task, asked with toy.STEP_CUE ("... Check it step by step.")
    -> "<think> blue: 5. 5 x 7 = 35. 35 + 3 = 38.</think>", the skill a reflection can use;
  * the check's sub-skills, single operations in text ("What is 5 x 7?"; only multiplications, a
    known flaw, see toy.single_step_problem).
  The run is stopped while the one-step answers are still often wrong; the gate (G1-G4, printed and
  written to eval.json) measures, on this model alone, whether a step-by-step second look can beat
  its first: G1 first answers right; G2 wrong first answers that read n right; G3 the check asked as
  its own task; G4 the accuracy a reflection that runs the check would reach.
  The demo does not run this: the result is shipped in toy/base_model (`make base` rebuilds it, as
  downloading Qwen2.5-VL-7B-Instruct would be the real-scale step).
Dots task (`--data toy-dots`, the contrast): plain chain of thought on the dot charts, 400 steps.

    python 00_base_model.py                      # -> toy/base_model, ~7 minutes on 2 CPU cores
    python 00_base_model.py --data toy-dots      # -> runs/toy-dots/base, ~3.5 minutes

Writes the model, tokenizer and processor (safetensors + configs, loadable with
`policy.load_policy`), `train_log.jsonl` and `eval.json` (accuracy per problem family; the gate).
"""

import json
import os
import random
import re
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from machinery import cli, dataset, grading, policy, rollout, scoring
import toy
from machinery import training


@dataclass
class Args:
    """Build, briefly train and evaluate the tiny toy base model."""

    data: str = "toy"
    """toy task: 'toy' (the two-step task) or 'toy-dots' (the dots task, the contrast)"""
    out_dir: str = ""
    """where the base model is saved ('' = toy/base_model for toy, runs/toy-dots/base for toy-dots)"""
    seed: int = 0
    """random seed (weights, data order)"""
    steps: int = 0
    """optimizer steps (0 = the task's default: toy 2,000, toy-dots 400). Stopped early on purpose: toy-dots
    past the point (~300) where it learns to copy the question's colours (seed 0: 68%); toy where one-step
    answers are still often wrong"""
    batch_size: int = 32
    """problems per step"""
    lr: float = 2e-3
    """AdamW learning rate (cosine, 5% warm-up)"""
    check_share: float = 0.35
    """toy: share of training problems asked with toy.STEP_CUE and answered by the check procedure"""
    single_step_share: float = 0.5
    """toy: share of text-only single operations (the check's sub-skills); the rest are first attempts"""
    train_size: int = 4000
    """toy-dots: training problems (plain chain-of-thought targets); toy draws fresh problems every step"""
    hidden: int = 128
    """language model hidden size"""
    layers: int = 4
    """language model layers"""
    eval_size: int = 0
    """toy test problems for the accuracy report and the gate (0 = toy 1,000, toy-dots 300)"""
    threads: int = 0
    """torch threads (0 = torch's default)"""


DEFAULT_STEPS = {"toy": 2000, "toy-dots": 400}
DEFAULT_OUT = {"toy": "toy/base_model", "toy-dots": "runs/toy-dots/base"}
DEFAULT_EVAL = {"toy": 1000, "toy-dots": 300}


def dots_batches(args, processor, system):
    """toy-dots: batches drawn from a fixed set of train_size problems (as the contrast was built)."""
    train = toy.toy_dataset("train", args.train_size, seed=args.seed, task="toy-dots")
    g = torch.Generator().manual_seed(args.seed)
    while True:
        rows = train.select(torch.randint(len(train), (args.batch_size,), generator=g).tolist())
        yield dataset.encode_sft(processor, rows["question"], rows["image"], [toy.cot_response(r) for r in rows], system)


def two_step_batches(args, processor, system):
    """toy: fresh problems every step, from seeds no later stage uses, in the mix of first attempts,
    check procedures and single operations."""
    rng = random.Random(args.seed)
    while True:
        questions, images, targets = [], [], []
        for _ in range(args.batch_size):
            u, seed = rng.random(), toy.BASE_SEED_OFFSET + rng.randrange(10_000_000)
            if u < args.single_step_share:
                question, target = toy.single_step_problem(seed)
                image = None
            else:
                p = toy.make_problem(seed)
                check = u < args.single_step_share + args.check_share
                question = p["question"] + (toy.STEP_CUE if check else "")
                image, target = p["image"], toy.cot_response(p, stepwise=check)
            questions.append(question), images.append(image), targets.append(target)
        yield dataset.encode_sft(processor, questions, images, targets, system)


_READ = re.compile(r"\b(red|green|blue): (\d+)\.")


def gate(model, processor, n, max_new_tokens=48):
    """The gate, measured on the base model alone on the first n toy test problems (how its thresholds
    were set: docs/notebook.md).

    G1 the first attempt's answers right; G2 of the wrong ones, the share that read n right (the
    error is then in the arithmetic, which a check can redo); G3 the check procedure asked as its
    own task (question + toy.STEP_CUE); G4 = G1 + (1 - G1) x fix - G1 x break, the accuracy a
    reflection that runs the check and keeps its result would reach, with fix = P(check right |
    first wrong) and break = P(check wrong | first right) measured on the same problems.
    """
    test = toy.toy_dataset("test", n, task="toy")
    system = dataset.SYSTEM_PROMPTS["plain"]
    first = rollout.generate_responses(model, processor, test["question"], test["image"], system_prompt=system,
                                      max_new_tokens=max_new_tokens, batch_size=100, desc="gate: first attempts")
    check = rollout.generate_responses(model, processor, [q + toy.STEP_CUE for q in test["question"]], test["image"],
                                      system_prompt=system, max_new_tokens=max_new_tokens, batch_size=100,
                                      desc="gate: checks")
    rows = []
    for p, a, b in zip(test, first, check):
        truth = json.loads(p["solution"])["reads"][0][1]
        reads = _READ.findall(a)
        rows.append({"family": p["family"], "first": grading.is_correct(grading.first_answer(a), p["answer"]),
                     "read": bool(reads) and int(reads[0][1]) == truth,
                     "check": grading.is_correct(grading.first_answer(b), p["answer"])})

    def share(rs, key, when=lambda r: True):
        sel = [r for r in rs if when(r)]
        return sum(r[key] for r in sel) / len(sel) if sel else None

    def figures(rs):
        g1, fix = share(rs, "first"), share(rs, "check", lambda r: not r["first"])
        brk = 1 - share(rs, "check", lambda r: r["first"]) if any(r["first"] for r in rs) else 0.0
        return {"G1_first": g1, "G2_wrong_read_right": share(rs, "read", lambda r: not r["first"]),
                "G3_check": share(rs, "check"), "fix": fix, "break": brk,
                "G4_bound": g1 + (1 - g1) * (fix or 0.0) - g1 * brk, "n": len(rs)}

    out = figures(rows)
    out["per_family"] = {f: figures([r for r in rows if r["family"] == f]) for f in toy.FAMILIES}
    return out


def main(args: Args):
    task = toy.check_task(args.data)
    steps = args.steps or DEFAULT_STEPS[task]
    out_dir = args.out_dir or DEFAULT_OUT[task]
    eval_size = args.eval_size or DEFAULT_EVAL[task]
    cli.seed_everything(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    tokenizer = toy.build_tokenizer(extra_texts=list(dataset.SYSTEM_PROMPTS.values()), task=task)
    processor = toy.ToyProcessor.build(tokenizer, task)
    model = toy.build_tiny_model(tokenizer, hidden=args.hidden, layers=args.layers, seed=args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"tiny Qwen2.5-VL: {n_params / 1e6:.2f}M parameters "
          f"({sum(p.numel() for p in model.model.visual.parameters()) / 1e6:.2f}M vision), vocab {len(tokenizer)}")

    system = dataset.SYSTEM_PROMPTS["plain"]
    batches = (two_step_batches if task == "toy" else dots_batches)(args, processor, system)
    # The vision tower is trained here (it starts from random weights); later stages freeze it.
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = training.cosine_schedule(opt, max(1, steps // 20), steps, min_ratio=0.1)
    os.makedirs(out_dir, exist_ok=True)
    log_path = os.path.join(out_dir, "train_log.jsonl")
    if os.path.exists(log_path):
        os.remove(log_path)
    model.train()
    for step in (bar := tqdm(range(steps), desc=f"base model ({task})")):
        loss = model(**next(batches)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        dataset.append_jsonl(log_path, {"step": step, "loss": loss.item(), "lr": sched.get_last_lr()[0]})
    train_s = time.time() - t0

    policy.save_model(model, processor, out_dir)
    summary, _ = scoring.check_toy(model, processor, n=eval_size, prompt="plain", max_new_tokens=48)
    acc = {**{f: c["final_acc"] / 100 for f, c in summary["categories"].items()},
           "all": summary["overall"]["final_acc"] / 100}
    result = {"task": task, "accuracy": acc, "parameters": n_params, "build_seconds": round(train_s, 1),
              "seed": args.seed, "steps": steps}
    print(f"base model saved to {out_dir} in {train_s:.0f}s")
    print("toy test accuracy: " + ", ".join(f"{k} {v:.0%}" for k, v in acc.items()))
    if task == "toy":
        result["gate"] = g = gate(model, processor, eval_size)
        print(f"gate (n={g['n']}): G1 first answers right {g['G1_first']:.1%} | G2 wrong ones that read n right "
              f"{g['G2_wrong_read_right']:.1%} | G3 check as its own task {g['G3_check']:.1%} | fix {g['fix']:.1%}, "
              f"break {g['break']:.1%} -> G4 bound {g['G4_bound']:.1%}")
    with open(os.path.join(out_dir, "eval.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    cli.run(main, Args)
