"""Stage 1b: reflection SFT (SRPO, arXiv 2506.01713, Sec. 3.1, Eq. 1).

Before RL, the policy learns the reflective format and habit by plain supervised fine-tuning on
the reflection set that 01_reflect_data.py wrote. Each row is one conversation: the reflective
system prompt, the user turn (image + question) and the assistant target

    <think>{policy CoT}</think>\\n<answer>{policy answer}</answer>\\n<reflection>{teacher reflection}</reflection>\\n<answer>{gold}</answer>

The loss is next-token cross-entropy on the assistant target only (Eq. 1): system, user, image and
padding tokens are masked out (`dataset.encode_sft`). Like the authors: the vision tower and the
projector stay frozen, AdamW with a cosine schedule and 10% warm-up, gradient clipping 1.0,
gradient accumulation, 3 epochs (the released config; the paper's text says 1: `--epochs 1`).

Reads   --data  runs/toy/reflect/sft_reflect.jsonl (image paths relative to its folder)
        --model toy/base_model (the shipped toy base; a local directory or hub id; a LoRA output directory works too)
Writes  --out_dir runs/toy/sft/
        the model (safetensors + processor; LoRA: the adapter, and `merged/` with --merge_lora),
        metrics.jsonl (one row per optimizer step), loss.png, sft_summary.json (run facts and the
        before/after check on toy test problems), eval_samples.jsonl (what the policy answers),
        checkpoint/ (every --save_every steps: weights, optimizer, scheduler, RNG, data position).

Toy (2 CPU cores: 1-2 min for 225-450 steps, and ~20 s for the before/after check, which the demo skips):
    python 02_sft.py                                   # reflection SFT -> runs/toy/sft
    python 02_sft.py --data runs/toy/reflect/sft_cot.jsonl --out_dir runs/toy/sft_cot
                                                       # the paper's "plain-CoT SFT" ablation
    python 02_sft.py --data runs/toy/reflect/sft_scratchpad.jsonl --out_dir runs/toy/sft_scratchpad
                                                       # the scratchpad baseline (the check as first attempt)
    python 02_sft.py --lora_r 8 --lr 5e-3 --out_dir runs/toy/sft_lora    # LoRA (peft)
    python 02_sft.py --load_in_4bit --lr 5e-3 --out_dir runs/toy/sft_qlora  # QLoRA: nf4 base + LoRA
    python 02_sft.py --resume                          # continue an interrupted run from runs/toy/sft/checkpoint
    accelerate launch --multi_gpu --num_processes 2 02_sft.py --cpu   # 2 CPU processes (gloo)
    (accelerate's own `--cpu` starts ONE process unless given an MPI hostfile; the script's
    --cpu is what selects gloo, so `torchrun --nproc_per_node 2 02_sft.py --cpu` works too.)

Real scale (the paper: Qwen2.5-VL-7B-Instruct, 10K rows, lr 1e-5, 8 GPUs x 1 example x 2
accumulation = 16 per step, bf16, DeepSpeed ZeRO-3, 4096 tokens, images <= 262,144 pixels,
3.5 h on 8 H100), at the default 3 epochs of the released config (the paper's text says 1: add
--epochs 1). The configs/*.yaml files are documented accelerate configs:
    accelerate launch --config_file configs/zero3.yaml 02_sft.py \\
        --model Qwen/Qwen2.5-VL-7B-Instruct --data runs/real/reflect/sft_reflect.jsonl \\
        --out_dir runs/real/sft --lr 1e-5 --batch_size 16 --grad_accum 2 \\
        --gradient_checkpointing --save_every 200 --eval_size 0
    # 2 nodes x 8 GPUs = 16 processes: run on every node; 16 x 1 x 1 keeps 16 examples per step
    accelerate launch --config_file configs/zero3.yaml --num_machines 2 --num_processes 16 \\
        --machine_rank $NODE_RANK --main_process_ip $MASTER_ADDR --main_process_port 29500 \\
        02_sft.py --model Qwen/Qwen2.5-VL-7B-Instruct --batch_size 16 --grad_accum 1 --lr 1e-5 ...
    # ZeRO-2 (fits 7B on 8 x 80 GB with gradient checkpointing): configs/zero2.yaml; FSDP:
    # configs/fsdp.yaml; LoRA on several GPUs with plain DDP: configs/ddp.yaml --lora_r 64 --lr 1e-4
    # One GPU (QLoRA: nf4 base, LoRA adapters, bf16 compute):
    python 02_sft.py --model Qwen/Qwen2.5-VL-7B-Instruct --load_in_4bit --lora_r 64 --lr 1e-4 \\
        --batch_size 16 --grad_accum 16 --gradient_checkpointing --eval_size 0 ...

Batch arithmetic: --batch_size is the effective batch (examples per optimizer step over all
processes); each process runs --grad_accum micro-batches of batch_size / (processes x grad_accum)
examples. Which examples make up step s is a function of (seed, epoch, s) only, so a resumed run,
or one with a different number of processes, sees the same batches in the same order.

Loss normalisation (our choice, stated): the token mean over ALL target tokens of the effective
batch (every micro-batch on every process), as the authors' LLaMA-Factory/transformers setup
computes it with `num_items_in_batch`. A per-micro-batch mean would weigh a token of a short
response more than one of a long response and would change with the process count.
"""

import hashlib
import json
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from machinery import cli, dataset, policy, scoring, training


@dataclass
class Args(training.TrainArgs):
    """Reflection SFT (Stage 1b): next-token loss on the assistant target of the reflection set. Resume an
    interrupted run: rerun the same command with --resume (from out_dir/checkpoint, every --save_every steps)."""

    data: str = "runs/toy/reflect/sft_reflect.jsonl"
    """SFT JSONL from 01 (sft_reflect.jsonl; sft_cot.jsonl for the plain-CoT ablation)"""
    model: str = "toy/base_model"
    """policy to fine-tune: local directory or hub id (e.g. Qwen/Qwen2.5-VL-7B-Instruct)"""
    out_dir: str = "runs/toy/sft"
    """where the model, metrics.jsonl, loss.png and checkpoint/ go"""
    seed: int = 0
    """random seed (data order, LoRA init, dropout)"""
    epochs: int = 3
    """passes over the data (the authors' released config: 3; the paper's text: 1). On the toy, 1 epoch
    leaves the reflection format half-learned"""
    max_steps: int = 0
    """optimizer steps; 0 = epochs x steps per epoch. Sets the schedule's length"""
    batch_size: int = 16
    """effective batch: examples per optimizer step over all processes (paper: 8 GPUs x 1 x 2 = 16;
    toy: 3 epochs of 1,200 rows are 225 steps, of the demo's 2,400 rows 450)"""
    grad_accum: int = 1
    """micro-batches per process per optimizer step (paper: 2)"""
    lr: float = 2e-3
    """peak AdamW learning rate (paper, 7B full fine-tuning: 1e-5; the ~1M-parameter toy needs ~1e-3)"""
    warmup_ratio: float = 0.1
    """share of the steps spent on linear warm-up before the cosine decay (paper: 0.1)"""
    weight_decay: float = 0.0
    """AdamW weight decay (LLaMA-Factory's default: 0)"""
    max_len: int = 4096
    """cut-off in tokens; longer sequences lose the end of their target (paper: 4096)"""
    max_pixels: int = 262144
    """images with more pixels are downscaled first, keeping the aspect ratio (paper: 262,144)"""
    train_first_attempt: bool = True
    """the policy's own first attempt (the target before <reflection>) is in the loss, as in the paper;
    --no-train_first_attempt keeps it as context only (an ablation: its errors are not imitated); the line
    break after it, where the model decides to go on and reflect, stays in the loss"""
    merge_lora: bool = False
    """LoRA: also save a merged full model under out_dir/merged"""
    eval_size: int = 200
    """toy test problems answered greedily before and after training, in the data's prompt style
    (and by the starting model in plain CoT too); 0 = skip. Only for toy models"""
    eval_max_new_tokens: int = 128
    """token budget of each answer in that check"""
    eval_batch_size: int = 64
    """prompts per generation batch in that check"""
    threads: int = 0
    """torch CPU threads per process (0 = torch's default)"""


REQUIRED_FIELDS = ("id", "question", "image", "response", "prompt_style")


# ----------------------------------------------------------------------------------------------
# Data: the SFT JSONL, validated up front, images read per micro-batch


def load_sft_data(path):
    """The SFT rows as a `datasets.Dataset`, every row checked; errors name file, row id and field."""
    import datasets

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such SFT file (write it with 01_reflect_data.py)")
    ds = datasets.load_dataset("json", data_files=path, split="train")
    missing = [f for f in REQUIRED_FIELDS if f not in ds.column_names]
    if missing:
        raise cli.UserError(f"{path}: missing column(s) {missing}; an SFT row needs {list(REQUIRED_FIELDS)}")
    root = os.path.dirname(os.path.abspath(path))
    for i, row in enumerate(ds.select_columns(list(REQUIRED_FIELDS))):
        where = f"{path}: row {i} (id {row['id']!r})"
        for field in ("id", "question", "response"):
            if not isinstance(row[field], str) or not row[field].strip():
                raise cli.UserError(f"{where}: field {field!r} must be a non-empty string, got {row[field]!r}")
        if row["prompt_style"] not in dataset.SYSTEM_PROMPTS:
            raise cli.UserError(f"{where}: field 'prompt_style' is {row['prompt_style']!r}, "
                             f"expected one of {list(dataset.SYSTEM_PROMPTS)}")
        if row["image"] is not None and not os.path.isfile(os.path.join(root, row["image"])):
            raise FileNotFoundError(f"{where}: field 'image': {os.path.join(root, row['image'])} not found")
    return ds


def encode_rows(processor, rows, *, root, data_path="", max_pixels=0, max_len=0, untrained_prefix=""):
    """A right-padded training batch with Eq. (1) labels for a list of SFT rows.

    Rows are grouped by `prompt_style` (each style has its own system prompt) and the groups'
    tensors concatenated. Returns input_ids, attention_mask, labels (B, T), mm_token_type_ids (B, T),
    pixel_values (patches, C) and image_grid_thw (images, 3) when any row has an image.
    """
    groups = {}
    for row in rows:
        groups.setdefault(row["prompt_style"], []).append(row)
    parts = []
    for style, group in groups.items():
        images = [dataset.load_image(root, r["image"], max_pixels, f"{data_path}: row id {r['id']!r}") for r in group]
        parts.append(dataset.encode_sft(processor, [r["question"] for r in group], images,
                                       [r["response"] for r in group], dataset.SYSTEM_PROMPTS[style],
                                       untrained_prefix))
    batch = parts[0] if len(parts) == 1 else concat_batches(parts, processor.tokenizer.pad_token_id)
    if max_len and batch["input_ids"].shape[1] > max_len:  # cut the end (the target's tail), never the image
        n_image = (batch["input_ids"] == processor.image_token_id).sum()
        T = batch["input_ids"].shape[1]
        batch = {k: v[:, :max_len] if v.dim() == 2 and v.shape[1] == T and k not in ("pixel_values", "image_grid_thw")
                 else v for k, v in batch.items()}
        if (batch["input_ids"] == processor.image_token_id).sum() != n_image:
            raise cli.UserError(f"{data_path}: a prompt is longer than --max_len {max_len} tokens with its image; "
                             "raise --max_len or lower --max_pixels")
    return dict(batch)


def concat_batches(parts, pad_id):
    """Stack encoded batches of different lengths: right-pad token tensors, concatenate images."""
    T = max(p["input_ids"].shape[1] for p in parts)
    fill = {"input_ids": pad_id, "attention_mask": 0, "labels": -100, "mm_token_type_ids": 0}
    out = {k: torch.cat([F.pad(p[k], (0, T - p[k].shape[1]), value=v) for p in parts]) for k, v in fill.items()
           if k in parts[0]}
    for k in ("pixel_values", "image_grid_thw"):
        if any(k in p for p in parts):
            out[k] = torch.cat([p[k] for p in parts if k in p])
    return out


def epoch_order(n, seed, epoch):
    """The data order of one epoch: a permutation fixed by (seed, epoch), so resuming can skip ahead."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()


# ----------------------------------------------------------------------------------------------
# The loss


def target_ce_sum(model, batch):
    """Eq. (1): summed next-token cross-entropy over the target tokens. Returns (loss sum, tokens).

    The model computes logits only at the positions that predict a target token (logits_to_keep; the
    prompt's are never made), and their log-softmax is taken at the targets alone (no fp32 copy).
    """
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != -100  # position t predicts token t + 1; masked tokens (-100) are not kept
    logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits  # (kept positions, V)
    targets = labels[:, 1:][keep[:, :-1]]
    ce = -policy.selective_log_softmax(logits, targets).sum()  # Eq. (1)
    return ce, len(targets)


def sft_step(model, accelerator, optimizer, scheduler, batches, args):
    """One optimizer step over this process's micro-batches of the effective batch. Returns (loss,
    target tokens of the whole effective batch, grad_norm, the lr this step used)."""
    world = accelerator.num_processes
    # Eq. (1) normalised by the target tokens of the whole effective batch (all processes).
    local_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    n_tokens = int(accelerator.reduce(torch.tensor(local_tokens, device=accelerator.device), "sum"))
    loss_sum = torch.zeros((), device=accelerator.device)
    for b in batches:
        b = {k: v.to(accelerator.device) for k, v in b.items()}
        with accelerator.accumulate(model):  # syncs gradients only on the last micro-batch
            ce_sum, _ = target_ce_sum(model, b)
            # accelerate divides by grad_accum and DDP averages over processes: undo both, so the
            # gradient is that of sum(CE) / n_tokens over the effective batch.
            accelerator.backward(ce_sum * args.grad_accum * world / max(n_tokens, 1))
            loss_sum += ce_sum.detach()
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.grad_clip)
    lr = optimizer.param_groups[0]["lr"]  # the rate this step uses
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    loss = float(accelerator.reduce(loss_sum, "sum")) / max(n_tokens, 1)
    return loss, n_tokens, grad_norm, lr


# ----------------------------------------------------------------------------------------------
# Before/after check on toy test problems (scoring.check_toy: 04_eval.py's rules)


def toy_check(model, processor, args, style, when):
    """How the policy answers the first --eval_size toy test problems, greedily, in the data's prompt
    style, and before training also in plain chain of thought (what the starting model was trained
    on: its real skill). Returns {"before"/"after"(/"before_plain"): summary}; the answers in the
    data's style go to eval_samples.jsonl."""
    checks = [(when, style)] + ([("before_plain", "plain")] if when == "before" and style != "plain" else [])
    out = {}
    for key, prompt in checks:
        out[key], rows = scoring.check_toy(model, processor, n=args.eval_size, prompt=prompt,
                                              max_new_tokens=args.eval_max_new_tokens,
                                              batch_size=args.eval_batch_size, desc=f"eval {key}")
        if key == when:
            with open(os.path.join(args.out_dir, "eval_samples.jsonl"), "w" if when == "before" else "a") as f:
                f.writelines(json.dumps({"when": when, **r}) + "\n" for r in rows)
    return out


def eval_line(name, s):
    r = s["reflection"]
    return (f"{name}: reflection {r['reflection_rate']:.0f}%, first answer right {r['first_acc']:.0f}%, "
            f"final answer right {r['final_acc']:.0f}% (n={s['n']})")


def write_summary(summary, args, style, log):
    """sft_summary.json and loss.png, and the before/after lines (main process)."""
    rows = dataset.read_jsonl(os.path.join(args.out_dir, "metrics.jsonl"))
    training.plot_metrics(rows, ["loss", "lr"], os.path.join(args.out_dir, "loss.png"),
                          title=f"SFT on {os.path.basename(args.data)}")
    summary.update(first_loss=rows[0]["loss"], final_loss=rows[-1]["loss"])
    for key, name in (("before_plain", "before SFT, plain prompt"), ("before", f"before SFT, {style} prompt"),
                      ("after", f"after SFT,  {style} prompt")):
        if key in summary:
            log(eval_line(name, summary[key]))
    with open(os.path.join(args.out_dir, "sft_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    log(f"trained {summary['steps']} steps in {summary['train_seconds']:.0f}s: loss {rows[0]['loss']:.3f} -> "
        f"{rows[-1]['loss']:.3f}; model saved to {args.out_dir}")


# ----------------------------------------------------------------------------------------------
# Checkpoints and the final save: training.save_checkpoint / load_checkpoint / save_final


def trainable_digest(model):
    """sha256 of the trainable weights: processes of a data-parallel run must agree bit for bit."""
    h = hashlib.sha256()
    for name, p in sorted(policy.unwrap(model).named_parameters()):
        if p.requires_grad:
            h.update(name.encode() + p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# The loop


def check_args(args):
    """Every flag value, checked before a model loads."""
    training.check_train_args(args)
    for flag in ("batch_size", "grad_accum", "epochs"):
        if getattr(args, flag) < 1:
            raise cli.UserError(f"--{flag} must be at least 1; got {getattr(args, flag)}")


def micro_batch_size(args, world):
    """Examples per micro-batch: --batch_size over processes x --grad_accum."""
    if args.batch_size % (world * args.grad_accum):
        raise cli.UserError(f"--batch_size {args.batch_size} must be a multiple of processes ({world}) x "
                            f"--grad_accum ({args.grad_accum})")
    return args.batch_size // (world * args.grad_accum)


def main(args: Args):
    from accelerate.utils import gather_object

    check_args(args)
    ds = load_sft_data(args.data)  # a bad file fails here, before a model loads
    accelerator = training.make_accelerator(args, grad_accum=args.grad_accum)
    if accelerator.gradient_accumulation_steps != args.grad_accum:  # e.g. set in an accelerate config
        raise cli.UserError(f"accelerate is set to {accelerator.gradient_accumulation_steps} accumulation steps "
                            f"but --grad_accum is {args.grad_accum}; set it with --grad_accum only")
    sharded = training.is_sharded(accelerator)
    world, rank, is_main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    log = accelerator.print
    if args.threads:
        torch.set_num_threads(args.threads)
    cli.seed_everything(args.seed)
    micro = micro_batch_size(args, world)
    t_start = time.time()

    # ---- data
    root = os.path.dirname(os.path.abspath(args.data))
    steps_per_epoch = len(ds) // args.batch_size  # the last partial batch of each epoch is dropped
    if steps_per_epoch == 0:
        raise cli.UserError(f"{args.data}: {len(ds)} rows is fewer than one batch of {args.batch_size}")
    total_steps = args.max_steps or args.epochs * steps_per_epoch
    style = Counter(ds["prompt_style"]).most_common(1)[0][0]
    log(f"{args.data}: {len(ds)} rows ({dict(Counter(ds['prompt_style']))}), {steps_per_epoch} steps per epoch, "
        f"{total_steps} steps of {args.batch_size} = {world} process(es) x {args.grad_accum} x {micro}")

    # ---- model: full fine-tuning in fp32 master weights (bf16 autocast on GPU); frozen bases in bf16
    lora_r = args.lora_r or (16 if args.load_in_4bit else 0)  # 4-bit weights train only via LoRA
    model, processor = training.load_trainable_policy(args, accelerator, lora_r)
    n_train = training.describe_trainable(model, args, accelerator, lora_r, log)
    os.makedirs(args.out_dir, exist_ok=True)
    do_eval = args.eval_size > 0 and policy.is_toy_dir(policy.resolve_model(args.model)[0]) and not sharded
    summary = {"args": asdict(args), "lora_r_used": lora_r, "rows": len(ds), "steps": total_steps,
               "trainable_parameters": n_train}
    found = training.find_resume(args)
    if do_eval and is_main and not found:  # how the starting policy answers, for the before/after lines
        summary.update(toy_check(model, processor, args, style, "before"))
    accelerator.wait_for_everyone()

    # ---- optimizer, schedule, distribution; resume: weights, optimizer, scheduler, RNG, data position
    optimizer, scheduler = training.make_optimizer(args, model, total_steps)
    training.prepare_deepspeed(accelerator, model, micro, args.grad_clip)
    model, optimizer = accelerator.prepare(model, optimizer)
    step, extra = training.start_or_resume(accelerator, args, found, scheduler=scheduler)
    if found:
        if extra.get("steps_per_epoch") != steps_per_epoch or extra.get("total_steps") != total_steps:
            raise cli.UserError(f"{found}: written with {extra.get('steps_per_epoch')} steps per epoch and "
                                f"{extra.get('total_steps')} steps; now {steps_per_epoch} and {total_steps} "
                                "(same --data, --batch_size, --epochs and --max_steps are needed to resume)")
        summary.update({k: extra[k] for k in ("before", "before_plain") if k in extra})
        log(f"resuming at epoch {extra['epoch']}, batch {extra['batch_in_epoch']}")
    training.start_trackers(accelerator, args, "srpo-sft")

    # ---- training loop: one iteration = one optimizer step over the effective batch
    model.train()
    order, order_epoch, t0, start = None, None, time.time(), step
    bar = tqdm(range(step, total_steps), desc="SFT", disable=not is_main, initial=step, total=total_steps)
    for step in bar:
        epoch, pos = divmod(step, steps_per_epoch)
        if order_epoch != epoch:
            order, order_epoch = epoch_order(len(ds), args.seed, epoch), epoch
        batch_idx = order[pos * args.batch_size:(pos + 1) * args.batch_size]  # the same on every process
        mine = batch_idx[rank * micro * args.grad_accum:(rank + 1) * micro * args.grad_accum]  # this process's share
        batches = [encode_rows(processor, ds.select(mine[i:i + micro]), root=root, data_path=args.data,
                               max_pixels=args.max_pixels, max_len=args.max_len,
                               untrained_prefix="" if args.train_first_attempt else "<reflection>")
                   for i in range(0, len(mine), micro)]
        if step == start:  # before the first update: will this recipe fit?
            log(training.memory_line(training.memory_estimate(
                model, accelerator, sequences=0, prompt_len=0, new_tokens=batches[0]["input_ids"].shape[1],
                micro_batch=micro, checkpointing=args.gradient_checkpointing)))
        loss, n_tokens, grad_norm, lr = sft_step(model, accelerator, optimizer, scheduler, batches, args)
        step += 1  # optimizer steps done
        row = {"step": step, "epoch": round(step / steps_per_epoch, 4), "loss": loss,
               "lr": lr, "grad_norm": float(grad_norm) if grad_norm is not None else None,
               "tokens": n_tokens, "seconds": round(time.time() - t0, 2)}
        accelerator.log(row, step=step)
        if is_main:
            dataset.append_jsonl(os.path.join(args.out_dir, "metrics.jsonl"), row)
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{row['lr']:.1e}")
        if args.stop_after and step == start + args.stop_after and step < total_steps:
            log(f"stopping at step {step} (--stop_after); continue with --resume")
            return {"stopped_at": step}
        if args.save_every and step % args.save_every == 0 and step < total_steps:
            extra = {"epoch": step // steps_per_epoch, "batch_in_epoch": step % steps_per_epoch,
                     "steps_per_epoch": steps_per_epoch, "total_steps": total_steps, "seed": args.seed,
                     "data": args.data, **{k: summary[k] for k in ("before", "before_plain") if k in summary}}
            training.save_checkpoint(accelerator, os.path.join(args.out_dir, "checkpoint"), scheduler=scheduler,
                                     step=step, extra=extra)
    bar.close()
    summary["train_seconds"] = round(time.time() - t0, 1)

    # ---- save: the model once (gathered first when sharded), metrics plot, summary
    if not sharded:
        summary["rank_digests"] = digests = gather_object([trainable_digest(model)])  # all equal under DDP
        if len(set(digests)) > 1:
            raise RuntimeError(f"processes disagree on the trained weights: {digests}")
    if is_main and do_eval:  # before save_final, which may cast the weights: same dtype as the "before" check
        summary.update(toy_check(accelerator.unwrap_model(model), processor, args, style, "after"))
    training.save_final(accelerator, model, processor, args.out_dir, sharded=sharded, merge_lora=args.merge_lora,
                        dtype=args.save_dtype)
    if is_main:
        summary["total_seconds"] = round(time.time() - t_start, 1)
        write_summary(summary, args, style, log)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


if __name__ == "__main__":
    cli.run(main, Args)
