"""Benchmark (not a test): our GRPO loop on a random-weight Qwen2.5-VL-7B on one GPU, and its decode
speed against the memory-bandwidth floor.

Phases, each printed (and saved to OUT/results.json) as soon as it ends, so a cut-off run still
reports what it finished; GRPO runs that no longer fit the time budget are skipped:
  1. device-to-device copy bandwidth (bytes read + written);
  2. build the 7B architecture (the sizes of Qwen2.5-VL-7B-Instruct's config.json, `model_config`) with
     random bf16 weights on the GPU, save it with save_pretrained plus the official Qwen2.5-VL processor around the toy tokenizer;
  3. GRPO runs of 03_grpo.py (a fresh process each; --load_in_4bit --lora_r 16, G = 8, generation
     forced to 256 tokens, toy problems with images upscaled to 448x448 = 256 image tokens):
       p1gc  1 prompt x 8, 3 steps, gradient checkpointing (a 24 GB card's setting;
             the first step is warm-up)
       p1    1 prompt x 8, 2 steps, no gradient checkpointing (what checkpointing saves and costs)
       p4    4 prompts x 8, 2 steps, gradient checkpointing
     per step: time split into generation / scoring / update, tokens/s, peak allocated memory;
  4. decode floor: bytes the language model reads per decode step (nf4 packed weights + quant
     statistics + LoRA + norms + bf16 lm_head, as stored) / copy bandwidth, against the measured
     ms per generated token (generation s / 256).

    bash gpu_check.sh                                   # on the GPU machine: wheels, versions, this script
    python bench/bench_gpu.py --budget_s 360 --out $OUT       # what gpu_check.sh runs (budget: what is left of 7 min)
    python bench/bench_gpu.py --runs p1 --budget_s 300        # only the main setting
    bash gpu_check.sh --runs p1 --reuse_model           # a rerun on the same warm machine: skip the build
    OMP_NUM_THREADS=1 python bench/bench_gpu.py --tiny        # CPU smoke test: tiny model, same code path (~40 s;
                                                        # the toy processor stands in where torchvision is missing)
    OMP_NUM_THREADS=1 python bench/bench_gpu.py --tiny --no-load_in_4bit
"""

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
sys.path.insert(0, HERE)

from machinery import cli, dataset, policy, rollout  # noqa: E402 (the repository's modules, after the path)
import toy  # noqa: E402

# name: (prompts per step, steps, gradient checkpointing, seconds left needed to start it)
RUNS = {"p1gc": (1, 3, True, 0), "p1": (1, 2, False, 120), "p4": (4, 2, True, 170)}


def model_config(tok, tiny=False, vocab_size=0):
    """Qwen2.5-VL-7B-Instruct's architecture (the sizes of its config.json), or a tiny one with the same
    structure; vocab_size overrides the vocabulary (e.g. the tiny one with the real 152,064)."""
    from transformers import Qwen2_5_VLConfig

    ids = tok.convert_tokens_to_ids
    if tiny:  # vocab > the toy tokenizer's, as in the 7B case, so ids it cannot decode get sampled too
        text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=4096, mrope=[2, 3, 3])
        vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=64,
                      fullatt_block_indexes=[1])
    else:
        text = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                    num_key_value_heads=4, vocab_size=152064, mrope=[16, 24, 24])
        vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                      fullatt_block_indexes=[7, 15, 23, 31])
    mrope = text.pop("mrope")
    text["vocab_size"] = vocab_size or text["vocab_size"]
    return Qwen2_5_VLConfig(
        text_config=dict(**text, rms_norm_eps=1e-6, max_position_embeddings=128000, hidden_act="silu",
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope},
                         bos_token_id=None, eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>")),
        vision_config=dict(**vision, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           hidden_act="silu", in_channels=3),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False)


def build_processor(tok, image_size):
    """The official Qwen2_5_VLProcessor; the toy one (same outputs) where torchvision is missing (CPU here)."""
    try:
        from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor
        from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

        return Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=tok,
                                   video_processor=Qwen2VLVideoProcessor(), chat_template=tok.chat_template)
    except Exception as e:  # noqa: BLE001 (any failure: fall back, say so)
        import toy
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        print(f"official processor unavailable ({type(e).__name__}: {str(e)[:120]}); using toy.ToyProcessor")
        return toy.ToyProcessor(tok, Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=image_size ** 2))


def build_model(a, device):
    """Random-weight model + processor saved to a.model_dir. Returns timings and sizes."""
    from PIL import Image
    from transformers import Qwen2_5_VLForConditionalGeneration

    t0 = time.time()
    tok = toy.build_tokenizer(extra_texts=list(dataset.SYSTEM_PROMPTS.values()))
    config = model_config(tok, a.tiny)
    t1 = time.time()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype)
    ids = tok.convert_tokens_to_ids
    model.generation_config.eos_token_id = [ids("<|im_end|>"), ids("<|endoftext|>")]
    model.generation_config.pad_token_id = ids("<|endoftext|>")
    if device == "cuda":
        torch.cuda.synchronize()
    t2 = time.time()
    n = sum(p.numel() for p in model.parameters())
    n_vis = sum(p.numel() for p in model.model.visual.parameters())
    assert model.lm_head.weight.data_ptr() != model.model.language_model.embed_tokens.weight.data_ptr(), "tied"
    shutil.rmtree(a.model_dir, ignore_errors=True)
    model.save_pretrained(a.model_dir)
    processor = build_processor(tok, a.image_size)
    processor.save_pretrained(a.model_dir)
    t3 = time.time()
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    # Check the saved processor the way 03 loads it: one image -> (image_size / 28)^2 image tokens.
    proc = policy.load_processor(a.model_dir)
    enc = dataset.encode_prompts(proc, ["How many red dots are there?"], [Image.new("RGB", (a.image_size,) * 2)],
                                dataset.SYSTEM_PROMPTS["reflect"])
    n_img = int((enc["input_ids"] == ids("<|image_pad|>")).sum())
    assert n_img == (a.image_size // 28) ** 2, n_img
    return {"params_B": n / 1e9, "vision_params_B": n_vis / 1e9, "tokenizer_s": t1 - t0, "init_s": t2 - t1,
            "save_s": t3 - t2, "processor": type(proc).__name__, "prompt_tokens": enc["input_ids"].shape[1],
            "image_tokens": n_img, "disk_GB": sum(os.path.getsize(os.path.join(a.model_dir, f))
                                                  for f in os.listdir(a.model_dir)) / 1e9}


def write_prompts(path, n, image_size):
    """Toy RL prompts as the local JSONL 03 reads (--data), images upscaled to image_size x image_size."""
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "w").close()
    for i in range(n):
        p = toy.make_problem(2000 + i)  # toy_dataset("train", seed=1)'s seeds
        name = f"img{i}.png"
        p["image"].resize((image_size, image_size), Image.BICUBIC).save(os.path.join(os.path.dirname(path), name))
        dataset.append_jsonl(path, {"id": p["id"], "question": p["question"], "answer": p["answer"],
                                   "choices": p["choices"], "image": name})


def copy_bandwidth(device, nbytes, iters=20):
    """Device-to-device copy, bytes read + written per second."""
    a = torch.empty(nbytes, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(3):
        b.copy_(a)
    sync()
    t = time.perf_counter()
    for _ in range(iters):
        b.copy_(a)
    sync()
    return 2 * nbytes * iters / (time.perf_counter() - t)


def weight_bytes(model):
    """Bytes of the model's weights as stored, by part. A decode step reads 'language_model' and
    'lm_head' once each, and only B rows of 'embed_tokens'."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    out = {"language_model": 0, "lm_head": 0, "embed_tokens": 0, "visual": 0, "language_model_params": 0}
    for name, t in list(base.named_parameters()) + list(base.named_buffers()):
        part = next((k for k in ("visual", "embed_tokens", "lm_head") if k in name), "language_model")
        n = t.numel() * t.element_size()
        qs = getattr(t, "quant_state", None)  # bitsandbytes nf4: packed uint8 + absmax (+ its own absmax)
        if qs is not None:
            n += qs.absmax.numel() * qs.absmax.element_size() + qs.code.numel() * qs.code.element_size()
            if getattr(qs, "state2", None) is not None:
                n += qs.state2.absmax.numel() * qs.state2.absmax.element_size()
        out[part] += n
        if part == "language_model" and name.endswith("weight") and "lora_" not in name:
            out["language_model_params"] += t.numel() * (2 if qs is not None else 1)  # nf4: 2 per byte
    return out


def child(cfg):
    """Runs in a fresh process: 03_grpo.main with load, generation and metric rows instrumented."""
    import importlib.util

    sys.argv = ["03_grpo.py"] + cfg["argv"]
    spec = importlib.util.spec_from_file_location("grpo", os.path.join(HERE, "03_grpo.py"))
    grpo = importlib.util.module_from_spec(spec)
    sys.modules["grpo"] = grpo  # parse_args looks the dataclass's module up by name
    spec.loader.exec_module(grpo)
    cuda = torch.cuda.is_available()
    gib = (lambda: torch.cuda.max_memory_allocated() / 2**30) if cuda else (lambda: 0.0)
    reserved = (lambda: torch.cuda.max_memory_reserved() / 2**30) if cuda else (lambda: 0.0)
    peak = {"run": 0.0, "gen": 0.0, "reserved": 0.0}
    load, gen, append = policy.load_policy, rollout.generate, dataset.append_jsonl

    def load_policy(*args, **kw):
        t = time.time()
        model, processor = load(*args, **kw)
        w = {**weight_bytes(model), "load_s": time.time() - t, "alloc_after_load_gib": gib()}
        with open(os.path.join(cfg["out"], "weights.json"), "w") as f:
            json.dump(w, f)
        print("WEIGHTS " + json.dumps(w), flush=True)
        return model, processor

    def generate(*args, **kw):  # peak of generation alone, then of scoring + update
        peak["run"], peak["reserved"] = max(peak["run"], gib()), max(peak["reserved"], reserved())
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        res = gen(*args, **kw)
        peak["gen"], peak["reserved"] = gib(), max(peak["reserved"], reserved())
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        return res

    def append_jsonl(path, row):
        if path.endswith("metrics.jsonl"):
            upd = gib()
            peak["run"], peak["reserved"] = max(peak["run"], peak["gen"], upd), max(peak["reserved"], reserved())
            row = {**row, "peak_gen_gib": peak["gen"], "peak_update_gib": upd, "peak_gib": peak["run"],
                   "peak_reserved_gib": peak["reserved"]}
        append(path, row)

    policy.load_policy, rollout.generate, dataset.append_jsonl = load_policy, generate, append_jsonl
    grpo.main(cli.parse_args(grpo.Args))


def run_grpo(a, name, data, deadline):
    """One 03_grpo.py run in a fresh process, cut off at `deadline`. Returns its summary (or None)."""

    P, steps, ckpt, need = RUNS[name]
    left = deadline - time.time()
    if left < need * (0.25 if a.tiny else 1):
        print(f"\n== {name}: skipped, {left:.0f} s left < {need} s needed")
        return None
    out = os.path.join(a.work, name)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    steps = 1 if a.tiny else steps
    argv = ["--model", a.model_dir, "--out_dir", out, "--data", data, "--steps", str(steps),
            "--prompts_per_step", str(P), "--group_size", str(a.group_size), "--max_new_tokens", str(a.new_tokens),
            "--min_new_tokens", str(a.new_tokens), "--save_every", "0", "--sample_every", "0",
            "--filter", "none", "--lora_r", "16"] + (["--load_in_4bit"] if a.load_in_4bit else []) \
        + (["--gradient_checkpointing"] if ckpt else [])
    print(f"\n== {name}: {P} prompt(s) x G={a.group_size}, {steps} step(s), {a.new_tokens} tokens, "
          f"4-bit={a.load_in_4bit}, grad ckpt={ckpt}; {left:.0f} s left\n   03_grpo.py {' '.join(argv)}", flush=True)
    t = time.time()
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child",
                             json.dumps({"argv": argv, "out": out})], cwd=HERE)
    try:
        rc = proc.wait(timeout=max(1.0, left))
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = proc.wait()
        print(f"   {name}: cut off at the time budget after {time.time() - t:.0f} s")
    rows = dataset.read_jsonl(os.path.join(out, "metrics.jsonl"))
    wpath = os.path.join(out, "weights.json")
    weights = json.load(open(wpath)) if os.path.exists(wpath) else None
    if not rows:
        print(f"   {name}: no step finished (exit code {rc})")
        return {"rc": rc, "weights": weights, "rows": [], "wall_s": time.time() - t}
    timed = rows[1:] or rows  # the first step is warm-up
    keys = ("step_s", "gen_s", "score_s", "update_s", "tokens_per_s")
    med = {k: statistics.median(r[k] for r in timed) for k in keys}
    med["decode_ms_per_token"] = 1e3 * med["gen_s"] / a.new_tokens
    peak, peak_res = max(r["peak_gib"] for r in rows), max(r["peak_reserved_gib"] for r in rows)
    print(f"   {'step':>4} {'step s':>7} {'gen s':>6} {'score s':>7} {'upd s':>6} {'tok/s':>6} "
          f"{'peak gen GiB':>12} {'peak upd GiB':>12} {'peak GiB':>8}")
    for r in rows:
        print(f"   {r['step']:>4} {r['step_s']:>7.2f} {r['gen_s']:>6.2f} {r['score_s']:>7.2f} {r['update_s']:>6.2f} "
              f"{r['tokens_per_s']:>6.1f} {r['peak_gen_gib']:>12.2f} {r['peak_update_gib']:>12.2f} {r['peak_gib']:>8.2f}")
    print(f"   {name} median of {len(timed)} timed step(s): step {med['step_s']:.2f} s = gen {med['gen_s']:.2f} + "
          f"score {med['score_s']:.2f} + update {med['update_s']:.2f}; {med['tokens_per_s']:.1f} tokens/s; "
          f"{med['decode_ms_per_token']:.1f} ms per generated token; peak allocated {peak:.2f} GiB, reserved "
          f"{peak_res:.2f} GiB ({'fits' if peak_res <= 24 else 'does NOT fit'} in 24 GiB); exit code {rc}, "
          f"wall {time.time() - t:.0f} s")
    return {"rc": rc, "weights": weights, "rows": rows, "median": med, "peak_gib": peak, "peak_reserved_gib": peak_res,
            "wall_s": time.time() - t}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny model, 112-px images, 16 tokens, 1 step (CPU smoke test)")
    p.add_argument("--runs", default="p1gc,p1,p4", help=f"GRPO runs in order, from {list(RUNS)}")
    p.add_argument("--budget_s", type=float, default=375, help="wall-clock budget of the whole script")
    p.add_argument("--out", default=os.environ.get("OUT") or "/tmp/bench_gpu_out", help="results.json goes here")
    p.add_argument("--work", default="/tmp/bench_gpu", help="prompts and run directories")
    p.add_argument("--model_dir", default=None, help="where the random model is saved (default /tmp/qwen7b-random)")
    p.add_argument("--group_size", type=int, default=8)
    p.add_argument("--new_tokens", type=int, default=None, help="forced response length (256; tiny: 16)")
    p.add_argument("--image_size", type=int, default=None, help="image side in pixels (448; tiny: 112)")
    p.add_argument("--load_in_4bit", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--reuse_model", action="store_true", help="keep a model already saved in --model_dir (a rerun)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(json.loads(a.child))
    deadline = time.time() + a.budget_s
    a.model_dir = a.model_dir or ("/tmp/qwen-tiny-random" if a.tiny else "/tmp/qwen7b-random")
    a.new_tokens = a.new_tokens or (16 if a.tiny else 256)
    a.image_size = a.image_size or (112 if a.tiny else 448)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not a.tiny:
        sys.exit("no GPU: the 7B model needs one (use --tiny for the CPU smoke test)")
    os.makedirs(a.out, exist_ok=True)
    res = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "args": vars(a), "runs": {}}

    def save():
        with open(os.path.join(a.out, "results.json"), "w") as f:
            json.dump(res, f, indent=1)

    import transformers
    print(f"{res['device']}: torch {torch.__version__}, transformers {transformers.__version__}", flush=True)

    bw = copy_bandwidth(device, 2**30 if device == "cuda" else 2**26)
    res["copy_GBps"] = bw / 1e9
    print(f"device-to-device copy: {bw / 1e9:,.0f} GB/s (read + written)", flush=True)
    save()

    if a.reuse_model and os.path.exists(os.path.join(a.model_dir, "config.json")):
        print(f"reusing the model in {a.model_dir}")
    else:
        res["build"] = b = build_model(a, device)
        print(f"built {b['params_B']:.3f} B parameters ({b['vision_params_B']:.3f} B vision): tokenizer "
              f"{b['tokenizer_s']:.1f} s, init {b['init_s']:.1f} s, save {b['save_s']:.1f} s ({b['disk_GB']:.1f} GB); "
              f"{b['processor']}, {b['prompt_tokens']} prompt tokens of which {b['image_tokens']} image tokens",
              flush=True)
    data = os.path.join(a.work, "data", "prompts.jsonl")
    write_prompts(data, 16, a.image_size)
    save()

    for name in a.runs.split(","):
        r = run_grpo(a, name, data, deadline)
        if r is None:
            continue
        res["runs"][name] = r
        w, med = r["weights"], r.get("median")
        if w and med and "floor" not in res:  # decode floor, from the first run with a timed step
            read = w["language_model"] + w["lm_head"]
            floor_ms = 1e3 * read / bw
            res["floor"] = {"run": name, "bytes_per_decode_step": read, "floor_ms": floor_ms,
                            "measured_ms": med["decode_ms_per_token"], "ratio": floor_ms / med["decode_ms_per_token"],
                            "bf16_bytes": 2 * w["language_model_params"] + w["lm_head"]}
            f = res["floor"]
            print(f"\n== decode floor ({name}): a step reads {read / 1e9:.2f} GB (language model {w['language_model'] / 1e9:.2f}"
                  f" + lm_head {w['lm_head'] / 1e9:.2f}; embed table {w['embed_tokens'] / 1e9:.2f} not counted, B rows"
                  f" read) -> floor {floor_ms:.2f} ms at {bw / 1e9:,.0f} GB/s; measured {f['measured_ms']:.1f} ms per "
                  f"token (gen s / {a.new_tokens}, prefill included): floor/measured = {100 * f['ratio']:.1f}% "
                  f"(target >= 30%); bf16 weights would read {f['bf16_bytes'] / 1e9:.2f} GB", flush=True)
        save()
    print(f"\ndone in {a.budget_s - (deadline - time.time()):.0f} s; results in {os.path.join(a.out, 'results.json')}")


if __name__ == "__main__":
    main()
