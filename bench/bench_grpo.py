"""Benchmark (not a test): one GRPO step on the toy model, split into generation / scoring / update.

For each group size G and response length, runs a few steps of 03_grpo.py in a fresh process with
generation forced to that length (length 0: as the model ends its responses, the demo's setting, with
the accuracy filter on), and prints the median step time split into its parts, tokens per second and the
process's peak memory (CPU: max RSS; GPU: peak allocated). Variants are sets of extra 03 flags;
--against REV runs every setting on the code of git revision REV too (a temporary worktree), so a change
is measured against the code before it in one run, on the same machine state.

    OMP_NUM_THREADS=1 python bench/bench_grpo.py        # G in {4, 8, 16} x lengths {64, 128, 256}, fast and hf rollouts
    python bench/bench_grpo.py --groups 8 --lengths 256 --model runs/toy/sft
    # the demo's RL step (32 prompts x 8, natural lengths) against an earlier commit:
    OMP_NUM_THREADS=1 python bench/bench_grpo.py --groups 8 --lengths 0 --prompts_per_step 32 --steps 6 \
        --variants fast --against HEAD~3
"""

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: 03_grpo.py

CHILD = r"""
import json, resource, sys, torch
sys.argv = ["03_grpo.py"] + json.loads(sys.argv[1])
import importlib.util
spec = importlib.util.spec_from_file_location("grpo", "03_grpo.py")
grpo = importlib.util.module_from_spec(spec); sys.modules["grpo"] = grpo; spec.loader.exec_module(grpo)
from machinery import cli
rows = grpo.main(cli.parse_args(grpo.Args))["metrics"]
peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print("BENCH " + json.dumps({"rows": rows, "peak_mib": peak}))
"""


VARIANTS = {"fast": "--rollout fast", "hf": "--rollout hf", "one-pass": "--no-share_prompts"}


def main():
    class Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass

    p = argparse.ArgumentParser(description=__doc__, formatter_class=Help)
    p.add_argument("--model", default="runs/toy/sft", help="policy that 03_grpo.py starts from")
    p.add_argument("--groups", default="4,8,16", help="group sizes G, comma-separated")
    p.add_argument("--lengths", default="64,128,256",
                   help="forced response lengths in tokens, comma-separated; 0 = natural lengths (up to 128)")
    p.add_argument("--prompts_per_step", type=int, default=4, help="prompts per GRPO step (x G sequences)")
    p.add_argument("--steps", type=int, default=3, help="steps per setting; the first is dropped as warm-up")
    p.add_argument("--variants", default="fast,hf",
                   help=f"comma-separated names of extra 03 flags: {VARIANTS}, or flags in quotes")
    p.add_argument("--against", default="", help="git revision to run every setting on as well (A/B)")
    a = p.parse_args()
    roots = [("now", ROOT)]
    with tempfile.TemporaryDirectory() as tmp:
        if a.against:
            subprocess.run(["git", "worktree", "add", "--detach", os.path.join(tmp, "ab"), a.against], cwd=ROOT,
                           check=True, capture_output=True)
            roots.append((a.against, os.path.join(tmp, "ab")))
        try:
            print(f"{'code':>8} {'variant':>9} {'G':>3} {'len':>4} {'seqs':>5} | {'step s':>7} {'gen s':>6} "
                  f"{'score s':>7} {'update s':>8} | {'tok/s':>7} | {'peak MiB':>8}")
            for G in map(int, a.groups.split(",")):
                for L in map(int, a.lengths.split(",")):
                    for variant in a.variants.split(","):
                        for name, root in roots:
                            run(a, root, name, variant, G, L)
        finally:
            if a.against:
                subprocess.run(["git", "worktree", "remove", "--force", os.path.join(tmp, "ab")], cwd=ROOT)


def run(a, root, code, variant, G, L):
    """A few steps of 03_grpo.py in a fresh process; prints the medians of steps 2.. and the peak memory."""
    flags = shlex.split(VARIANTS.get(variant, variant))
    with tempfile.TemporaryDirectory() as out:
        argv = ["--model", os.path.abspath(a.model), "--out_dir", out, "--steps", str(a.steps), "--group_size", str(G),
                "--prompts_per_step", str(a.prompts_per_step), "--save_every", "0", "--sample_every", "0", *flags]
        argv += ["--max_new_tokens", str(L), "--min_new_tokens", str(L), "--filter", "none"] if L else \
            ["--max_new_tokens", "128"]
        res = subprocess.run([sys.executable, "-c", CHILD, json.dumps(argv)], capture_output=True, text=True,
                             cwd=root)
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("BENCH ")), None)
    if line is None:
        print(f"{code} {variant} G={G} len={L} failed:\n{res.stderr[-2000:]}")
        return
    result = json.loads(line[6:])
    rows = result["rows"][1:] or result["rows"]  # drop the warm-up step
    med = {k: statistics.median(r[k] for r in rows) for k in ("step_s", "gen_s", "score_s", "update_s", "tokens_per_s")}
    print(f"{code[:8]:>8} {variant[:9]:>9} {G:>3} {L:>4} {G * a.prompts_per_step:>5} | {med['step_s']:>7.2f} "
          f"{med['gen_s']:>6.2f} {med['score_s']:>7.2f} {med['update_s']:>8.2f} | {med['tokens_per_s']:>7.0f} | "
          f"{result['peak_mib']:>8.0f}", flush=True)


if __name__ == "__main__":
    main()
