"""Stage 2: reflection-aware GRPO, written out by hand (SRPO, arXiv 2506.01713, Sec. 3.2, Eqs. 2-8).

Each step of the loop in `main` is one of the paper's six:
  1. group sampling: G responses per prompt (with its image) at temperature T;
  2. rewards: the SRPO reward of each response against its own gold answer (rewards.py, Eqs. 4-8);
  3. group-normalised advantages (`group_advantages`, Eq. 3), the accuracy filter, and the rollout split
     into K slices of whole groups, one per optimizer step (`update_slices`);
  4. old and reference log-probs (`token_logprobs`): pi_old is the sampling policy, computed once;
  5. mu passes over the K slices, an optimizer step on each: the clipped surrogate on pi_theta / pi_old
     with an optional k3 KL (`grpo_step`, `grpo_loss`, Eq. 2);
  6. metrics (`step_metrics`): one log line, one metrics.jsonl row, and an updates.jsonl row per step.
Everything else is plumbing: batches with images, data, checkpoints.

Toy (after 02, ~4-5 minutes on 2 CPU cores):
    python 03_grpo.py                                            # SRPO: runs/toy/sft -> runs/toy/srpo
    python 03_grpo.py --reward grpo --model runs/toy/sft_cot --out_dir runs/toy/grpo   # plain-GRPO baseline
    python 03_grpo.py --resume                                   # continue an interrupted run
Real scale (Qwen2.5-VL-7B after reflection SFT, 8 GPUs, ~62 GB each; the README's recipes table):
    accelerate launch --config_file configs/zero2.yaml 03_grpo.py --model runs/real/sft \
        --data my-org/rl-prompts --prompts_per_step 16 --max_new_tokens 2048 --lr 1e-6 --steps 500 \
        --micro_batch 4 --gradient_checkpointing --updates_per_rollout 8 --loss_agg seq-mean-token-mean
    (--prompts_per_step is per process: 8 processes x 16 = the paper's 128 prompts a rollout, 1,024
    samples; --updates_per_rollout 8: 8 optimizer steps of 128 samples each (16 a process), each response
    weighing the same, as the authors' OpenRLHF run did)
One GPU, 4-bit QLoRA (~18 GB): python 03_grpo.py --model runs/real/sft --load_in_4bit --lora_r 16 \
        --prompts_per_step 2 --micro_batch 4 --gradient_checkpointing --max_new_tokens 2048 --lr 1e-6

Outputs in --out_dir: the model (safetensors; LoRA: the adapter), metrics.jsonl (one row per rollout
step: rewards, accuracies, and the update statistics of its last optimizer step), updates.jsonl (one row
per optimizer step: step, update, epoch, slice, rows and tokens trained on (all processes), lr, loss, kl
to the reference, clip_frac, ratio_mean and ratio_max of pi_theta / pi_old over the tokens, approx_kl to
pi_old, grad_norm), samples.jsonl (completions with their rewards), curves.png, checkpoint/ (--resume).
"""

import contextlib
import copy
import os
import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from machinery import cli, dataset, policy, rollout
import rewards
from machinery import training


@dataclass
class Args(training.TrainArgs, dataset.DataArgs):
    """Reflection-aware GRPO (SRPO stage 2) on the toy task by default. Resume an interrupted run: rerun
    the same command with --resume (from out_dir/checkpoint, written every --save_every steps)."""

    model: str = "runs/toy/sft"
    """policy to start from (02's output; a LoRA output directory works too)"""
    out_dir: str = "runs/toy/srpo"
    """where the trained policy, metrics and samples go"""
    train_size: int = 0
    """RL prompts: a seeded sample of this many rows of --data; 0 = all (the toy: 2,000 train problems,
    the seed range --seed + 1, which may overlap stage 1's pool)"""
    max_pixels: int = 262144
    """images with more pixels are downscaled first, keeping the aspect ratio (as in 02)"""
    reward: str = "paper"
    """'paper' (Eqs. 4-8, default), 'released' (the authors' code), 'grpo' (plain-GRPO baseline) or 'final'
    (the last answer's accuracy + the reflective layout's format, no reflection terms: an ablation)"""
    alpha: float = 0.1
    """weight of the length reward f_len (Eq. 6)"""
    use_length: bool = True
    """ablation: --no-use_length drops alpha x f_len"""
    use_effectiveness: bool = True
    """ablation: --no-use_effectiveness drops I_eff (Eq. 7)"""
    use_accuracy: bool = True
    """ablation: --no-use_accuracy drops R_accuracy, the first answer's reward (Eq. 5)"""
    use_reflection_format: bool = True
    """ablation: --no-use_reflection_format drops I_ref (Eq. 6)"""
    verdict_reward: float = 0.0
    """not in the paper (EXERCISES.md 14): paid when the reflection's verdict sentence matches the first
    answer (rewards.honest_verdict; paper reward only). 0 = the paper's reward"""
    system_prompt: str = "auto"
    """key of dataset.SYSTEM_PROMPTS; 'auto' = 'plain' for the grpo reward, else 'reflect'"""
    steps: int = 60
    """rollout steps (paper: 500)"""
    prompts_per_step: int = 32
    """prompts per rollout per process (paper: 128 over 8 GPUs; toy: 32 x G = 256 samples a step)"""
    group_size: int = 8
    """G, responses sampled per prompt (paper: 8)"""
    temperature: float = 1.0
    """sampling temperature T; log-probs use the same T (paper: 1.0)"""
    top_p: float = 1.0
    """nucleus sampling (paper: 1.0)"""
    max_new_tokens: int = 128
    """response length cap (paper: 2048)"""
    min_new_tokens: int = 0
    """force at least this many new tokens (fixed-length generation for benchmarks)"""
    rollout: str = "fast"
    """'fast': our static-KV-cache decoding loop (rollout.py; compiled on CUDA) where it applies, else HF
    generate, with the reason printed; 'hf': always HF generate. ZeRO-3/FSDP: 'fast' gathers the whole
    model on every GPU for each rollout (bf16: 2 bytes x parameters), 'hf' gathers it layer by layer"""
    mu: int = 1
    """passes (epochs) over each rollout: mu x updates_per_rollout optimizer steps per rollout, every pass
    over the same slices in the same order (as TRL's num_iterations); with mu = K = 1 the ratio is exactly 1"""
    updates_per_rollout: int = 1
    """K: a pass over the rollout is K optimizer steps, each on a disjoint 1/K of its groups (whole groups,
    shuffled with the run's seed), all against pi_old = the sampling policy's log-probs, computed once before
    the first step (the authors' OpenRLHF run: 1,024 samples a rollout / train_batch_size 128 = 8; TRL:
    steps_per_generation). The LR schedule counts optimizer steps (steps x mu x K); checkpoints are written
    between rollouts, so --resume redoes no optimizer step. At most --prompts_per_step"""
    clip_eps: float = 0.2
    """epsilon of the clipped surrogate (Eq. 2)"""
    clip_eps_high: float = 0.0
    """upper clip epsilon (DAPO's clip-higher); 0 = same as clip_eps"""
    kl_coef: float = 0.0
    """beta, weight of the k3 KL to the reference (released script: 0; the paper names k3, no value)"""
    loss_agg: str = "token-mean"
    """'token-mean' (all tokens of the batch), 'seq-mean-token-mean' (original GRPO) or
    'seq-mean-token-sum-norm' (Dr. GRPO)"""
    filter: str = "final"
    """groups the update trains on: 'final' (the authors' accuracy filter: mean final-answer accuracy within
    [filter_low, filter_high]), 'spread' (every group whose rewards differ, DAPO's dynamic sampling: also
    groups that are all right at the end but differ in their first answers) or 'none'"""
    filter_low: float = 0.1
    """lower bound of the accuracy filter"""
    filter_high: float = 0.9
    """upper bound of the accuracy filter"""
    lr: float = 4e-4
    """learning rate (paper: 1e-6 for 7B full fine-tuning; the tiny toy model needs more: 4e-4 at 32 prompts
    a step; much higher makes it collapse)"""
    adam_beta2: float = 0.95
    """AdamW beta2 (0.95, as in the authors' OpenRLHF setup)"""
    warmup_ratio: float = 0.03
    """share of steps in linear warm-up"""
    min_lr_ratio: float = 0.1
    """cosine decays to this fraction of lr"""
    micro_batch: int = 32
    """sequences per log-prob forward pass (bounds logits memory)"""
    share_prompts: bool = True
    """log-prob passes run each prompt once per micro-batch and its G completions from its keys and values
    (the same numbers for 1/G of the prompt's compute); not with --gradient_checkpointing, which drops them"""
    lora_r: int = 0
    """LoRA rank (0 = full fine-tuning of the language model; 16 when --load_in_4bit or the model is an
    adapter)"""
    save_every: int = 20
    """write a resumable checkpoint every N steps (0 = never)"""
    sample_every: int = 10
    """write sample completions every N steps"""


LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
FILTERS = ("final", "spread", "none")


def check_args(args):
    """Every flag value, checked before a model loads (on a 7B under ZeRO-3 a late error costs minutes)."""
    training.check_train_args(args)
    cli.check_choice("reward", args.reward, rewards.VARIANTS)
    cli.check_choice("loss_agg", args.loss_agg, LOSS_AGGS)
    cli.check_choice("rollout", args.rollout, rollout.ROLLOUTS)
    cli.check_choice("system_prompt", args.system_prompt, ("auto", *dataset.SYSTEM_PROMPTS))
    for flag, low in (("group_size", 2), ("prompts_per_step", 1), ("steps", 1), ("mu", 1), ("micro_batch", 1),
                      ("max_new_tokens", 1), ("updates_per_rollout", 1)):
        if getattr(args, flag) < low:
            raise cli.UserError(f"--{flag} must be at least {low}; got {getattr(args, flag)}")
    if args.updates_per_rollout > args.prompts_per_step:
        raise cli.UserError(f"--updates_per_rollout {args.updates_per_rollout}: each optimizer step takes whole "
                            f"groups, and a process has only --prompts_per_step {args.prompts_per_step}")
    if args.verdict_reward and args.reward != "paper":
        raise cli.UserError(f"--verdict_reward is a term of the paper reward; --reward is {args.reward}")
    if not args.temperature > 0 or not 0 < args.top_p <= 1:
        raise cli.UserError(f"GRPO samples: --temperature must be > 0 and --top_p in (0, 1]; got "
                            f"{args.temperature} and {args.top_p}")
    cli.check_choice("filter", args.filter, FILTERS)
    if args.filter == "final" and not 0 <= args.filter_low <= args.filter_high <= 1:
        raise cli.UserError(f"--filter_low {args.filter_low} and --filter_high {args.filter_high}: "
                            "need 0 <= low <= high <= 1")


# ----------------------------------------------------------------------------------------------
# The pieces of the GRPO objective


def group_advantages(r, eps=1e-4):
    """Eq. 3: A_i = (r_i - mean(r)) / (std(r) + eps) within each group. (P, G) -> (P, G)

    Example: [[1., 0., 0., 1.]] -> [[0.866, -0.866, -0.866, 0.866]]
    """
    return (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)  # Eq. (3)


def token_logprobs(model, batch, completion_ids, temperature, micro_batch, vision_start_id, share_prompts=False):
    """log pi(o_t | q, o_<t) of each completion token, log_softmax(logits / T) in fp32.

    batch: left-padded prompts (B, Lp) + images; completion_ids: (B, T). Returns (B, T). Runs in
    micro-batches; the model makes logits at the completion positions only (not the prompt's), and their
    log-softmax is taken at the chosen tokens without a second copy of them (selective_log_softmax).
    share_prompts: each distinct prompt of a micro-batch (a group repeats one G times) goes through the
    model once (prompt_shared_logprobs): the same numbers for 1/G of the prompt's compute.
    """
    logprobs = prompt_shared_logprobs if share_prompts else one_pass_logprobs
    out = []
    for s in range(0, completion_ids.shape[0], micro_batch):
        rows = list(range(s, min(s + micro_batch, completion_ids.shape[0])))
        out.append(logprobs(model, dataset.select_rows(batch, rows, vision_start_id), completion_ids[rows],
                            temperature, vision_start_id))
    return torch.cat(out)


def one_pass_logprobs(model, prompts, comp, temperature, vision_start_id):
    """Prompts (b, Lp) and completions (b, T) in one forward pass. Returns (b, T)."""
    Lp, T = prompts["input_ids"].shape[1], comp.shape[1]
    # Tokens after EOS are attended-off; their log-probs are masked out of the loss anyway.
    full = {**prompts, "input_ids": torch.cat([prompts["input_ids"], comp], 1),
            "attention_mask": torch.cat([prompts["attention_mask"], torch.ones_like(comp)], 1),
            "mm_token_type_ids": torch.cat([prompts["mm_token_type_ids"], torch.zeros_like(comp)], 1)}
    keep = torch.arange(Lp - 1, Lp + T - 1, device=comp.device)  # position t predicts token t + 1
    logits = model(**full, use_cache=False, logits_to_keep=keep).logits  # (b, T, V)
    return policy.selective_log_softmax(logits, comp, temperature)


def prompt_shared_logprobs(model, prompts, comp, temperature, vision_start_id):
    """one_pass_logprobs with each distinct prompt run once: its cache is repeated for its rows
    (gradients flow back through the repeat) and the completions continue from them, as decoding does."""
    first, inverse = rollout.repeated_rows(prompts, vision_start_id)
    distinct = dataset.select_rows(prompts, first, vision_start_id)
    positions = rollout.mrope_positions(rollout.core_model(model), distinct)  # (4, P, Lp)
    out = model(**distinct, position_ids=positions, use_cache=True, logits_to_keep=1)
    logp = [policy.selective_log_softmax(out.logits[inverse], comp[:, :1], temperature)]  # (b, 1)
    if comp.shape[1] > 1:
        rollout.repeat_cache_rows(out.cache, inverse)  # (P, ...) -> (b, ...): keys and values, or Qwen3.5's states
        steps = torch.arange(1, comp.shape[1], device=comp.device)
        logits = model(input_ids=comp[:, :-1], position_ids=positions[..., -1:][:, inverse] + steps,
                       attention_mask=torch.cat([prompts["attention_mask"], torch.ones_like(comp[:, :-1])], 1),
                       cache=out.cache, use_cache=True).logits  # (b, T - 1, V)
        logp.append(policy.selective_log_softmax(logits, comp[:, 1:], temperature))
    return torch.cat(logp, 1)


def aggregate(per_token, mask, how, max_len):
    """Reduce a (B, T) per-token loss to a scalar over completion tokens."""
    if how == "token-mean":  # every token of the batch weighs the same (DAPO, EasyR1 default)
        return (per_token * mask).sum() / mask.sum().clamp(min=1)
    if how == "seq-mean-token-mean":  # Eq. (2)'s 1/G sum_i 1/|o_i| sum_t: each response the same (authors)
        return ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    if how == "seq-mean-token-sum-norm":  # Dr. GRPO: token sums over a constant, the length cap
        return ((per_token * mask).sum(1) / max_len).mean()
    raise cli.UserError(f"unknown --loss_agg {how!r}")


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, args):
    """The clipped surrogate with k3 KL (Eq. 2), per token, aggregated. Returns (loss, stats).

    logp/old_logp/ref_logp/mask: (B, T); advantages: (B,), one per response, shared by its tokens.
    """
    log_ratio = (logp - old_logp).clamp(-20.0, 20.0)  # clamp: exp() of a big gap overflows
    ratio = torch.exp(log_ratio)  # rho = pi_theta / pi_old
    A = advantages[:, None]
    eps_high = args.clip_eps_high or args.clip_eps
    surrogate = torch.min(ratio * A, torch.clamp(ratio, 1 - args.clip_eps, 1 + eps_high) * A)  # Eq. (2)
    per_token = -surrogate
    kl = torch.zeros_like(logp)
    if ref_logp is not None:
        d = (ref_logp - logp).clamp(-20.0, 20.0)
        kl = torch.exp(d) - d - 1  # k3 estimator of KL(pi_theta || pi_ref), >= 0
        per_token = per_token + args.kl_coef * kl  # Eq. (2): - beta * D_KL
    loss = aggregate(per_token, mask, args.loss_agg, args.max_new_tokens)
    with torch.no_grad():
        clipped = ((ratio < 1 - args.clip_eps) & (A < 0)) | ((ratio > 1 + eps_high) & (A > 0))
        n = mask.sum().clamp(min=1)
        approx_kl = (ratio - 1) - log_ratio  # KL(pi_old || pi_theta) on pi_old's samples, see joschu.net/blog/kl-approx.html
        stats = {"kl": ((kl * mask).sum() / n).item(), "clip_frac": ((clipped * mask).sum() / n).item(),
                 "approx_kl": ((approx_kl * mask).sum() / n).item(), "ratio_mean": ((ratio * mask).sum() / n).item(),
                 "ratio_max": ratio.masked_fill(mask == 0, 0).max().item()}
    return loss, stats


def accuracy_filter(final_acc, low, high):
    """The groups trained on (--filter final): mean final-answer accuracy within [low, high] (the authors'
    [0.1, 0.9]). Under plain GRPO's reward an all-right or all-wrong group has zero advantages anyway;
    under SRPO's it can still differ in its first answers (right -> right 1.6 vs wrong -> right 1.35),
    which this filter drops and --filter spread keeps. (P,) -> (P,) bool"""
    return (final_acc >= low) & (final_acc <= high)


def group_filter(how, r, final_acc, low, high):
    """The groups the update trains on, (P,) bool, from rewards r (P, G) and mean final accuracy (P,):
    --filter final (accuracy_filter), spread (rewards differ: DAPO's dynamic sampling) or none."""
    if how == "final":
        return accuracy_filter(final_acc, low, high)
    return r.std(1) > 1e-6 if how == "spread" else torch.ones(len(r), dtype=torch.bool)


def update_slices(keep, G, K, lockstep, generator=None):
    """The rollout's optimizer steps: K pairs (rows, weights), which of the P*G responses each step runs over
    and each row's weight on its token mask. Whole groups, shuffled by `generator` (K > 1; K = 1 keeps the
    rollout's order), dealt into K slices of near-equal size. Normally the kept groups, weight 1; a slice the
    filter left empty gets group 0 at weight 0, so that every process takes part in every step (DDP syncs
    in the backward). `lockstep` (ZeRO or FSDP with several processes, where every forward and backward is a
    collective that all processes must join, so they must run the same micro-batches): every group, the
    filtered ones weighted 0, so the slices' sizes depend on P and K alone.

    Example: keep [T, F, T, T], G 2, K 2, no shuffle -> [([0, 1], [1., 1.]), ([4, 5, 6, 7], [1., 1., 1., 1.])]
    """
    groups = [i for i in range(len(keep)) if keep[i] or lockstep]
    if K > 1 and generator is not None:
        groups = [groups[i] for i in torch.randperm(len(groups), generator=generator).tolist()]
    slices = []
    for k in range(K):
        part = groups[k * len(groups) // K:(k + 1) * len(groups) // K]
        rows = [i * G + g for i in part or [0] for g in range(G)]
        slices.append((rows, torch.tensor([float(keep[r // G]) if part else 0.0 for r in rows])))
    return slices


def micro_batch_share(how, mask_mb, n_tokens, n_kept_rows):
    """A micro-batch's share of the batch loss, so that the shares of all micro-batches sum to the
    batch's loss_agg: its tokens (token-mean) or its rows (the per-response means) over the batch's."""
    return mask_mb.sum() / n_tokens if how == "token-mean" else len(mask_mb) / n_kept_rows


def make_reward_fn(args, count_tokens):
    """(response text, prompt row) -> the reward dict of rewards.srpo_reward, with the run's reward flags."""
    return lambda text, p: rewards.srpo_reward(
        text, p["answer"], choices=p["choices"] or None, count_tokens=count_tokens, variant=args.reward,
        alpha=args.alpha, use_length=args.use_length, use_effectiveness=args.use_effectiveness,
        use_accuracy=args.use_accuracy, use_reflection_format=args.use_reflection_format,
        verdict_weight=args.verdict_reward)


def score_responses(texts, prompts, G, reward_fn):
    """Reward of each response against its OWN prompt: response i belongs to prompt i // G."""
    assert len(texts) == len(prompts) * G
    return [reward_fn(text, prompts[i // G]) for i, text in enumerate(texts)]


# ----------------------------------------------------------------------------------------------
# The update and its metrics


def grpo_step(model, ref_model, accelerator, optimizer, scheduler, group, comp, mask, adv, slices, args,
              vision_start):
    """Steps 4-5 of the loop: old and reference log-probs, then mu passes over the rollout's slices, an
    optimizer step on each: the clipped surrogate (Eq. 2), gradients accumulated over micro-batches.
    Returns (stats of the last step, its grad_norm, the first step's lr, one dict per optimizer step).

    group: the rollout's prompts (P*G rows, images included); comp, mask: completions and token masks
    (P*G, T); adv: advantages (P*G,); slices: update_slices' (rows, weights), one per optimizer step.
    pi_old is the sampling policy: its log-probs are computed once, before the first step, over every row a
    step trains on. With mu = 1 and one slice the policy has not moved since sampling, so pi_old = pi_theta:
    the one pass uses its own detached log-probs and the ratio is exactly 1.
    Distributed: each step's loss is that of its slice on every process (the slice's token and row counts
    summed over processes), so N processes take the steps one process would take on all their rows. DDP and
    FSDP exchange gradients only on a slice's last micro-batch (no_sync before it); DeepSpeed's engine steps
    only when sync_gradients is set, though ZeRO-2/3 reduce at every backward.
    """
    shared = args.share_prompts and not args.gradient_checkpointing
    micro_logprobs = prompt_shared_logprobs if shared else one_pass_logprobs  # one micro-batch's pass
    rows = [r for part, _ in slices for r in part]  # every row a step trains on, in slice order

    def logprobs(m):  # (P*G, T), filled at `rows`, computed micro-batch by micro-batch
        out = torch.zeros(comp.shape, device=comp.device)
        out[rows] = token_logprobs(m, dataset.select_rows(group, rows, vision_start), comp[rows], args.temperature,
                                   args.micro_batch, vision_start, shared)
        return out

    with torch.no_grad(), accelerator.autocast():
        old_logp = logprobs(model) if args.mu > 1 or len(slices) > 1 else None
        ref_logp = None
        if args.kl_coef > 0:
            if ref_model is not None:
                ref_logp = logprobs(ref_model)
            else:  # LoRA: the reference is the base with the adapters off
                with accelerator.unwrap_model(model).disable_adapter():
                    ref_logp = logprobs(model)

    world = accelerator.num_processes
    cmasks = [mask[part].float() * weight[:, None].to(mask.device) for part, weight in slices]  # (rows, T) each
    counts = torch.tensor([[float(c.sum()), float(w.sum())] for c, (_, w) in zip(cmasks, slices)],
                          device=accelerator.device)  # tokens and kept rows of each slice
    counts = accelerator.reduce(counts, "sum") if world > 1 else counts
    lr = optimizer.param_groups[0]["lr"]  # the rate of this rollout's first update
    sums, peaks, updates = [], [], []  # per optimizer step: weighted stats, ratio_max, the log row
    for epoch in range(args.mu):
        for k, ((part, _), cmask) in enumerate(zip(slices, cmasks)):
            n_tok, n_rows = counts[k].clamp(min=1).tolist()
            stats = torch.zeros(5, device=accelerator.device)  # kl, clip_frac, loss, approx_kl, ratio_mean
            peak = 0.0
            starts = list(range(0, len(part), args.micro_batch))
            updates.append({"update": len(updates) + 1, "epoch": epoch + 1, "slice": k + 1,
                            "rows": counts[k, 1].item(), "tokens": counts[k, 0].item(),
                            "lr": optimizer.param_groups[0]["lr"]})
            for s in starts:
                mb = part[s:s + args.micro_batch]
                last = s == starts[-1]
                accelerator.sync_gradients = last
                with contextlib.nullcontext() if last else accelerator.no_sync(model):
                    logp = micro_logprobs(model, dataset.select_rows(group, mb, vision_start), comp[mb],
                                          args.temperature, vision_start)
                    old = logp.detach() if old_logp is None else old_logp[mb]
                    ref = None if ref_logp is None else ref_logp[mb]
                    cm = cmask[s:s + args.micro_batch]
                    loss, st = grpo_loss(logp, old, ref, adv[mb], cm, args)  # Eq. (2) on this micro-batch
                    # each micro-batch's loss scaled to its share of the slice, so that the shares sum to the
                    # slice's loss; x world: DDP, ZeRO and FSDP average the processes' gradients
                    weight = float(micro_batch_share(args.loss_agg, cm, n_tok, n_rows))
                    accelerator.backward(loss * weight * world)
                stats += torch.tensor([st["kl"], st["clip_frac"], loss.item(), st["approx_kl"], st["ratio_mean"]],
                                      device=stats.device) * weight
                peak = max(peak, st["ratio_max"])
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.grad_clip)  # DeepSpeed: its config's
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            sums.append(stats)
            peaks.append(peak)
            updates[-1]["grad_norm"] = float("nan") if grad_norm is None else float(grad_norm)
    sums, peaks = torch.stack(sums), torch.tensor(peaks, device=accelerator.device)
    if world > 1:  # every process's share of each step, summed; the largest ratio over all processes
        sums, peaks = accelerator.reduce(sums, "sum"), accelerator.gather(peaks[None]).max(0).values
    keys = ("kl", "clip_frac", "loss", "approx_kl", "ratio_mean")
    for row, values, peak in zip(updates, sums.tolist(), peaks.tolist()):
        row.update({**dict(zip(keys, values)), "ratio_max": peak})
    last = {k: updates[-1][k] for k in (*keys, "ratio_max")}
    return last, grad_norm, lr, updates


def step_metrics(scored, r, keep, mask, stats, grad_norm, lr, times):
    """One metrics.jsonl row: the reward components, first/final accuracy, what the reflections did
    (wrong->right, right->wrong), response length, the update's statistics and the step's seconds."""
    row = {k: sum(s[k] for s in scored) / len(scored) for k in rewards.REWARD_KEYS}
    first = torch.tensor([s["first_correct"] for s in scored])
    final = torch.tensor([s["final_correct"] for s in scored])
    gen_s, score_s, step_s = times
    row.update({
        "reward": row.pop("total"),
        "first_accuracy": first.mean().item(), "final_accuracy": final.mean().item(),
        "wrong_to_right": ((first == 0) & (final == 1)).float().mean().item(),
        "right_to_wrong": ((first == 1) & (final == 0)).float().mean().item(),
        "reflection_rate": row["has_reflection"],
        "response_tokens": mask.sum(1).float().mean().item(),
        "zero_spread_groups": (r.std(1) < 1e-6).float().mean().item(),
        "groups_kept": keep.float().mean().item(),
        "dropped_with_spread": (~keep & (r.std(1) > 1e-6)).float().mean().item(),  # signal the filter threw away
        **stats, "grad_norm": float("nan") if grad_norm is None else float(grad_norm), "lr": lr,
        "step_s": step_s, "gen_s": gen_s, "score_s": score_s, "update_s": step_s - gen_s - score_s,
        "tokens_per_s": float(mask.sum()) / step_s,
    })
    return row


def write_logs(args, row, updates, prompts, texts, scored, G):
    """The main process's files: the metrics row, one updates.jsonl row per optimizer step, and every
    --sample_every steps the first response of each group with its reward."""
    step = row["step"]
    dataset.append_jsonl(os.path.join(args.out_dir, "metrics.jsonl"), row)
    for u in updates:
        dataset.append_jsonl(os.path.join(args.out_dir, "updates.jsonl"), {"step": step, **u})
    if args.sample_every and step % args.sample_every == 0:
        for i in range(0, len(texts), G):
            p = prompts[i // G]
            dataset.append_jsonl(os.path.join(args.out_dir, "samples.jsonl"), {
                "step": step, "question": p["question"], "gold": p["answer"], "response": texts[i],
                **{k: scored[i][k] for k in rewards.REWARD_KEYS}})


def log_line(step, row):
    return (f"step {step:4d} | reward {row['reward']:.3f} | acc first {row['first_accuracy']:.2f} "
            f"final {row['final_accuracy']:.2f} | w->r {row['wrong_to_right']:.2f} "
            f"r->w {row['right_to_wrong']:.2f} "
            f"| refl {row['reflection_rate']:.2f} | len {row['response_tokens']:.0f} | kl {row['kl']:.4f} "
            f"| clip {row['clip_frac']:.3f} | {row['step_s']:.1f}s (gen {row['gen_s']:.1f}s)")


# ----------------------------------------------------------------------------------------------
# The loop


def main(args: Args):
    check_args(args)
    prompts = dataset.load_prompts(args)  # bad data fails here, before a model loads
    accelerator = training.make_accelerator(args)
    rank, world, is_main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    sharded = training.is_sharded(accelerator)  # ZeRO / FSDP: weights or optimizer states split up
    cli.seed_everything(args.seed + rank)
    system = dataset.SYSTEM_PROMPTS[args.system_prompt if args.system_prompt != "auto"
                                 else ("plain" if args.reward == "grpo" else "reflect")]
    adapter = policy.resolve_model(args.model)[1]
    lora_r = args.lora_r or (16 if adapter or args.load_in_4bit else 0)  # 4-bit weights train only via LoRA
    # no LoRA dropout: the samples come from the policy without it, and the ratio must compare the same policy
    model, processor = training.load_trainable_policy(args, accelerator, lora_r, lora_dropout=0.0)
    ref_model = None
    if args.kl_coef > 0 and not hasattr(model, "peft_config"):  # LoRA: adapters off instead
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        # frozen: no fp32 master copy needed (on a GPU its pass runs under autocast anyway)
        ref_model.to(getattr(torch, training.training_dtype(accelerator, frozen_base=True)))
    tok = processor.tokenizer
    vision_start = tok.convert_tokens_to_ids("<|vision_start|>")
    reward_fn = make_reward_fn(args, lambda s: len(tok(s, add_special_tokens=False).input_ids))
    optimizer, scheduler = training.make_optimizer(args, model, args.steps * args.mu * args.updates_per_rollout)
    training.prepare_deepspeed(accelerator, model, args.micro_batch, args.grad_clip)
    model, optimizer = accelerator.prepare(model, optimizer)
    os.makedirs(args.out_dir, exist_ok=True)
    metrics_path = os.path.join(args.out_dir, "metrics.jsonl")
    start, _ = training.start_or_resume(accelerator, args, training.find_resume(args), scheduler=scheduler,
                                        logs=("metrics.jsonl", "samples.jsonl", "updates.jsonl"))
    if is_main:
        dataset.append_jsonl(os.path.join(args.out_dir, "config.jsonl"),
                             {"start": start, **asdict(args), "lora_r_used": lora_r})
    training.start_trackers(accelerator, args, "srpo-grpo")
    accelerator.print(f"GRPO on {accelerator.device}, processes: {world}, {len(prompts)} prompts, "
                      f"{args.prompts_per_step} x {args.group_size} samples per process per step")

    bar = tqdm(range(start, args.steps), desc=f"GRPO ({args.reward})", disable=not is_main)
    for step in bar:
        if args.stop_after and step == start + args.stop_after:
            break
        t0 = time.time()
        torch.manual_seed(args.seed * 1_000_003 + step * world + rank)  # sampling repeatable across --resume
        mine = dataset.step_prompts(prompts, step, args.prompts_per_step, args.seed, rank, world)
        batch_prompts, images = dataset.batch_images(mine, prompts, args.max_pixels, log=tqdm.write)
        P, G = len(batch_prompts), args.group_size

        # 1. Group sampling: every prompt G times, sampled at temperature T (old policy = current).
        enc = dataset.encode_prompts(processor, [p["question"] for p in batch_prompts], images, system)
        enc = {k: v.to(accelerator.device) for k, v in enc.items()}
        group = dataset.repeat_for_group(enc, G, vision_start)  # (P*G, Lp)
        if step == start:  # before the first rollout: will this recipe fit?
            accelerator.print(training.memory_line(training.memory_estimate(
                model, accelerator, sequences=P * G, prompt_len=enc["input_ids"].shape[1],
                new_tokens=args.max_new_tokens, micro_batch=args.micro_batch, checkpointing=args.gradient_checkpointing,
                gathered_rollout=args.rollout == "fast")))
        # Sharded weights (ZeRO-3, FSDP): gathered whole for this rollout and freed before the update
        # (--rollout fast), or layer by layer in every forward pass, all processes in step (--rollout hf).
        with training.RolloutWeights(accelerator, model, gather=args.rollout == "fast") as rollout_policy:
            rollout_policy.model.eval()
            with accelerator.autocast():
                completion, mask, texts = rollout.generate(
                    rollout_policy.model, processor, group, max_new_tokens=args.max_new_tokens,
                    temperature=args.temperature, top_p=args.top_p, min_new_tokens=args.min_new_tokens,
                    rollout=args.rollout, synced_gpus=rollout_policy.synced_gpus)
        t_gen = time.time() - t0

        # 2. Rewards (Eqs. 4-8): every response against its OWN prompt's gold answer.
        scored = score_responses(texts, batch_prompts, G, reward_fn)
        r = torch.tensor([s["total"] for s in scored], dtype=torch.float32).view(P, G)
        final_acc = torch.tensor([s["final_correct"] for s in scored]).view(P, G).float().mean(1)

        # 3. Group-normalised advantages (Eq. 3), the accuracy filter, and K slices of whole groups.
        advantages = group_advantages(r)  # (P, G)
        keep = group_filter(args.filter, r, final_acc, args.filter_low, args.filter_high)
        slices = update_slices(keep, G, args.updates_per_rollout, lockstep=sharded and world > 1,
                               generator=torch.Generator().manual_seed(args.seed * 1_000_003 + step * world + rank))
        t_score = time.time() - t0 - t_gen

        # 4-5. Old and reference log-probs, then mu passes of K clipped-surrogate steps (Eq. 2).
        model.train()
        stats, grad_norm, lr, updates = grpo_step(
            model, ref_model, accelerator, optimizer, scheduler, group, completion, mask,
            advantages.flatten().to(accelerator.device), slices, args, vision_start)

        # 6. Metrics: one line, one JSONL row (means over all ranks), a row per optimizer step.
        row = step_metrics(scored, r, keep, mask, stats, grad_norm, lr,
                           (t_gen, t_score, time.time() - t0))
        if world > 1:
            keys = sorted(row)
            values = torch.tensor([row[k] for k in keys], device=accelerator.device)
            row = dict(zip(keys, accelerator.reduce(values, "mean").tolist()))
        row = {"step": step + 1, **row}
        accelerator.log(row, step=step + 1)
        if is_main:
            bar.set_postfix(reward=f"{row['reward']:.2f}", acc=f"{row['final_accuracy']:.2f}")
            tqdm.write(log_line(step + 1, row))
            write_logs(args, row, updates, batch_prompts, texts, scored, G)
        if args.save_every and (step + 1) % args.save_every == 0:
            ckpt = os.path.join(args.out_dir, "checkpoint")
            training.save_checkpoint(accelerator, ckpt, scheduler=scheduler, step=step + 1)

    accelerator.wait_for_everyone()
    if args.stop_after and start + args.stop_after < args.steps:
        return {}  # interrupted on purpose: the checkpoint is the state to resume from
    training.save_final(accelerator, model, processor, args.out_dir, sharded=sharded, dtype=args.save_dtype)
    accelerator.end_training()
    if is_main:
        rows = dataset.read_jsonl(metrics_path)
        curves = ["reward", "final_accuracy", "first_accuracy", "wrong_to_right", "response_tokens"]
        training.plot_metrics(rows, curves, os.path.join(args.out_dir, "curves.png"),
                              title=f"GRPO, reward={args.reward}")
        print(f"saved to {args.out_dir}")
        return {"metrics": rows}
    return {}


if __name__ == "__main__":
    cli.run(main, Args)
