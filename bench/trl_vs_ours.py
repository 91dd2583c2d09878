"""Benchmark (not a test): our GRPO step (03_grpo.py) against TRL's GRPOTrainer, same work, side by side.

For each forced response length, runs a few GRPO steps of each trainer, each in a fresh process of
its own, with the same toy policy; the same prompts in the same order (03's own sampler picks them,
TRL reads them in order from a dataset); the same system prompt, question text and image; the same
group size G and forced length (min_new_tokens = max_new_tokens); full fine-tuning of the language
model with the vision tower frozen (or LoRA, --lora_r); the same KL coefficient (ours --kl_coef,
TRL beta); temperature 1; one optimizer step per rollout (ours mu=1, TRL num_iterations=1) on
prompts x G sequences, log-probs in micro-batches of --micro_batch. Both score with 03's reward
(rewards.srpo_reward), timed apart as score_s. Prints both sides' settings as each read them, the
versions, and for both: the median step time (the first step dropped as warm-up), generated tokens
per second of step, the generation share of the step, the peak memory of the process (max RSS; one
process per side) and ours/TRL.

TRL is for this benchmark only, never in requirements.txt: it goes into a git-ignored folder, and
only the TRL child puts that folder on sys.path. The script installs it itself when the folder is
missing (TRL's other dependencies are already in the venv, so --no-deps leaves the venv alone);
by hand:
    .venv/bin/pip install --target .bench/trl --no-deps trl==1.16.0

Examples (defaults: toy/base_model, 4 prompts x G=8, lengths 64 and 128, 4 steps, 1 thread):
    python bench/trl_vs_ours.py
    python bench/trl_vs_ours.py --lengths 128 --lora_r 16 --kl_coef 0.04 --ours_args "--rollout hf"
"""

import argparse
import importlib.util
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRL_VERSION = "1.16.0"
TRL_DIR = os.path.join(ROOT, ".bench", "trl")
INSTALL = [sys.executable, "-m", "pip", "install", "--quiet", "--target", TRL_DIR, "--no-deps",
           f"trl=={TRL_VERSION}"]
TIMES = ("step_s", "gen_s", "score_s", "tokens_per_s")


# ----------------------------------------------------------------------------------------------
# The parent: build the shared flags, run one child per side and length, print the tables


def main():
    class Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass

    p = argparse.ArgumentParser(description=__doc__, formatter_class=Help)
    p.add_argument("--model", default="toy/base_model", help="policy both trainers start from")
    p.add_argument("--lengths", default="64,128", help="forced response lengths in tokens, comma-separated")
    p.add_argument("--group_size", type=int, default=8, help="G, responses per prompt")
    p.add_argument("--prompts_per_step", type=int, default=4, help="prompts per GRPO step (x G sequences)")
    p.add_argument("--steps", type=int, default=4, help="steps per side; the first is dropped as warm-up")
    p.add_argument("--micro_batch", type=int, default=0, help="sequences per log-prob pass (ours "
                   "--micro_batch, TRL per_device_train_batch_size); 0 = all prompts x G at once")
    p.add_argument("--lora_r", type=int, default=0, help="LoRA rank; 0 = full fine-tuning of the LM")
    p.add_argument("--kl_coef", type=float, default=0.0, help="KL coefficient (ours --kl_coef, TRL beta)")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of both children")
    p.add_argument("--ours_args", default="", help='extra flags for 03_grpo.py only, e.g. "--rollout hf"')
    p.add_argument("--sides", default="ours,trl", help="which trainers to run, comma-separated")
    a = p.parse_args()
    sides = a.sides.split(",")
    if "trl" in sides:
        ensure_trl()
    lengths = [int(x) for x in a.lengths.split(",")]
    seqs = a.prompts_per_step * a.group_size
    results = {}
    for L in lengths:
        # The flags both sides share: ours runs 03 with them, TRL's child parses the same flags with 03's
        # Args (so data, seed, system prompt, reward and sampling cannot drift) and maps them onto GRPOConfig.
        argv = ["--model", a.model, "--steps", str(a.steps), "--group_size", str(a.group_size),
                "--prompts_per_step", str(a.prompts_per_step), "--max_new_tokens", str(L),
                "--min_new_tokens", str(L), "--micro_batch", str(a.micro_batch or seqs),
                "--lora_r", str(a.lora_r), "--kl_coef", str(a.kl_coef), "--temperature", "1.0", "--mu", "1",
                "--save_every", "0", "--sample_every", "0",
                "--filter", "none"]  # every group trains, on both sides
        for side in sides:
            with tempfile.TemporaryDirectory() as out:
                extra = shlex.split(a.ours_args) if side == "ours" else []  # flags TRL's side has no use for
                cfg = {"argv": argv + ["--out_dir", out] + extra}
                results[L, side] = run_child(side, cfg, a.threads, a.steps)
        if L == lengths[0]:  # the settings of the first length stand for all
            print_settings(argv, a, results.get((L, "ours")), results.get((L, "trl")))
    print_table(results, seqs, sides)


def ensure_trl():
    """Install TRL into .bench/trl (never the venv) when missing, and check that the venv's torch and
    transformers are the same before and after."""
    if os.path.isdir(os.path.join(TRL_DIR, "trl")):
        return
    probe = [sys.executable, "-c",
             "import importlib.metadata as m; print(m.version('torch'), m.version('transformers'))"]
    before = subprocess.run(probe, capture_output=True, text=True).stdout.strip()
    print(f"installing TRL {TRL_VERSION} into {os.path.relpath(TRL_DIR, ROOT)}: "
          f"pip {shlex.join(INSTALL[4:])}")
    subprocess.run(INSTALL, check=True)
    after = subprocess.run(probe, capture_output=True, text=True).stdout.strip()
    if before != after:
        sys.exit(f"the TRL install changed the venv's torch / transformers: {before} -> {after}")


def run_child(side, cfg, threads, steps):
    """Run one side in a fresh process (this file with --child); its timings, settings and peak RSS."""
    # The same thread count for both (read when torch starts), so that the CPU comparison is fair.
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", side, json.dumps(cfg)],
                         capture_output=True, text=True, cwd=ROOT, env=env)
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("BENCH ")), None)
    if line is None:
        print(f"{side} failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
        return None
    data = json.loads(line[len("BENCH "):])
    if len(data["rows"]) != steps:
        print(f"warning: {side} timed {len(data['rows'])} steps, {steps} asked")
    rows = data["rows"][1:] or data["rows"]  # drop the warm-up step
    data["med"] = {k: statistics.median(r[k] for r in rows) for k in TIMES}
    return data


def print_settings(argv, a, ours, trl):
    """Both sides' settings, row by row, as each child read them, so that a reader sees they match."""
    print("ours: 03_grpo.py " + shlex.join(argv + shlex.split(a.ours_args)))
    if trl:
        print("versions: " + ", ".join(f"{k} {v}" for k, v in trl["versions"].items())
              + f"; {a.threads} thread(s)")
    names = ("ours (03_grpo.py)", "TRL (GRPOTrainer)")
    cells = {}
    for i, d in enumerate((ours, trl)):
        for k, v in (d["settings"] if d else {}).items():
            cells.setdefault(k, ["-", "-"])[i] = str(v)
    width = max(map(len, cells), default=0)
    col = max([len(names[0])] + [len(o) for o, _ in cells.values()])
    print(f"\n{'':<{width}}   {names[0]:<{col}} | {names[1]}")
    for k, (o, t) in cells.items():
        print(f"{k:<{width}}   {o:<{col}} | {t}")
    print()


def print_table(results, seqs, sides):
    print(f"{'len':>4} {'side':>8} {'seqs':>5} | {'step s':>7} {'gen s':>6} {'gen %':>6} {'score s':>7} | "
          f"{'tok/s':>7} | {'peak MiB':>8}")
    for (L, side), d in results.items():
        if d is None:
            print(f"{L:>4} {side:>8}   failed")
            continue
        m = d["med"]
        print(f"{L:>4} {side:>8} {seqs:>5} | {m['step_s']:>7.2f} {m['gen_s']:>6.2f} "
              f"{100 * m['gen_s'] / m['step_s']:>5.0f}% {m['score_s']:>7.3f} | {m['tokens_per_s']:>7.0f} | "
              f"{d['peak_mib']:>8.0f}")
        ours, trl = results.get((L, "ours")), results.get((L, "trl"))
        if side == sides[-1] and ours and trl:
            o, t = ours["med"], trl["med"]
            print(f"{L:>4} {'ours/TRL':>8} {'':>5} | {o['step_s'] / t['step_s']:>7.2f} "
                  f"{o['gen_s'] / t['gen_s']:>6.2f} {'':>6} {'':>7} | "
                  f"{o['tokens_per_s'] / t['tokens_per_s']:>7.2f} | "
                  f"{ours['peak_mib'] / trl['peak_mib']:>8.2f}")
    print("median over steps 2.. (the first is warm-up); peak = max RSS of the side's process; "
          "ours/TRL < 1 in step s = ours faster")


# ----------------------------------------------------------------------------------------------
# The children (run as `python bench/trl_vs_ours.py --child ours|trl CONFIG_JSON`, from the repo root)


def load_grpo():
    spec = importlib.util.spec_from_file_location("grpo", os.path.join(ROOT, "03_grpo.py"))
    grpo = importlib.util.module_from_spec(spec)
    sys.modules["grpo"] = grpo
    spec.loader.exec_module(grpo)
    return grpo


def count_optimized_params():
    """Record how many parameters each AdamW is built on, the same way on both sides: the check that
    both train the same weights. Returns the list the counts go to."""
    import torch

    counts, init = [], torch.optim.AdamW.__init__

    def counting_init(self, params, *args, **kwargs):
        params = list(params)
        groups = params if params and isinstance(params[0], dict) else [{"params": params}]
        counts.append(sum(p.numel() for g in groups for p in g["params"]))
        init(self, params, *args, **kwargs)

    torch.optim.AdamW.__init__ = counting_init
    return counts


def report(rows, settings, counts, **extra):
    settings["trainable params"] = counts[-1] if counts else None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB -> MiB
    print("BENCH " + json.dumps({"rows": rows, "settings": settings, "peak_mib": peak, **extra}), flush=True)


def ours_child(cfg):
    from machinery import cli

    counts = count_optimized_params()
    grpo = load_grpo()
    a = cli.parse_args(grpo.Args, cfg["argv"])
    rows = grpo.main(a)["metrics"]  # 03 logs step_s, gen_s, score_s, tokens_per_s per step
    full = f"min_new_tokens = max_new_tokens = {a.max_new_tokens}"
    settings = {
        "sequences / optimizer step": f"prompts_per_step x group_size = {a.prompts_per_step * a.group_size}",
        "responses per prompt": f"group_size = {a.group_size}",
        "forced length": full if a.min_new_tokens == a.max_new_tokens
                         else f"{a.min_new_tokens}..{a.max_new_tokens}",
        "log-prob micro-batch": f"micro_batch = {a.micro_batch}",
        "optimizer steps / rollout": f"mu = {a.mu}" + (" (no old-log-prob pass)" if a.mu == 1 else ""),
        "KL coefficient": f"kl_coef = {a.kl_coef}",
        "LoRA": f"lora_r = {a.lora_r}" if a.lora_r else "none (full LM, vision frozen)",
        "sampling": f"T = {a.temperature}, top_p = {a.top_p}, top_k = 0",
        "clip epsilon": f"clip_eps = {a.clip_eps}",
        "loss aggregation": f"loss_agg = {a.loss_agg}",
        "grad checkpointing / half": f"{a.gradient_checkpointing} / no (fp32 on a CPU)",
        "reward": f"rewards.srpo_reward, variant {a.reward}",
        "generation": f"--rollout {a.rollout}",
    }
    report([{k: r[k] for k in TIMES} for r in rows], settings, counts)


def trl_child(cfg):
    counts = count_optimized_params()
    sys.path.insert(0, TRL_DIR)  # TRL from its own folder, only in this process
    import datasets
    import torch
    import transformers
    import trl
    from transformers import ProcessorMixin, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from machinery import cli, dataset, policy
    import rewards
    from machinery import rollout

    class ToyProcessorForTRL(ProcessorMixin):
        """toy.ToyProcessor as TRL's GRPOTrainer needs a processor to be. Why an adapter:
        (1) GRPOTrainer takes its vision-language path only for a ProcessorMixin (anything that is
        neither that nor a tokenizer is a TypeError), and ToyProcessor is a plain class;
        (2) TRL tokenizes prompts with apply_chat_template(batch, tokenize=True, return_dict=True) and
        expects the processor to take the images out of the messages and return per-prompt, unpadded
        input_ids (image tokens expanded) with pixel_values, image_grid_thw and mm_token_type_ids;
        ToyProcessor.apply_chat_template only renders text. Every tensor still comes from
        ToyProcessor, so both trainers feed the model the same inputs. ProcessorMixin.__init__ is not
        called: it checks the sub-processors' classes against a registry that knows nothing of the toy."""

        def __init__(self, toy_processor):
            self.toy, self.tokenizer = toy_processor, toy_processor.tokenizer
            self.image_processor = toy_processor.image_processor
            self.chat_template = toy_processor.chat_template

        def __call__(self, images=None, text=None, **kw):
            # TRL passes one list of images per prompt; ToyProcessor takes them flat, in prompt order.
            flat = [im for ims in images or [] for im in (ims if isinstance(ims, list) else [ims])] or None
            return self.toy(text=text, images=flat, **kw)

        def apply_chat_template(self, conversation, tokenize=False, add_generation_prompt=False, **kw):
            batched = isinstance(conversation[0], list)
            convs = conversation if batched else [conversation]
            texts = [self.tokenizer.apply_chat_template(c, tokenize=False,
                                                        add_generation_prompt=add_generation_prompt)
                     for c in convs]
            if not tokenize:
                return texts if batched else texts[0]
            images = [part["image"] for c in convs for m in c if isinstance(m["content"], list)
                      for part in m["content"] if part.get("type") == "image"]
            enc = self.toy(text=texts, images=images or None, padding=True, return_tensors="pt",
                           padding_side="left")
            keep = enc["attention_mask"].bool()  # unpadded again: TRL pads the prompts itself
            out = {k: [row[m].tolist() for row, m in zip(enc[k], keep)]
                   for k in ("input_ids", "mm_token_type_ids")}
            out.update({k: enc[k] for k in ("pixel_values", "image_grid_thw") if k in enc})
            return out

        def batch_decode(self, *args, **kw):
            return self.tokenizer.batch_decode(*args, **kw)

        def decode(self, *args, **kw):
            return self.tokenizer.decode(*args, **kw)

    class TimedGRPO(GRPOTrainer):
        """Splits TRL's step the way 03 logs its own: generation (encoding the prompts and images,
        generate, decode) and scoring; counts the generated tokens."""

        gen_s, score_s, n_tokens = [], [], []

        def _generate(self, prompts):
            t = time.perf_counter()
            out = super()._generate(prompts)
            self.gen_s.append(time.perf_counter() - t)
            self.n_tokens.append(sum(len(ids) for ids in out[1]))  # completion ids, up to and with EOS
            return out

        def _calculate_rewards(self, *args, **kw):
            t = time.perf_counter()
            out = super()._calculate_rewards(*args, **kw)
            self.score_s.append(time.perf_counter() - t)
            return out

    class Clock(TrainerCallback):
        """A step is the time from one optimizer step to the next, so that fetching the batch (and
        decoding its images) counts, as it does in 03's step_s."""

        def __init__(self):
            self.step_s, self.last = [], None

        def on_train_begin(self, *args, **kw):
            self.last = time.perf_counter()

        def on_step_end(self, *args, **kw):
            now = time.perf_counter()
            self.step_s.append(now - self.last)
            self.last = now

    grpo = load_grpo()
    a = cli.parse_args(grpo.Args, cfg["argv"])
    cli.seed_everything(a.seed)
    system = dataset.SYSTEM_PROMPTS[a.system_prompt if a.system_prompt != "auto"
                                    else ("plain" if a.reward == "grpo" else "reflect")]
    # Full fine-tuning: the language model trains, the vision tower is frozen, as 03 loads it. LoRA: TRL
    # wraps the model itself from peft_config (03's LoRA settings), so that its reference is the base with
    # the adapters off, as in 03, not the extra "ref" adapter TRL adds to a model passed in already wrapped.
    model, toy_proc = policy.load_policy(a.model, dtype="float32", lora_r=0, freeze_vision=a.freeze_vision,
                                          device="cpu")
    peft_config = None
    if a.lora_r:
        from peft import LoraConfig

        peft_config = LoraConfig(r=a.lora_r, lora_alpha=getattr(a, "lora_alpha", 0) or 2 * a.lora_r,
                                 lora_dropout=0.05, target_modules=policy.LORA_TARGETS,
                                 task_type="CAUSAL_LM")

    # The prompts 03 trains on at steps 0..steps-1 (its own sampler), in that order, as a dataset of
    # conversational prompts (TRL puts the image before the question text, as dataset.build_prompt does).
    prompts = dataset.load_prompts(a)
    rows = []
    for step in range(a.steps):
        batch, images = dataset.batch_images(dataset.step_prompts(prompts, step, a.prompts_per_step, a.seed, 0, 1),
                                          prompts, a.max_pixels)
        rows += [{"prompt": [{"role": "system", "content": system},
                             {"role": "user", "content": p["question"]}],
                  "image": im, "answer": p["answer"], "choices": p["choices"]}
                 for p, im in zip(batch, images)]
    string = datasets.Value("string")
    features = datasets.Features({"prompt": [{"role": string, "content": string}], "image": datasets.Image(),
                                  "answer": string, "choices": datasets.List(string)})
    dataset = datasets.Dataset.from_list(rows, features=features)

    tok = toy_proc.tokenizer

    def srpo_reward(prompts, completions, answer, choices, **kw):  # 03's reward_fn, in TRL's signature
        return [rewards.srpo_reward(c[0]["content"], gold, choices=ch or None,
                                    count_tokens=lambda s: len(tok(s, add_special_tokens=False).input_ids),
                                    variant=a.reward, alpha=a.alpha, use_length=a.use_length,
                                    use_effectiveness=a.use_effectiveness)["total"]
                for c, gold, ch in zip(completions, answer, choices)]

    seqs, micro = a.prompts_per_step * a.group_size, a.micro_batch
    if seqs % micro:
        sys.exit(f"--micro_batch {micro} must divide prompts x G = {seqs} (TRL's gradient accumulation)")
    c = GRPOConfig(
        output_dir=a.out_dir, use_cpu=True, seed=a.seed,
        bf16=False, fp16=False, gradient_checkpointing=False,  # TRL's defaults are on; 03 on a CPU: fp32, off
        # One optimizer step on prompts x G sequences with log-prob passes of `micro` of them: TRL's
        # generation batch is per_device_train_batch_size x gradient_accumulation_steps, generated at once.
        per_device_train_batch_size=micro, gradient_accumulation_steps=seqs // micro,
        num_generations=a.group_size, num_iterations=a.mu, max_steps=a.steps, shuffle_dataset=False,
        max_completion_length=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, top_k=0,
        # The forced length, and the tokens rollout.generate suppresses (TRL alone: <|image_pad|> only).
        generation_kwargs={"min_new_tokens": a.min_new_tokens,
                           "suppress_tokens": rollout.vision_token_ids(toy_proc)},
        beta=a.kl_coef, epsilon=a.clip_eps, epsilon_high=a.clip_eps_high or None, scale_rewards="group",
        loss_type={"token-mean": "dapo", "seq-mean-token-mean": "grpo",
                   "seq-mean-token-sum-norm": "dr_grpo"}[a.loss_agg],
        # The optimizer as 03's (the schedule does not change the time of a step).
        optim="adamw_torch", learning_rate=a.lr, lr_scheduler_type="constant",
        adam_beta1=getattr(a, "adam_beta1", 0.9), adam_beta2=getattr(a, "adam_beta2", 0.95),
        weight_decay=a.weight_decay, max_grad_norm=a.grad_clip,
        # Nothing but the steps: no vLLM, logging, completions tables, evaluation or checkpoints.
        use_vllm=False, report_to="none", logging_strategy="no", log_completions=False, eval_strategy="no",
        save_strategy="no", disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False)
    clock = Clock()
    trainer = TimedGRPO(model=model, reward_funcs=srpo_reward, args=c, train_dataset=dataset,
                        processing_class=ToyProcessorForTRL(toy_proc), peft_config=peft_config,
                        callbacks=[clock])
    trainer.train()

    rows = [{"step_s": s, "gen_s": g, "score_s": r, "tokens_per_s": n / s}
            for s, g, r, n in zip(clock.step_s, trainer.gen_s, trainer.score_s, trainer.n_tokens)]
    # TRL skips the old-log-prob pass exactly when generation lines up with the optimizer steps.
    aligned = c.gradient_accumulation_steps % (c.steps_per_generation * c.num_iterations) == 0
    full = f"min_new_tokens = max_completion_length = {c.max_completion_length}"
    settings = {
        "sequences / optimizer step": f"generation_batch_size = {c.generation_batch_size} "
                                      f"({c.per_device_train_batch_size} x {c.gradient_accumulation_steps}"
                                      " gradient_accumulation_steps)",
        "responses per prompt": f"num_generations = {c.num_generations}",
        "forced length": full if a.min_new_tokens == a.max_new_tokens
                         else f"{a.min_new_tokens}..{a.max_new_tokens}",
        "log-prob micro-batch": f"per_device_train_batch_size = {c.per_device_train_batch_size}",
        "optimizer steps / rollout": f"num_iterations = {c.num_iterations}, steps_per_generation = "
                                    f"{c.steps_per_generation}"
                                    + (" (no old-log-prob pass)" if aligned else ""),
        "KL coefficient": f"beta = {c.beta}",
        "LoRA": f"peft_config r = {peft_config.r}" if peft_config else "none (full LM, vision frozen)",
        "sampling": f"T = {c.temperature}, top_p = {c.top_p}, top_k = {c.top_k}",
        "clip epsilon": f"epsilon = {c.epsilon}",
        "loss aggregation": f"loss_type = {c.loss_type}",
        "grad checkpointing / half": f"{c.gradient_checkpointing} / bf16 {c.bf16}, fp16 {c.fp16}",
        "reward": f"rewards.srpo_reward, variant {a.reward}",
        "generation": f"HF generate (use_vllm = {c.use_vllm})",
    }
    report(rows, settings, counts, versions={m.__name__: m.__version__ for m in (torch, transformers, trl)})


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        sys.path.insert(0, ROOT)  # the repo's modules (rewards, toy, ...)
        {"ours": ours_child, "trl": trl_child}[sys.argv[2]](json.loads(sys.argv[3]))
    else:
        main()
