"""The catalogue of usual mistakes: each a wrong implementation of one function of student/core.py, named,
with its one-line description (its docstring's first line). tests/test_grader.py checks that every one
fails at least one test of the grader; `make grade MISTAKE=name` shows how it fails.

Spoiler: each is one change away from a right answer. Read it after your own code passes.
"""

import math

import torch
import torch.nn.functional as F

EPS = 1e-4


# ----------------------------------------------------------------------------------------------
# sft_labels (Eq. 1)


def _labels(input_ids, attention_mask, prompt_lens, start_shift=0, end_shift=0, pad=True):
    labels = input_ids.clone()
    for i, n in enumerate(prompt_lens):
        labels[i, :int(n) + start_shift] = -100
        if end_shift:
            labels[i, int(attention_mask[i].sum()) + end_shift:] = -100
    if pad:
        labels[attention_mask == 0] = -100
    return labels


def label_mask_one_short(input_ids, attention_mask, prompt_lens):
    """The mask stops one token early: the prompt's last token (the assistant header) is trained on."""
    return _labels(input_ids, attention_mask, prompt_lens, start_shift=-1)


def label_mask_one_long(input_ids, attention_mask, prompt_lens):
    """The mask runs one token late: the target's first token (its `<think>`) is never trained on."""
    return _labels(input_ids, attention_mask, prompt_lens, start_shift=1)


def padding_not_masked(input_ids, attention_mask, prompt_lens):
    """Padding keeps its pad id as a label: the model learns to predict padding after the end."""
    return _labels(input_ids, attention_mask, prompt_lens, pad=False)


def end_of_turn_not_trained(input_ids, attention_mask, prompt_lens):
    """The target's last token (<|im_end|>) is masked: the model never learns to stop."""
    return _labels(input_ids, attention_mask, prompt_lens, end_shift=-1)


def labels_pre_shifted(input_ids, attention_mask, prompt_lens):
    """The labels are shifted here (labels[t] = input_ids[t + 1]) and again by the loss: off by one."""
    labels = _labels(input_ids, attention_mask, prompt_lens)
    return torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1)


def labels_alias_input_ids(input_ids, attention_mask, prompt_lens):
    """labels = input_ids without a copy: the -100s are written into the batch's input_ids."""
    labels = input_ids
    for i, n in enumerate(prompt_lens):
        labels[i, :int(n)] = -100
    labels[attention_mask == 0] = -100
    return labels


# ----------------------------------------------------------------------------------------------
# sft_loss (Eq. 1)


def sft_loss_not_shifted(logits, labels):
    """Logits at position t scored against token t (no shift): the model is taught to copy its input."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())


def sft_loss_sequence_mean(logits, labels):
    """Each row's token mean, then the mean over rows: a short target's tokens weigh more than in 02."""
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), labels[:, 1:], reduction="none")  # (B, L-1)
    n = (labels[:, 1:] != -100).sum(1)
    return (ce.sum(1) / n.clamp(min=1)).mean()


def sft_loss_summed(logits, labels):
    """The cross-entropy summed over the target tokens, not averaged: the loss scales with the batch."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), reduction="sum")


# ----------------------------------------------------------------------------------------------
# response_logprobs


def logprobs_not_shifted(logits, input_ids, prompt_len, temperature=1.0):
    """Token t scored by logits t instead of t - 1: the log-prob of the token the model already saw."""
    logp = torch.log_softmax(logits[:, prompt_len:].float() / temperature, -1)
    return logp.gather(-1, input_ids[:, prompt_len:, None]).squeeze(-1)


def logprobs_without_temperature(logits, input_ids, prompt_len, temperature=1.0):
    """The temperature left out: the ratio compares softmax(logits) with the policy that sampled at T."""
    logp = torch.log_softmax(logits[:, prompt_len - 1:-1].float(), -1)
    return logp.gather(-1, input_ids[:, prompt_len:, None]).squeeze(-1)


def log_softmax_over_positions(logits, input_ids, prompt_len, temperature=1.0):
    """log_softmax over dim 1 (the positions) instead of the vocabulary (dim -1)."""
    logp = torch.log_softmax(logits[:, prompt_len - 1:-1].float() / temperature, 1)
    return logp.gather(-1, input_ids[:, prompt_len:, None]).squeeze(-1)


# ----------------------------------------------------------------------------------------------
# i_eff (Eq. 7) and f_len (Eq. 8)


def i_eff_arguments_swapped(first_correct, final_correct):
    """First and final answer swapped: a reflection that breaks a right answer earns +0.5."""
    table = {(True, True): 0.25, (False, True): 0.5, (True, False): -0.25, (False, False): 0.0}
    return table[(bool(final_correct), bool(first_correct))]


def i_eff_no_penalty(first_correct, final_correct):
    """Right -> wrong earns 0 instead of -0.25: a reflection may break a right answer for free."""
    return {(True, True): 0.25, (False, True): 0.5}.get((bool(first_correct), bool(final_correct)), 0.0)


def _f_len(L, B, target=2.0, most=2.5, power=2, guard=True, scale=None):
    if guard and B <= 0:
        return 0.0
    t_target, t_max = target * B, most * B
    return math.exp(-((abs(L - t_target) / (scale or t_max - t_target)) ** power))


def f_len_target_and_max_swapped(response_len, first_len):
    """T_target = 2.5 B and T_max = 2 B: the peak sits at 2.5 B, where the paper puts 1/e."""
    return _f_len(response_len, first_len, target=2.5, most=2.0)


def f_len_lengths_confused(response_len, first_len):
    """L and the first solution's length B confused: the target is twice the whole response."""
    return _f_len(first_len, response_len)


def f_len_not_squared(response_len, first_len):
    """exp(-|x|) instead of exp(-x^2): a sharp peak with heavy tails instead of Eq. 8's Gaussian bump."""
    return _f_len(response_len, first_len, power=1)


def f_len_scaled_by_target(response_len, first_len):
    """|L - T_target| divided by T_target instead of T_max - T_target: four times too wide."""
    return _f_len(response_len, first_len, scale=2.0 * first_len if first_len > 0 else 1.0)


def f_len_no_guard(response_len, first_len):
    """No first solution (B = 0) is not handled: a division by zero instead of 0."""
    return _f_len(response_len, first_len, guard=False)


# ----------------------------------------------------------------------------------------------
# group_advantages (Eq. 3)


def advantage_sign_flipped(rewards):
    """(mean - r) instead of (r - mean): the policy is pushed toward its worst responses."""
    return (rewards.mean(1, keepdim=True) - rewards) / (rewards.std(1, keepdim=True) + EPS)


def population_std(rewards):
    """The population std (n in the denominator, numpy's default), not torch's unbiased n - 1."""
    return (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True, unbiased=False) + EPS)


def advantage_without_eps(rewards):
    """No eps: a group whose rewards are all equal divides 0 by 0 and gives nan."""
    return (rewards - rewards.mean(1, keepdim=True)) / rewards.std(1, keepdim=True)


def advantage_over_the_batch(rewards):
    """Mean and std over the whole batch instead of within each group (prompt)."""
    return (rewards - rewards.mean()) / (rewards.std() + EPS)


def advantage_not_scaled(rewards):
    """r - mean without the division by the std (Dr. GRPO's choice, not the paper's Eq. 3)."""
    return rewards - rewards.mean(1, keepdim=True)


# ----------------------------------------------------------------------------------------------
# grpo_loss (Eq. 2)


def _aggregate(per_token, mask, how):
    if how == "token-mean":
        return (per_token * mask).sum() / mask.sum().clamp(min=1)
    return ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()


def _loss(logp, old_logp, ref_logp, advantages, mask, clip_eps, kl_coef, loss_agg, *, objective=None,
          kl=None, kl_sign=1.0, ratio=None, sign=-1.0, agg=None):
    """The right loss, with one piece swappable (each mistake below swaps one)."""
    rho = torch.exp(logp - old_logp) if ratio is None else ratio(logp, old_logp)
    A = advantages[:, None]
    clipped = torch.clamp(rho, 1 - clip_eps, 1 + clip_eps)
    per_token = sign * (torch.min(rho * A, clipped * A) if objective is None else objective(rho, clipped, A))
    if ref_logp is not None:
        d = ref_logp - logp
        per_token = per_token + kl_sign * kl_coef * (torch.exp(d) - d - 1 if kl is None else kl(logp, ref_logp))
    return (agg or _aggregate)(per_token, mask, loss_agg)


def clip_wrong_side_for_negative_advantages(logp, old_logp, ref_logp, advantages, mask, clip_eps=0.2, kl_coef=0.0,
                                            loss_agg="token-mean"):
    """min(rho, clip(rho)) * A: for A < 0 the min picks the optimistic side, so a bad token is pushed unclipped."""
    return _loss(logp, old_logp, ref_logp, advantages, mask, clip_eps, kl_coef, loss_agg,
                 objective=lambda rho, clipped, A: torch.min(rho, clipped) * A)


def clipped_term_only(logp, old_logp, ref_logp, advantages, mask, clip_eps=0.2, kl_coef=0.0, loss_agg="token-mean"):
    """clip(rho) * A without the min: the pessimistic bound is lost (and rho outside the clip gets no gradient)."""
    return _loss(logp, old_logp, ref_logp, advantages, mask, clip_eps, kl_coef, loss_agg,
                 objective=lambda rho, clipped, A: clipped * A)


def objective_not_negated(logp, old_logp, ref_logp, advantages, mask, clip_eps=0.2, kl_coef=0.0,
                          loss_agg="token-mean"):
    """The surrogate returned as the loss without its minus sign: gradient descent then lowers the reward."""
    return _loss(logp, old_logp, ref_logp, advantages, mask, clip_eps, kl_coef, loss_agg, sign=1.0)


def kl_k1(logp, old_logp, ref_logp, advantages, mask, clip_eps=0.2, kl_coef=0.0, loss_agg="token-mean"):
    """The k1 estimator log pi_theta - log pi_ref instead of k3: unbiased but can be negative per token."""
    return _loss(logp, old_logp, ref_logp, advantages, mask, clip_eps, kl_coef, loss_agg,
                 kl=lambda lp, ref: lp - ref)


def kl_k3_reversed(logp, old_logp, ref_logp, advantages, mask, clip_eps=0.2, kl_coef=0.0, loss_agg="token-mean"):
    """k3 with pi_theta and pi_ref swapped (exp(logp - ref) - (logp - ref) - 1): it estimates KL(ref || theta)."""
    return _loss(logp, old_logp, ref_logp, advantages, mask, clip_eps, kl_coef, loss_agg,
                 kl=lambda lp, ref: torch.exp(lp - ref) - (lp - ref) - 1)


def kl_rewarded(logp, old_logp, ref_logp, advantages, mask, clip_eps=0.2, kl_coef=0.0, loss_agg="token-mean"):
    """The KL subtracted from the loss: drifting away from the reference is rewarded, not penalised."""
    return _loss(logp, old_logp, ref_logp, advantages, mask, clip_eps, kl_coef, loss_agg, kl_sign=-1.0)


def loss_agg_ignored(logp, old_logp, ref_logp, advantages, mask, clip_eps=0.2, kl_coef=0.0, loss_agg="token-mean"):
    """Always the per-response mean (seq-mean-token-mean), whatever loss_agg asks: 03's default is token-mean."""
    return _loss(logp, old_logp, ref_logp, advantages, mask, clip_eps, kl_coef, "seq-mean-token-mean")


def padding_in_the_mean(logp, old_logp, ref_logp, advantages, mask, clip_eps=0.2, kl_coef=0.0,
                        loss_agg="token-mean"):
    """The mask ignored: padding after a response's end counts as tokens of the mean."""
    return _loss(logp, old_logp, ref_logp, advantages, mask, clip_eps, kl_coef, loss_agg,
                 agg=lambda per_token, m, how: _aggregate(per_token, torch.ones_like(m), how))


def ratio_detached(logp, old_logp, ref_logp, advantages, mask, clip_eps=0.2, kl_coef=0.0, loss_agg="token-mean"):
    """rho computed from logp.detach(): the value is right but the surrogate has no gradient."""
    return _loss(logp, old_logp, ref_logp, advantages, mask, clip_eps, kl_coef, loss_agg,
                 ratio=lambda lp, old: torch.exp(lp.detach() - old))


# ----------------------------------------------------------------------------------------------

CATALOGUE = {f.__name__: (function, f) for function, fs in {
    "sft_labels": (label_mask_one_short, label_mask_one_long, padding_not_masked, end_of_turn_not_trained,
                   labels_pre_shifted, labels_alias_input_ids),
    "sft_loss": (sft_loss_not_shifted, sft_loss_sequence_mean, sft_loss_summed),
    "response_logprobs": (logprobs_not_shifted, logprobs_without_temperature, log_softmax_over_positions),
    "i_eff": (i_eff_arguments_swapped, i_eff_no_penalty),
    "f_len": (f_len_target_and_max_swapped, f_len_lengths_confused, f_len_not_squared, f_len_scaled_by_target,
              f_len_no_guard),
    "group_advantages": (advantage_sign_flipped, population_std, advantage_without_eps, advantage_over_the_batch,
                         advantage_not_scaled),
    "grpo_loss": (clip_wrong_side_for_negative_advantages, clipped_term_only, objective_not_negated, kl_k1,
                  kl_k3_reversed, kl_rewarded, loss_agg_ignored, padding_in_the_mean, ratio_detached),
}.items() for f in fs}


def describe(name):
    """The mistake's one-line description: its docstring's first line."""
    return CATALOGUE[name][1].__doc__.strip().splitlines()[0]
