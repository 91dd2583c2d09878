"""The toy pipeline on another model family (not a test): does SRPO's RL step learn on a tiny Qwen3-VL (or
Qwen3.5) as it does on the toy's Qwen2.5-VL?

00_base_model.py builds its base as a tiny Qwen2.5-VL; here the same 00 (its training, its gate) runs with
the toy's builders set to another family (toy.build_tiny_model(family=...), ToyProcessor.build(family=...)).
The stages after it run as `make demo` runs them, unchanged: 01 (the demo's recipe), 02 (reflection SFT),
03 (SRPO, --steps), then 04 on the base, SFT and SRPO models. Every stage's output is under --out; the
reward and accuracy per RL step are in srpo/metrics.jsonl, and printed at the end by tenths of the run.

    OMP_NUM_THREADS=1 python bench/family_demo.py --family qwen3_vl     # ~36 min on a busy 2-core machine
    OMP_NUM_THREADS=1 python bench/family_demo.py --family qwen3_5 --rl_args=--no-share_prompts
"""

import argparse
import functools
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def stage(*argv):
    """A numbered script in a fresh process, as make runs it; its time."""
    t = time.time()
    print("$ python " + " ".join(map(str, argv)), flush=True)
    subprocess.run([sys.executable, *map(str, argv)], cwd=ROOT, check=True)
    return round(time.time() - t)


def build_base(family, out, seed):
    """00_base_model.py's main with the toy's builders set to `family`."""
    import importlib.util

    import toy

    toy.build_tiny_model = functools.partial(toy.build_tiny_model, family=family)
    toy.ToyProcessor.build = functools.partial(toy.ToyProcessor.build.__func__, toy.ToyProcessor, family=family)
    spec = importlib.util.spec_from_file_location("base_model", os.path.join(ROOT, "00_base_model.py"))
    base = importlib.util.module_from_spec(spec)
    sys.modules["base_model"] = base
    spec.loader.exec_module(base)
    return base.main(base.Args(out_dir=out, seed=seed))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="qwen3_vl", help="toy/families.py: qwen2_5_vl, qwen3_vl or qwen3_5")
    p.add_argument("--out", default="", help="output folder (default runs/family-<family>)")
    p.add_argument("--seed", type=int, default=0, help="every stage's seed")
    p.add_argument("--steps", type=int, default=60, help="03's RL steps (the demo's 60)")
    p.add_argument("--eval_limit", type=int, default=500, help="04's test problems")
    p.add_argument("--rl_args", default="", help="more 03 flags, e.g. '--no-share_prompts'")
    a = p.parse_args()
    out = os.path.abspath(a.out or os.path.join(ROOT, "runs", f"family-{a.family}"))
    base, seconds = os.path.join(out, "base"), {}
    if not os.path.isfile(os.path.join(base, "eval.json")):
        t = time.time()
        build_base(a.family, base, a.seed)
        seconds["00"] = round(time.time() - t)
    seconds["01"] = stage("01_reflect_data.py", "--model", base, "--seed", a.seed, "--out_dir", f"{out}/reflect",
                          "--pool_size", 3600, "--direct_rows", 1200)
    seconds["02"] = stage("02_sft.py", "--model", base, "--data", f"{out}/reflect/sft_reflect.jsonl",
                          "--out_dir", f"{out}/sft", "--seed", a.seed, "--eval_size", 0)
    seconds["03"] = stage("03_grpo.py", "--model", f"{out}/sft", "--out_dir", f"{out}/srpo", "--seed", a.seed,
                          "--steps", a.steps, *a.rl_args.split())
    seconds["04"] = stage("04_eval.py", "--benchmark", "toy", "--seed", a.seed, "--limit", a.eval_limit,
                          "--out_dir", f"{out}/eval",
                          "--models", f"base={base}@plain,sft={out}/sft,srpo={out}/srpo")

    rows = [json.loads(line) for line in open(os.path.join(out, "srpo", "metrics.jsonl"))]
    tenth = max(1, len(rows) // 10)
    print(f"\n{a.family}: 03's reward and final accuracy, mean over steps (seconds per stage: {seconds})")
    for s in range(0, len(rows), tenth):
        part = rows[s:s + tenth]
        mean = {k: sum(r[k] for r in part) / len(part) for k in ("reward", "final_accuracy")}
        print(f"  steps {part[0]['step']:>3}-{part[-1]['step']:<3} reward {mean['reward']:.3f}  "
              f"final acc {mean['final_accuracy']:.3f}")
    comparison = json.load(open(os.path.join(out, "eval", "toy-test", "comparison.json")))
    print("04: " + ", ".join(f"{m} final {c['final_accuracy']:.1%} (first {c['first_accuracy']:.1%})"
                             for m, c in comparison.items()))


if __name__ == "__main__":
    main()
