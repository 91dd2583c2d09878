"""The student track: the core of SRPO (arXiv 2506.01713) written by you. Fill in every function below.

Each function is a small pure function on tensors or numbers whose semantics equal the project's own
(the grader compares you with them): the label mask and the loss of reflection SFT (Eq. 1), the
log-probs of a response, the reward's effectiveness and length terms (Eqs. 7-8), the group-normalised
advantages (Eq. 3) and the clipped surrogate with its k3 KL (Eq. 2).

    make grade            # grades this file (student/test_grade.py), one named test per convention
    STUDENT=1 python 03_grpo.py --steps 3 --prompts_per_step 4 ...   # then watch your code train the toy

Shapes: B sequences, L tokens a sequence (prompt + response), V vocabulary, T response tokens, P prompts,
G responses a prompt (the group). Nothing here may modify its inputs in place.
"""

import torch

NOT_WRITTEN = "student/core.py: {} is not written yet ({})"


# ----------------------------------------------------------------------------------------------
# Stage 1b: reflection SFT (02_sft.py)


def sft_labels(input_ids, attention_mask, prompt_lens):
    """Eq. 1's mask: the labels of a right-padded SFT batch, -100 everywhere but the assistant target.

    input_ids: (B, L) long, each row = prompt (system + user turn + image tokens + assistant header),
        then the target `<think>..</think><answer>..</answer><reflection>..</reflection><answer>..</answer>`
        and the end-of-turn token `<|im_end|>`, then padding on the right.
    attention_mask: (B, L), 1 on the row's real tokens, 0 on its padding.
    prompt_lens: (B,) long tensor (or list of ints): how many tokens of each row are prompt; the target
        starts at position prompt_lens[i].
    Returns labels: (B, L) long, a new tensor: input_ids where the target is (its end-of-turn token
    included, so the model learns to stop), -100 on the prompt and on padding. No shift here: the loss
    shifts (position t predicts token t + 1).

    Example: input_ids [[5, 6, 7, 8, 2, 0]], attention_mask [[1, 1, 1, 1, 1, 0]], prompt_lens [2]
             -> [[-100, -100, 7, 8, 2, -100]]
    """
    raise NotImplementedError(NOT_WRITTEN.format("sft_labels", "Eq. 1"))


def sft_loss(logits, labels):
    """Eq. 1: next-token cross-entropy on the target tokens, averaged over every target token of the batch.

    logits: (B, L, V), the model's output on the whole sequence: logits[:, t] predict token t + 1.
    labels: (B, L) long, from sft_labels (-100 = not trained on).
    Returns a scalar: -sum over (i, t) with labels[i, t] != -100 of log softmax(logits[i, t - 1])[labels[i, t]],
    divided by the number of such tokens (a token mean over the batch, as 02_sft.py: a long target weighs
    more than a short one, not each row the same).

    Example: all-zero logits give every token probability 1/V, so the loss is log V.
    """
    raise NotImplementedError(NOT_WRITTEN.format("sft_loss", "Eq. 1"))


# ----------------------------------------------------------------------------------------------
# The log-probs both stages need


def response_logprobs(logits, input_ids, prompt_len, temperature=1.0):
    """log pi(o_t | q, o_<t) of every response token, from the logits of the whole sequence.

    logits: (B, L, V), the model's output on prompt + response: logits[:, t] predict token t + 1.
    input_ids: (B, L), the prompt (left-padded to one length, prompt_len) followed by the response.
    prompt_len: int, where the response starts (every row: GRPO's prompts are left-padded).
    temperature: the sampling temperature T; the log-probs are those of softmax(logits / T), the
        distribution the responses were sampled from (03_grpo.py samples and scores at the same T).
    Returns (B, T) with T = L - prompt_len: entry [i, t] = log softmax(logits[i, prompt_len + t - 1] / T)
    at token input_ids[i, prompt_len + t]. Compute it in float32.

    Example: L = 5, prompt_len = 3: the two response tokens 3 and 4 are scored by logits 2 and 3.
    """
    raise NotImplementedError(NOT_WRITTEN.format("response_logprobs", "the log-probs of Eq. 2's ratio"))


# ----------------------------------------------------------------------------------------------
# Stage 2: the reflection-aware reward (rewards.py), two of its terms


def i_eff(first_correct, final_correct):
    """Eq. 7: the reflection's effectiveness I_eff, judged on the answer before and after the reflection.

    first_correct, final_correct: bool, whether the first answer and the final answer are right.
    Returns a float: +0.25 right stays right, +0.5 wrong becomes right, 0 wrong stays wrong,
    -0.25 right becomes wrong.
    """
    raise NotImplementedError(NOT_WRITTEN.format("i_eff", "Eq. 7"))


def f_len(response_len, first_len):
    """Eq. 8: the length reward f_len(L) = exp(-(|L - T_target| / (T_max - T_target))^2).

    response_len: L, the token length of the whole response.
    first_len: B, the token length of the first solution (first think + first answer).
    T_target = 2 B and T_max = 2.5 B: f_len is 1 at L = 2 B and 1/e at L = 1.5 B or 2.5 B.
    Returns a float; 0.0 when first_len <= 0 (no first solution: nothing to measure against).

    Example: f_len(20, 10) == 1.0, f_len(25, 10) == f_len(15, 10) == exp(-1)
    """
    raise NotImplementedError(NOT_WRITTEN.format("f_len", "Eq. 8"))


# ----------------------------------------------------------------------------------------------
# Stage 2: GRPO (03_grpo.py)

EPS = 1e-4  # Eq. 3's eps, 03_grpo.py's


def group_advantages(rewards):
    """Eq. 3: A_i = (r_i - mean(r)) / (std(r) + eps) within each group. (P, G) -> (P, G)

    rewards: (P, G) float, row p = the rewards of prompt p's G responses.
    mean and std are over the group (the row), std is torch's default (unbiased, n - 1 in the
    denominator), eps = EPS = 1e-4, added to the std. A group whose rewards are all equal gets
    advantages 0 (finite: no learning signal), never nan.

    Example: [[1., 0., 0., 1.]] -> [[0.866, -0.866, -0.866, 0.866]]
    """
    raise NotImplementedError(NOT_WRITTEN.format("group_advantages", "Eq. 3"))


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, clip_eps=0.2, kl_coef=0.0, loss_agg="token-mean"):
    """Eq. 2, negated to a loss: the clipped surrogate with the k3 KL, per token, then aggregated.

    logp: (B, T) log pi_theta of each response token (carries the gradient).
    old_logp: (B, T) log pi_old, the policy that sampled (no gradient). rho = exp(logp - old_logp).
    ref_logp: (B, T) log pi_ref of the frozen reference, or None (then no KL term).
    advantages: (B,), one per response (Eq. 3), shared by all its tokens.
    mask: (B, T) float, 1 on response tokens, 0 on padding after the end (padding never counts).
    Per token:  -min(rho * A, clip(rho, 1 - clip_eps, 1 + clip_eps) * A) + kl_coef * k3,
        k3 = exp(ref_logp - logp) - (ref_logp - logp) - 1   (an estimate of KL(pi_theta || pi_ref), >= 0)
    Aggregation (loss_agg, 03_grpo.py's names):
        "token-mean": the sum over every response token of the batch / their number (03's default);
        "seq-mean-token-mean": each response's token mean, then the mean over responses (original GRPO).
    Returns a scalar tensor whose gradient flows to logp.

    Example: with old_logp == logp (one update a rollout: rho = 1) and no KL, the loss is minus the
    token-weighted mean of the advantages.
    """
    raise NotImplementedError(NOT_WRITTEN.format("grpo_loss", "Eq. 2"))
