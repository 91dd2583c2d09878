"""Stage 0 (toy only): build the stand-in for Qwen2.5-VL-7B-Instruct.

The paper starts from an instruction-tuned model that already answers in <think>/<answer> format
and is right on some problems and wrong on others. Offline we build that here: a tokenizer trained
on the toy corpus, a tiny Qwen2.5-VL (the real architecture, ~1M parameters) and a short,
deliberately incomplete training run on plain chain of thought, so the model answers in format but
is often wrong (the target is 30-70% accuracy on the toy test split).

    python 00_base_model.py                      # -> runs/toy/base, ~3.5 minutes on 2 CPU cores

Writes the model, tokenizer and processor (safetensors + configs, loadable with
`common.load_policy`), `train_log.jsonl` and `eval.json` (accuracy per problem family).
"""

import json
import os
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

import common
import toy


@dataclass
class Args:
    """Build, briefly train and evaluate the tiny toy base model."""

    out_dir: str = "runs/toy/base"
    """where the base model is saved"""
    seed: int = 0
    """random seed (weights, data order)"""
    train_size: int = 4000
    """toy training problems (plain chain-of-thought targets)"""
    steps: int = 400
    """optimizer steps: past the point (~300) where it learns to copy the question's colours, few enough
    that it stays often wrong (seed 0: 68% on the toy test split)"""
    batch_size: int = 32
    """problems per step"""
    lr: float = 2e-3
    """AdamW learning rate (cosine, 5% warm-up)"""
    hidden: int = 128
    """language model hidden size"""
    layers: int = 4
    """language model layers"""
    eval_size: int = 300
    """toy test problems for the accuracy report"""
    threads: int = 0
    """torch threads (0 = torch's default)"""


def main(args: Args):
    common.seed_everything(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    tokenizer = toy.build_tokenizer(extra_texts=list(common.SYSTEM_PROMPTS.values()))
    processor = toy.ToyProcessor.build(tokenizer)
    model = toy.build_tiny_model(tokenizer, hidden=args.hidden, layers=args.layers, seed=args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"tiny Qwen2.5-VL: {n_params / 1e6:.2f}M parameters "
          f"({sum(p.numel() for p in model.model.visual.parameters()) / 1e6:.2f}M vision), vocab {len(tokenizer)}")

    train = toy.toy_dataset("train", args.train_size, seed=args.seed)
    system = common.SYSTEM_PROMPTS["plain"]
    # The vision tower is trained here (it starts from random weights); later stages freeze it.
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = common.cosine_schedule(opt, max(1, args.steps // 20), args.steps, min_ratio=0.1)
    os.makedirs(args.out_dir, exist_ok=True)
    log_path = os.path.join(args.out_dir, "train_log.jsonl")
    if os.path.exists(log_path):
        os.remove(log_path)
    g = torch.Generator().manual_seed(args.seed)
    model.train()
    for step in (bar := tqdm(range(args.steps), desc="base model")):
        idx = torch.randint(len(train), (args.batch_size,), generator=g).tolist()
        rows = train.select(idx)
        batch = common.encode_sft(processor, rows["question"], rows["image"],
                                  [toy.cot_response(r) for r in rows], system)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        common.append_jsonl(log_path, {"step": step, "loss": loss.item(), "lr": sched.get_last_lr()[0]})
    train_s = time.time() - t0

    common.save_model(model, processor, args.out_dir)
    ev, _ = common.evaluate_toy(model, processor, n=args.eval_size, style="plain")
    acc = {**ev["per_family"], "all": ev["final_correct"]}
    result = {"accuracy": acc, "parameters": n_params, "build_seconds": round(train_s, 1), "seed": args.seed,
              "steps": args.steps}
    with open(os.path.join(args.out_dir, "eval.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(f"base model saved to {args.out_dir} in {train_s:.0f}s")
    print("toy test accuracy: " + ", ".join(f"{k} {v:.0%}" for k, v in acc.items()))
    return result


if __name__ == "__main__":
    main(common.parse_args(Args))
