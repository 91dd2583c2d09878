"""03_grpo.py --updates_per_rollout K: one rollout split into K optimizer steps on disjoint slices of whole
groups, against pi_old (the sampling policy's log-probs). K = 1 must be the update as it was before the flag
existed, to the digit: tests/data/grpo_k1_reference.json holds that code's metrics and weights.

Re-record the reference (only from code whose K = 1 path is known to be right):
    OMP_NUM_THREADS=1 .venv/bin/python tests/test_updates.py
"""

import hashlib
import json
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import ROOT, load_script  # noqa: E402

grpo = load_script("03_grpo")
REFERENCE = os.path.join(ROOT, "tests", "data", "grpo_k1_reference.json")
BASE = os.path.join(ROOT, "toy", "base_model")  # the shipped base: fixed weights, no fixture to rebuild
TIMING = ("step_s", "gen_s", "score_s", "update_s", "tokens_per_s")  # wall-clock: not reproducible
# Two 3-step runs from the shipped base: plain GRPO at mu = 1 (the ratio is 1: the default update), and the
# paper's reward at mu = 2 with a k3 KL (pi_old and the reference log-probs computed before the steps).
CONFIGS = {
    "grpo_mu1": dict(reward="grpo"),
    "paper_mu2_kl": dict(reward="paper", mu=2, kl_coef=0.05),
}
COMMON = dict(model=BASE, seed=0, steps=3, prompts_per_step=4, group_size=4, max_new_tokens=48, train_size=40,
              save_every=0, sample_every=0, micro_batch=8)


def weights_digest(path):
    """sha256 over the saved tensors' names and bytes, in name order (the file's metadata aside)."""
    from safetensors.torch import load_file

    tensors, h = load_file(path), hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().numpy().tobytes())
    return h.hexdigest()


def run_config(name, out_dir, **extra):
    """(metric rows without their timings, digest of the final weights) of one reference config."""
    res = grpo.main(grpo.Args(out_dir=str(out_dir), **COMMON, **CONFIGS[name], **extra))
    rows = [{k: v for k, v in r.items() if k not in TIMING} for r in res["metrics"]]
    return rows, weights_digest(os.path.join(out_dir, "model.safetensors"))


def machine():
    """What the digits depend on besides the code: torch's build and the CPU's vector unit."""
    return {"torch": torch.__version__, "machine": platform.machine(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}


if __name__ == "__main__":
    import tempfile

    torch.set_num_threads(1)
    import subprocess

    code = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    out = {"command": "OMP_NUM_THREADS=1 .venv/bin/python tests/test_updates.py", "code": code,
           "common": {**COMMON, "model": os.path.relpath(BASE, ROOT)},
           "configs": CONFIGS, "machine": machine(), "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in CONFIGS:
            rows, digest = run_config(name, os.path.join(tmp, name))
            out["runs"][name] = {"metrics": rows, "weights_sha256": digest}
    with open(REFERENCE, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {REFERENCE}")
