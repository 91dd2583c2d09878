"""Benchmark (not a test): rollout tokens per second of the fast path (rollout.fast_generate: our decoding
loop on a static cache) and of HF generate (rollout.hf_generate), for each model family, on the toy's tiny
models (toy/families.py at the shipped base's size: hidden 128, 4 decoder layers; untrained weights, which
generate as fast as trained ones when the length is forced).

Each setting: P toy prompts with images, each G times (GRPO's groups), sampled at T = 1, generation forced
to L tokens (min_new_tokens = max_new_tokens: every row runs every step); the median of `--repeats` timed
runs after one warm-up run, the two paths taking turns. Tokens per second = P x G x L / seconds of
generation (the prefill, vision tower included, counts in the seconds).

    OMP_NUM_THREADS=1 python bench/bench_families.py          # 3 families x (4 x 8) x {64, 128} tokens, ~3 min
    OMP_NUM_THREADS=1 python bench/bench_families.py --families qwen3_5 --lengths 256 --prompts 8
"""

import argparse
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from machinery import dataset, rollout  # noqa: E402
import toy  # noqa: E402
from toy.families import TOY_FAMILIES  # noqa: E402


def timed(fns, repeats):
    """{name: median seconds of `repeats` calls} of each function of `fns`, after one warm-up call each; the
    functions take turns, so that a busy spell of the machine slows them alike."""
    times = {name: [] for name in fns}
    for i in range(repeats + 1):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            if i:
                times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", default=",".join(TOY_FAMILIES), help="model families, comma-separated")
    p.add_argument("--prompts", type=int, default=4, help="distinct prompts P (each with its image)")
    p.add_argument("--group_size", type=int, default=8, help="samples per prompt G")
    p.add_argument("--lengths", default="64,128", help="forced completion lengths L, comma-separated")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per setting (after a warm-up run)")
    p.add_argument("--hidden", type=int, default=128, help="hidden size of the tiny models")
    p.add_argument("--layers", type=int, default=4, help="decoder layers (Qwen3.5: 3 linear-attention, 1 full)")
    a = p.parse_args()
    torch.manual_seed(0)
    tokenizer = toy.build_tokenizer(extra_texts=list(dataset.SYSTEM_PROMPTS.values()))
    problems = toy.toy_dataset("test", a.prompts)
    print(f"torch threads {torch.get_num_threads()}, {a.prompts} prompts x G = {a.group_size}, T = 1, "
          f"hidden {a.hidden}, {a.layers} layers")
    print(f"{'family':>12} {'L':>4} | {'fast tok/s':>10} {'hf tok/s':>9} | {'fast/hf':>7} | fast path")
    for family in a.families.split(","):
        processor = toy.ToyProcessor.build(tokenizer, family=family)
        model = toy.build_tiny_model(tokenizer, family=family, hidden=a.hidden, layers=a.layers).eval()
        vs = tokenizer.convert_tokens_to_ids("<|vision_start|>")
        prompts = dataset.encode_prompts(processor, list(problems["question"]), list(problems["image"]),
                                         dataset.SYSTEM_PROMPTS["reflect"])
        group = dataset.repeat_for_group(prompts, a.group_size, vs)
        why = rollout.fast_path_support(model)[1]
        for L in map(int, a.lengths.split(",")):
            kw = dict(max_new_tokens=L, min_new_tokens=L, temperature=1.0)
            seconds = timed({"fast": lambda: rollout.fast_generate(model, processor, group, **kw),
                             "hf": lambda: rollout.hf_generate(model, processor, group, **kw)}, a.repeats)
            tps = {k: len(group["input_ids"]) * L / v for k, v in seconds.items()}
            print(f"{TOY_FAMILIES[family]['name']:>12} {L:>4} | {tps['fast']:>10.0f} {tps['hf']:>9.0f} | "
                  f"{tps['fast'] / tps['hf']:>6.2f}x | {why}", flush=True)
        rollout.release()


if __name__ == "__main__":
    main()
