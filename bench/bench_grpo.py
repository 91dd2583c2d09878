"""Benchmark (not a test): one GRPO step on the toy model, split into generation / scoring / update.

For each group size G and response length, runs a few steps of 03_grpo.py in a fresh process with
generation forced to that length, and prints the median step time split into its parts, tokens per
second and the process's peak memory (CPU: max RSS; GPU: peak allocated).

    OMP_NUM_THREADS=1 python bench/bench_grpo.py        # G in {4, 8, 16} x lengths {64, 128, 256}, fast and hf rollouts
    python bench/bench_grpo.py --groups 8 --lengths 256 --model runs/toy/sft
"""

import argparse
import json
import os
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
import cli
rows = grpo.main(cli.parse_args(grpo.Args))["metrics"]
peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print("BENCH " + json.dumps({"rows": rows, "peak_mib": peak}))
"""


def main():
    class Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass

    p = argparse.ArgumentParser(description=__doc__, formatter_class=Help)
    p.add_argument("--model", default="runs/toy/sft", help="policy that 03_grpo.py starts from")
    p.add_argument("--groups", default="4,8,16", help="group sizes G, comma-separated")
    p.add_argument("--lengths", default="64,128,256", help="forced response lengths in tokens, comma-separated")
    p.add_argument("--prompts_per_step", type=int, default=4, help="prompts per GRPO step (x G sequences)")
    p.add_argument("--steps", type=int, default=3, help="steps per setting; the first is dropped as warm-up")
    p.add_argument("--rollouts", default="fast,hf", help="03's --rollout values to compare, comma-separated")
    a = p.parse_args()
    print(f"{'rollout':>7} {'G':>3} {'len':>4} {'seqs':>5} | {'step s':>7} {'gen s':>6} {'score s':>7} {'update s':>8} | {'tok/s':>7} | {'peak MiB':>8}")
    for G in map(int, a.groups.split(",")):
        for L in map(int, a.lengths.split(",")):
            for rollout in a.rollouts.split(","):
                run(a, rollout, G, L)


def run(a, rollout, G, L):
    """A few steps of 03_grpo.py in a fresh process; prints the medians of steps 2.. and the peak memory."""
    with tempfile.TemporaryDirectory() as out:
        argv = ["--model", a.model, "--out_dir", out, "--steps", str(a.steps), "--group_size", str(G),
                "--prompts_per_step", str(a.prompts_per_step), "--max_new_tokens", str(L),
                "--min_new_tokens", str(L), "--save_every", "0", "--sample_every", "0",
                "--no-accuracy_filter", "--rollout", rollout]
        res = subprocess.run([sys.executable, "-c", CHILD, json.dumps(argv)], capture_output=True, text=True,
                             cwd=ROOT)
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("BENCH ")), None)
    if line is None:
        print(f"{rollout} G={G} len={L} failed:\n{res.stderr[-2000:]}")
        return
    result = json.loads(line[6:])
    rows = result["rows"][1:] or result["rows"]  # drop the warm-up step
    med = {k: statistics.median(r[k] for r in rows) for k in ("step_s", "gen_s", "score_s", "update_s", "tokens_per_s")}
    print(f"{rollout:>7} {G:>3} {L:>4} {G * a.prompts_per_step:>5} | {med['step_s']:>7.2f} {med['gen_s']:>6.2f} "
          f"{med['score_s']:>7.2f} {med['update_s']:>8.2f} | {med['tokens_per_s']:>7.0f} | {result['peak_mib']:>8.0f}")

if __name__ == "__main__":
    main()
