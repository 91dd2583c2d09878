"""Benchmark (not a test): peak memory of one GRPO step at the real vocabulary and length, on the CPU.

The 7B recipe's memory is dominated, after the weights, by what grows with vocabulary x length: the
logits of a micro-batch and their log-softmax. This rehearses exactly that without a GPU: a narrow
Qwen2.5-VL (2 layers, hidden 64) with Qwen2.5-VL's real vocabulary (152,064, untied lm_head as in 7B),
one step of 03_grpo.py with 1 prompt x G = 4 samples forced to 2,048 new tokens, --micro_batch 2, in a
fresh process; it prints that process's peak resident memory and 03's own estimate line.

    OMP_NUM_THREADS=1 python bench/bench_memory.py                 # ~2 minutes on 2 cores
    python bench/bench_memory.py --new_tokens 1024 --micro_batch 4
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

CHILD = r"""
import json, resource, sys
sys.argv = ["03_grpo.py"] + json.loads(sys.argv[1])
import importlib.util
spec = importlib.util.spec_from_file_location("grpo", "03_grpo.py")
grpo = importlib.util.module_from_spec(spec); sys.modules["grpo"] = grpo; spec.loader.exec_module(grpo)
from machinery import cli
rows = grpo.main(cli.parse_args(grpo.Args))["metrics"]
print("BENCH " + json.dumps({"rows": rows, "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def build(model_dir, vocab_size):
    """The narrow model with the real vocabulary and the toy processor, saved as 03 loads it."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    import bench_gpu
    from machinery import dataset
    import toy

    tok = toy.build_tokenizer(extra_texts=list(dataset.SYSTEM_PROMPTS.values()))
    config = bench_gpu.model_config(tok, tiny=True, vocab_size=vocab_size)
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.float32)
    ids = tok.convert_tokens_to_ids
    model.generation_config.eos_token_id = [ids("<|im_end|>"), ids("<|endoftext|>")]
    model.generation_config.pad_token_id = ids("<|endoftext|>")
    model.save_pretrained(model_dir)
    toy.ToyProcessor.build(tok).save_pretrained(model_dir)
    return sum(p.numel() for p in model.parameters())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab_size", type=int, default=152064, help="vocabulary (Qwen2.5-VL's: 152,064)")
    p.add_argument("--new_tokens", type=int, default=2048, help="forced response length (the 7B recipe's cap)")
    p.add_argument("--group_size", type=int, default=4, help="samples of the one prompt")
    p.add_argument("--micro_batch", type=int, default=2, help="03's --micro_batch")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = os.path.join(tmp, "model")
        n = build(model_dir, a.vocab_size)
        argv = ["--model", model_dir, "--out_dir", os.path.join(tmp, "out"), "--steps", "1", "--prompts_per_step", "1",
                "--group_size", str(a.group_size), "--max_new_tokens", str(a.new_tokens),
                "--min_new_tokens", str(a.new_tokens), "--micro_batch", str(a.micro_batch), "--reward", "grpo",
                "--filter", "none", "--save_every", "0", "--sample_every", "0", "--train_size", "8"]
        t = time.time()
        res = subprocess.run([sys.executable, "-c", CHILD, json.dumps(argv)], capture_output=True, text=True,
                             cwd=ROOT)
        seconds = time.time() - t
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("BENCH ")), None)
    if line is None:
        sys.exit(f"the GRPO step failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
    result = json.loads(line[6:])
    row = result["rows"][0]
    estimate = next((ln for ln in res.stdout.splitlines() if ln.startswith("memory estimate")), "(no estimate line)")
    print(f"model: {n / 1e6:.1f}M parameters, vocabulary {a.vocab_size}; 1 prompt x {a.group_size} x "
          f"{a.new_tokens} forced tokens, --micro_batch {a.micro_batch}")
    print(estimate)
    print(f"peak resident memory of the GRPO process: {result['peak_gib']:.2f} GiB "
          f"(step {row['step_s']:.1f} s: generation {row['gen_s']:.1f} s, update {row['update_s']:.1f} s; "
          f"whole process {seconds:.0f} s)")
    print(f"this process (model building): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
