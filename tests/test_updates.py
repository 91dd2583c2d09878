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


def test_k1_reproduces_the_update_before_the_flag(tmp_path):
    """K = 1 (the default) is the one-step update recorded before --updates_per_rollout existed: the same
    metrics to the last digit and the same final weights, bit for bit."""
    import pytest

    with open(REFERENCE) as f:
        ref = json.load(f)
    now = machine()
    if any(ref["machine"][k] != now[k] for k in ("torch", "machine", "cpu_capability")):
        pytest.skip(f"reference recorded with {ref['machine']}, this is {now}: re-record it from a known-good commit")
    for name in CONFIGS:
        rows, digest = run_config(name, tmp_path / name)
        expected = ref["runs"][name]
        assert [{k: r[k] for k in e} for r, e in zip(rows, expected["metrics"])] == expected["metrics"], name
        assert len(rows) == len(expected["metrics"]) and digest == expected["weights_sha256"], name


def test_update_slices_split_whole_groups():
    import pytest

    keep, G = torch.tensor([True, False, True, True, True, False, True]), 3
    kept = {i * G + g for i in range(7) if keep[i] for g in range(G)}
    for K in (1, 2, 5):
        slices = grpo.update_slices(keep, G, K, lockstep=False, generator=torch.Generator().manual_seed(1))
        rows = [r for part, _ in slices for r in part]
        assert len(slices) == K and sorted(rows) == sorted(kept)  # disjoint, every kept row once
        for part, w in slices:
            assert all(r // G == part[0] // G for r in part[:G]) and len(part) % G == 0  # whole groups
            assert torch.equal(w, torch.ones(len(part)))
        assert max(len(p) for p, _ in slices) - min(len(p) for p, _ in slices) <= G  # near-equal
    assert grpo.update_slices(keep, G, 1, lockstep=False)[0][0] == sorted(kept)  # K = 1: the rollout's order
    again = grpo.update_slices(keep, G, 2, lockstep=False, generator=torch.Generator().manual_seed(1))
    assert [p for p, _ in again] == [p for p, _ in grpo.update_slices(keep, G, 2, False, torch.Generator().manual_seed(1))]
    # fewer kept groups than K: the empty slices get group 0 at weight 0, so every process takes K steps
    few = grpo.update_slices(torch.tensor([False, True, False]), 2, 3, lockstep=False)
    assert [p for p, _ in few] == [[0, 1], [0, 1], [2, 3]] and [w.tolist() for _, w in few] == [[0, 0], [0, 0], [1, 1]]
    # lockstep: every group, filtered ones at weight 0, and the same slice sizes whatever the filter kept
    for mask in ([True] * 4, [False] * 4, [True, False, False, True]):
        lock = grpo.update_slices(torch.tensor(mask), 2, 3, lockstep=True, generator=torch.Generator().manual_seed(0))
        assert [len(p) for p, _ in lock] == [2, 2, 4]
        assert sum(w.sum().item() for _, w in lock) == 2 * sum(mask)
    with pytest.raises(Exception, match="updates_per_rollout"):
        grpo.check_args(grpo.Args(updates_per_rollout=5, prompts_per_step=4))
    with pytest.raises(Exception, match="verdict_reward"):  # a term of the paper's reward only
        grpo.check_args(grpo.Args(reward="grpo", verdict_reward=0.25))


def test_k4_clips_and_logs_every_optimizer_step(tmp_path):
    """K = 4 from the shipped base under plain GRPO: the first step of each rollout sees ratio 1 (pi_theta is
    still the sampling policy), the later ones a moved policy, so the clip acts within three rollouts; the
    schedule counts the 12 optimizer steps."""
    import math

    from machinery import dataset

    out = tmp_path / "k4"
    res = grpo.main(grpo.Args(out_dir=str(out), **{**COMMON, "prompts_per_step": 8}, reward="grpo",
                              updates_per_rollout=4))
    assert any(r["clip_frac"] > 0 for r in res["metrics"]), [r["clip_frac"] for r in res["metrics"]]
    updates = dataset.read_jsonl(out / "updates.jsonl")
    assert [(u["step"], u["update"], u["slice"]) for u in updates] == [(s, k, k) for s in (1, 2, 3) for k in (1, 2, 3, 4)]
    for u in updates:
        if u["update"] == 1 and u["rows"] > 0:
            assert abs(u["ratio_mean"] - 1) < 1e-5 and u["clip_frac"] == 0 and u["approx_kl"] < 1e-6
    assert any(u["ratio_max"] > 1.2 for u in updates)
    # the metrics row holds the rollout's last step; the rows trained on add up to the kept groups' responses
    for step, m in enumerate(res["metrics"], 1):
        mine = [u for u in updates if u["step"] == step]
        assert m["clip_frac"] == mine[-1]["clip_frac"] and m["ratio_max"] == mine[-1]["ratio_max"]
        assert sum(u["rows"] for u in mine) == round(m["groups_kept"] * 8) * 4
    # warm-up ceil(0.03 x 12) = 1 step, then the cosine over the other 11 down to 0.1 x lr
    lrs = [4e-4] + [4e-4 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (t - 1) / 11))) for t in range(1, 12)]
    assert len(updates) == len(lrs) and all(abs(u["lr"] - x) < 1e-12 for u, x in zip(updates, lrs))


def test_resume_under_k_is_bit_identical(tmp_path):
    from safetensors.torch import load_file

    from machinery import dataset

    kw = dict(COMMON, reward="grpo", updates_per_rollout=2, save_every=1, steps=3)
    grpo.main(grpo.Args(out_dir=str(tmp_path / "a"), **kw))
    grpo.main(grpo.Args(out_dir=str(tmp_path / "b"), stop_after=2, **kw))  # "killed" after rollout 2
    grpo.main(grpo.Args(out_dir=str(tmp_path / "b"), resume=True, **kw))
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for log in ("metrics.jsonl", "updates.jsonl"):
        rows_a, rows_b = (dataset.read_jsonl(tmp_path / d / log) for d in ("a", "b"))
        strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING} for r in rows]  # noqa: E731
        assert strip(rows_a) == strip(rows_b) and len(rows_a) == 3 * (2 if log == "updates.jsonl" else 1), log


def test_two_processes_take_the_k_steps_one_process_takes(tiny_model_dir, tmp_path):
    """K = 3 with the filter leaving process 1 a single group: it takes part in all three steps (two at weight
    0), and the weights move exactly as one process moves them on the union of the two processes' slices."""
    import subprocess

    from safetensors.torch import load_file

    worker = os.path.join(ROOT, "tests", "grpo_step_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    subprocess.run([sys.executable, worker, tiny_model_dir, str(one), "token-mean", "3", "2"], check=True, cwd=ROOT,
                   env=env, timeout=300)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", worker, tiny_model_dir,
           str(two), "token-mean", "3"]
    log = subprocess.run(cmd, cwd=ROOT, env=env, timeout=300, capture_output=True, text=True)
    assert log.returncode == 0, log.stdout[-3000:] + log.stderr[-3000:]
    a, b = load_file(one), load_file(two)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


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
