"""The grader: `make grade` runs these tests on student/core.py, `make grade REF=1` on the project's own functions.

Each test checks one convention of one function against the project's (student/adapters.py: the reference),
and says on failure which equation, what was expected, what came back and what to look at. The catalogue
of usual mistakes (student/mistakes.py) is kept honest by tests/test_grader.py: each fails a test here.
Every test takes only `impl` (the functions under test), so it can be called with any implementation.
"""

import functools
import math

import pytest
import torch

from student import adapters

REF = adapters.reference()  # the expected values come from the project's functions


# ----------------------------------------------------------------------------------------------
# Helpers: calls that report a stub as "not written", comparisons that show expected vs got


def call(impl, name, *args, **kwargs):
    try:
        return getattr(impl, name)(*args, **kwargs)
    except NotImplementedError as e:
        pytest.fail(f"{e}: write it in student/core.py", pytrace=False)


def show(x):
    """A value as a reader wants it in a message: numbers to 6 digits, big tensors by their shape."""
    if isinstance(x, torch.Tensor):
        if x.numel() > 40:
            return f"tensor of shape {tuple(x.shape)}"
        x = x.detach().tolist()
    if isinstance(x, float):
        return f"{x:.6g}"
    if isinstance(x, (list, tuple)):
        return "[" + ", ".join(show(v) for v in x) + "]"
    return repr(x)


def fail(name, what, expected, got, hint):
    pytest.fail(f"{name} ({adapters.EQUATIONS[name]}), {what}:\n  expected {show(expected)}\n  got      {show(got)}\n"
                f"  {hint}", pytrace=False)


def check_tensor(name, what, got, want, hint, atol=1e-5, rtol=1e-5):
    if not isinstance(got, torch.Tensor):
        fail(name, what, want, got, f"return a torch.Tensor, not {type(got).__name__}")
    if got.shape != want.shape:
        fail(name, what + " (shape)", tuple(want.shape), tuple(got.shape), hint)
    if want.dtype in (torch.int64, torch.bool):
        if not torch.equal(got.long(), want.long()):
            bad = (got.long() != want.long()).nonzero().tolist()[:6]
            fail(name, f"{what} (differs at index {bad})", want, got, hint)
    elif not torch.allclose(got.detach().double(), want.detach().double(), atol=atol, rtol=rtol):
        fail(name, what, want, got, hint)


def check_number(name, what, got, want, hint, tol=1e-7):
    try:
        value = float(got)
    except (TypeError, ValueError):
        fail(name, what, want, got, f"return a number, not {type(got).__name__}")
    if not math.isclose(value, want, rel_tol=tol, abs_tol=tol):
        fail(name, what, want, value, hint)


# ----------------------------------------------------------------------------------------------
# sft_labels (Eq. 1)

EOT, PAD = 2, 0


def sft_batch():
    """Two right-padded rows: prompt (4 and 3 tokens), target, <|im_end|> (id 2), padding (id 0)."""
    input_ids = torch.tensor([[11, 12, 13, 14, 21, 22, 23, EOT],
                              [11, 12, 15, 24, 25, EOT, PAD, PAD]])
    attention_mask = torch.tensor([[1] * 8, [1] * 6 + [0] * 2])
    return input_ids, attention_mask, torch.tensor([4, 3])


def labels_of(impl, batch=None):
    ids, mask, lens = batch or sft_batch()
    return call(impl, "sft_labels", ids.clone(), mask.clone(), lens.clone()), REF.sft_labels(ids, mask, lens)


def test_sft_labels_mask_the_prompt_and_train_the_target_from_its_first_token(impl):
    got, want = labels_of(impl)
    for i, n in enumerate(sft_batch()[2].tolist()):  # the prompt and the target's first token
        check_tensor("sft_labels", f"row {i}, positions 0..{n} (the prompt has {n} tokens)", got[i, :n + 1],
                     want[i, :n + 1], "the prompt's positions 0..prompt_len-1 get -100; the target starts at "
                     "position prompt_len and keeps its own token id there (no shift: the loss shifts)")


def test_sft_labels_mask_the_padding(impl):
    got, want = labels_of(impl)
    check_tensor("sft_labels", "row 1's padding (attention_mask 0, last two positions)", got[1, 6:], want[1, 6:],
                 "padding is not a target: -100 wherever attention_mask is 0")


def test_sft_labels_train_the_end_of_turn_token(impl):
    got, want = labels_of(impl)
    check_tensor("sft_labels", "the last real token of each row (<|im_end|>, id 2)", got[[0, 1], [7, 5]],
                 want[[0, 1], [7, 5]], "the end-of-turn token is part of the target: trained on, so the model "
                 "learns to stop")


def test_sft_labels_whole_batch(impl):
    got, want = labels_of(impl)
    check_tensor("sft_labels", "the whole batch", got, want, "-100 on prompt and padding, the ids elsewhere")


def test_sft_labels_leave_input_ids_alone(impl):
    ids, mask, lens = sft_batch()
    before = ids.clone()
    call(impl, "sft_labels", ids, mask, lens)
    check_tensor("sft_labels", "input_ids after the call", ids, before, "return a new tensor (input_ids.clone()): "
                 "writing -100 into input_ids corrupts the batch the model reads")


@functools.lru_cache(maxsize=1)
def toy_conversations():
    """Two real SFT rows of the toy (image + question + reflective target) encoded by dataset.encode_sft."""
    from machinery import dataset, policy
    import toy

    processor = policy.load_processor(f"{adapters.ROOT}/toy/base_model")
    rows = toy.toy_dataset("test", 2)
    targets = [toy.cot_response(p) + f"\n<reflection>Checked.</reflection>\n<answer>{p['answer']}</answer>"
               for p in rows]
    return dataset.encode_sft(processor, list(rows["question"]), list(rows["image"]), targets,
                              dataset.SYSTEM_PROMPTS["reflect"])


def test_sft_labels_on_real_toy_conversations(impl):
    batch = toy_conversations()
    want = batch["labels"]
    prompt_lens = (want != -100).int().argmax(1)  # where encode_sft's target starts (image tokens included)
    got = call(impl, "sft_labels", batch["input_ids"].clone(), batch["attention_mask"].clone(), prompt_lens)
    check_tensor("sft_labels", "two toy conversations encoded by machinery/dataset.py's encode_sft", got, want,
                 f"prompt_lens {prompt_lens.tolist()}, attention_mask sums {batch['attention_mask'].sum(1).tolist()}")


# ----------------------------------------------------------------------------------------------
# sft_loss (Eq. 1)


def peaked_logits(input_ids, V=32, height=30.0):
    """Logits whose position t puts (almost) all mass on token t + 1: a model that predicts perfectly."""
    B, L = input_ids.shape
    logits = torch.zeros(B, L, V)
    logits[:, :-1].scatter_(-1, input_ids[:, 1:, None], height)
    return logits


def test_sft_loss_of_uniform_logits_is_log_vocabulary(impl):
    labels = REF.sft_labels(*sft_batch())
    got = call(impl, "sft_loss", torch.zeros(2, 8, 32), labels)
    check_number("sft_loss", "all-zero logits (V = 32)", got, math.log(32), "each target token has probability 1/32: "
                 "the mean cross-entropy is log 32 = 3.466 whatever the number of tokens (a mean, not a sum)", 1e-5)


def test_sft_loss_shift_logits_at_t_predict_token_t_plus_1(impl):
    ids, mask, lens = sft_batch()
    labels = REF.sft_labels(ids, mask, lens)
    got = call(impl, "sft_loss", peaked_logits(ids), labels)
    check_number("sft_loss", "logits that put all mass on the NEXT token (a perfect model)", got,
                 float(REF.sft_loss(peaked_logits(ids), labels)), "the loss should be ~0: score label t with "
                 "logits[:, t - 1] (logits[:, :-1] against labels[:, 1:])", 1e-4)


def test_sft_loss_token_mean_over_the_batch(impl):
    torch.manual_seed(1)
    ids, mask, lens = sft_batch()
    labels, logits = REF.sft_labels(ids, mask, lens), torch.randn(2, 8, 32) * 3
    got = call(impl, "sft_loss", logits.clone(), labels)
    check_number("sft_loss", "random logits, targets of 4 and 3 tokens", got, float(REF.sft_loss(logits, labels)),
                 "02_sft.py averages over every target token of the batch (sum / 7 here), not row by row", 1e-5)


# ----------------------------------------------------------------------------------------------
# response_logprobs


def logprob_case(seed=0, B=3, Lp=4, T=5, V=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, Lp + T, V, generator=g) * 2, torch.randint(0, V, (B, Lp + T), generator=g), Lp


def test_response_logprobs_shape(impl):
    logits, ids, Lp = logprob_case()
    got = call(impl, "response_logprobs", logits, ids, Lp)
    check_tensor("response_logprobs", "the output for L = 9, prompt_len = 4", got,
                 REF.response_logprobs(logits, ids, Lp), "one log-prob per response token: shape (B, L - prompt_len)")


def test_response_logprobs_shift_logits_at_t_predict_token_t_plus_1(impl):
    _, ids, Lp = logprob_case()
    logits = peaked_logits(ids, V=16)
    got = call(impl, "response_logprobs", logits, ids, Lp)
    check_tensor("response_logprobs", "logits that put all mass on the NEXT token", got,
                 REF.response_logprobs(logits, ids, Lp), "all ~0: response token prompt_len + t is scored by "
                 "logits[:, prompt_len + t - 1] (use logits[:, prompt_len - 1:-1])", atol=1e-4)


def test_response_logprobs_match_03(impl):
    logits, ids, Lp = logprob_case(seed=1)
    got = call(impl, "response_logprobs", logits.clone(), ids, Lp)
    check_tensor("response_logprobs", "random logits at T = 1", got, REF.response_logprobs(logits, ids, Lp),
                 "log_softmax over the vocabulary (dim -1), gathered at the next token")


def test_response_logprobs_temperature(impl):
    logits, ids, Lp = logprob_case(seed=2)
    got = call(impl, "response_logprobs", logits.clone(), ids, Lp, temperature=0.7)
    check_tensor("response_logprobs", "random logits at T = 0.7", got, REF.response_logprobs(logits, ids, Lp, 0.7),
                 "log softmax(logits / T): the distribution 03_grpo.py sampled from")


# ----------------------------------------------------------------------------------------------
# i_eff (Eq. 7) and f_len (Eq. 8)


def test_i_eff_table(impl):
    cases = [(True, True), (False, True), (True, False), (False, False)]
    got = [call(impl, "i_eff", a, b) for a, b in cases]
    want = [REF.i_eff(a, b) for a, b in cases]
    words = {True: "right", False: "wrong"}
    for (a, b), g, w in zip(cases, got, want):
        check_number("i_eff", f"first answer {words[a]}, final answer {words[b]}", g, w,
                     "Eq. 7: right->right +0.25, wrong->right +0.5, wrong->wrong 0, right->wrong -0.25; "
                     f"all four: expected {want}, got {got}")


def test_f_len_is_one_at_twice_the_first_solution(impl):
    for B in (10, 7, 33):
        check_number("f_len", f"f_len({2 * B}, {B})", call(impl, "f_len", 2 * B, B), REF.f_len(2 * B, B),
                     "T_target = 2 x the first solution's length: f_len is 1 there")


def test_f_len_is_one_over_e_at_half_a_first_solution_off(impl):
    for L in (15, 25):
        check_number("f_len", f"f_len({L}, 10)", call(impl, "f_len", L, 10), REF.f_len(L, 10),
                     "T_max - T_target = 2.5 B - 2 B = 5 here: |L - 20| / 5 = 1, so exp(-1) = 0.368")


def test_f_len_curve(impl):
    for B in (4, 10, 17):
        for L in range(0, 61, 3):
            check_number("f_len", f"f_len({L}, {B})", call(impl, "f_len", L, B), REF.f_len(L, B),
                         "exp(-(|L - 2B| / (2.5B - 2B))^2): the square makes a Gaussian bump around 2B")


def test_f_len_without_a_first_solution(impl):
    check_number("f_len", "f_len(30, 0) (no first think or answer)", call(impl, "f_len", 30, 0), REF.f_len(30, 0),
                 "first_len <= 0: return 0.0 (rewards.py's choice), do not divide by T_max - T_target = 0")


# ----------------------------------------------------------------------------------------------
# group_advantages (Eq. 3)


def test_group_advantages_docstring_example(impl):
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    check_tensor("group_advantages", "rewards [[1, 0, 0, 1]]", call(impl, "group_advantages", r.clone()),
                 REF.group_advantages(r), "mean 0.5, torch's unbiased std 0.577 (n - 1 = 3 in the variance): "
                 "+-0.5 / 0.577 = +-0.866; the population std (n = 4) gives +-1", atol=1e-3)


def test_group_advantages_better_reward_higher_advantage(impl):
    r = torch.tensor([[0.0, 1.6, 0.85]])
    got, want = call(impl, "group_advantages", r.clone()), REF.group_advantages(r)
    if not isinstance(got, torch.Tensor) or got.shape != want.shape or not torch.equal(got.sign(), want.sign()):
        fail("group_advantages", "the signs for rewards [[0, 1.6, 0.85]] (mean 0.817)", want.sign(), got,
             "r_i - mean(r): a response better than its group's mean gets a positive advantage")


def test_group_advantages_all_equal_group_gives_zeros(impl):
    r = torch.tensor([[1.1, 1.1, 1.1, 1.1], [0.0, 1.5, 0.0, 1.5]])
    got = call(impl, "group_advantages", r.clone())
    if isinstance(got, torch.Tensor) and not torch.isfinite(got).all():
        fail("group_advantages", "a group whose rewards are all equal (std 0)", REF.group_advantages(r), got,
             "std + eps in the denominator (eps = 1e-4): 0 / (0 + eps) = 0, never 0 / 0 = nan")
    check_tensor("group_advantages", "a group of equal rewards beside one with spread", got, REF.group_advantages(r),
                 "no spread, no signal: zeros")


def test_group_advantages_each_group_on_its_own(impl):
    r = torch.tensor([[1.0, 0.0, 0.5, 1.5], [10.0, 10.0, 12.0, 11.0]])
    got = call(impl, "group_advantages", r.clone())
    check_tensor("group_advantages", "two groups on different scales", got, REF.group_advantages(r),
                 "mean and std within each row (group), over dim 1: a group is compared only with itself",
                 atol=1e-4)


def test_group_advantages_match_03(impl):
    r = torch.rand(3, 8, generator=torch.Generator().manual_seed(3)) * 1.6
    before = r.clone()
    got = call(impl, "group_advantages", r)
    check_tensor("group_advantages", "random rewards, P = 3, G = 8", got, REF.group_advantages(before),
                 "Eq. 3 exactly as 03_grpo.py: torch's std (n - 1), eps = 1e-4 added to the std", atol=1e-6)
    check_tensor("group_advantages", "the rewards after the call", r, before, "do not modify the rewards in place")


# ----------------------------------------------------------------------------------------------
# grpo_loss (Eq. 2)


def loss_case(ratios, advantages, lengths=None, T=4, seed=0):
    """logp, old_logp and mask with the given per-row ratio rho = exp(logp - old_logp) on every token."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(len(ratios), T, generator=g) * 3
    logp = old + torch.log(torch.tensor(ratios))[:, None]
    lengths = lengths or [T] * len(ratios)
    mask = torch.tensor([[1.0] * n + [0.0] * (T - n) for n in lengths])
    return logp, old, torch.tensor(advantages), mask


def loss_of(impl, logp, old, ref, adv, mask, **kw):
    return call(impl, "grpo_loss", logp.clone(), old.clone(), None if ref is None else ref.clone(), adv.clone(),
                mask.clone(), **kw)


def test_grpo_loss_at_ratio_one_is_minus_the_mean_advantage(impl):
    logp, old, adv, mask = loss_case([1.0, 1.0, 1.0], [1.0, -0.5, 0.25], lengths=[4, 2, 1])
    check_number("grpo_loss", "rho = 1 (old_logp == logp), A = [1, -0.5, 0.25], lengths [4, 2, 1], no KL",
                 loss_of(impl, logp, old, None, adv, mask), float(REF.grpo_loss(logp, old, None, adv, mask)),
                 "-(4 x 1 - 2 x 0.5 + 1 x 0.25) / 7 tokens = -0.464: minus the objective, averaged over the "
                 "batch's tokens (token-mean, 03's default)", 1e-5)


def _check_clip(impl, sign):
    for rho in (1.5, 0.5, 1.1, 0.9):
        logp, old, adv, mask = loss_case([rho], [sign])
        want = float(REF.grpo_loss(logp, old, None, adv, mask))
        side = "1 + eps = 1.2" if rho > 1 else "1 - eps = 0.8"
        check_number("grpo_loss", f"one response, A = {sign:+.0f}, rho = {rho}, clip_eps 0.2",
                     loss_of(impl, logp, old, None, adv, mask), want,
                     f"-min(rho A, clip(rho, 0.8, 1.2) A) = {want:+.2f}: the min keeps the pessimistic term, so the "
                     f"clip at {side} acts only where it lowers the objective (A > 0: rho above 1.2; A < 0: rho "
                     "below 0.8)", 1e-5)


def test_grpo_loss_clip_positive_advantage(impl):
    _check_clip(impl, 1.0)


def test_grpo_loss_clip_negative_advantage(impl):
    _check_clip(impl, -1.0)


def kl_case(seed=4):
    logp, old, adv, mask = loss_case([1.0, 1.0, 1.0], [0.0, 0.0, 0.0], lengths=[4, 3, 2], seed=seed)
    ref = old + torch.randn(old.shape, generator=torch.Generator().manual_seed(seed)) * 0.7
    return logp, old, ref, adv, mask


def test_grpo_loss_k3_kl(impl):
    logp, old, ref, adv, mask = kl_case()
    want = float(REF.grpo_loss(logp, old, ref, adv, mask, kl_coef=0.5))
    check_number("grpo_loss", "A = 0 (no surrogate), kl_coef = 0.5, ref_logp != logp",
                 loss_of(impl, logp, old, ref, adv, mask, kl_coef=0.5), want,
                 f"+kl_coef x token-mean of k3 = exp(ref - logp) - (ref - logp) - 1 = {want:.4f}: k3 >= 0 on "
                 "every token, and it is added to the loss (a penalty)", 1e-5)


def test_grpo_loss_no_reference_no_kl(impl):
    logp, old, _, adv, mask = kl_case()
    adv = torch.tensor([0.5, -1.0, 2.0])
    check_number("grpo_loss", "ref_logp None with kl_coef 0.1", loss_of(impl, logp, old, None, adv, mask, kl_coef=0.1),
                 float(REF.grpo_loss(logp, old, None, adv, mask, kl_coef=0.1)),
                 "ref_logp None means no KL term (03_grpo.py passes None when kl_coef is 0)", 1e-5)


def rich_case():
    """Ratios inside and outside the clip on both sides, both signs of A, ragged lengths, a reference."""
    g = torch.Generator().manual_seed(5)
    old = -torch.rand(6, 7, generator=g) * 3
    logp = old + (torch.rand(6, 7, generator=g) - 0.5) * 1.2  # rho in [0.55, 1.8]
    ref = old + torch.randn(6, 7, generator=g) * 0.5
    adv = torch.tensor([1.2, -0.7, 0.3, -1.5, 0.9, -0.2])
    mask = torch.tensor([[1.0] * n + [0.0] * (7 - n) for n in (7, 2, 5, 1, 6, 3)])
    return logp, old, ref, adv, mask


def _check_agg(impl, loss_agg):
    logp, old, ref, adv, mask = rich_case()
    kw = {"kl_coef": 0.05, "loss_agg": loss_agg}
    check_number("grpo_loss", f"loss_agg {loss_agg!r}, responses of 7, 2, 5, 1, 6 and 3 tokens",
                 loss_of(impl, logp, old, ref, adv, mask, **kw), float(REF.grpo_loss(logp, old, ref, adv, mask, **kw)),
                 "'token-mean': sum(per_token x mask) / sum(mask) over the batch; 'seq-mean-token-mean': each "
                 "response's own token mean, then the mean over responses", 1e-5)


def test_grpo_loss_token_mean(impl):
    _check_agg(impl, "token-mean")


def test_grpo_loss_seq_mean_token_mean(impl):
    _check_agg(impl, "seq-mean-token-mean")


def test_grpo_loss_ignores_padding(impl):
    logp, old, ref, adv, mask = rich_case()
    noisy = [x.clone() for x in (logp, old, ref)]
    for x in noisy:
        x[mask == 0] = x[mask == 0] * 3 - 1  # other values after each response's end
    want = float(REF.grpo_loss(logp, old, ref, adv, mask, kl_coef=0.05))
    check_number("grpo_loss", "the same batch with other values where mask is 0",
                 loss_of(impl, *noisy, adv, mask, kl_coef=0.05), want,
                 "positions where mask is 0 (after a response's end) must not count, in the sum or in the count", 1e-5)


def test_grpo_loss_gradient(impl):
    logp, old, ref, adv, mask = rich_case()
    want_lp = logp.clone().requires_grad_(True)
    REF.grpo_loss(want_lp, old, ref, adv, mask, kl_coef=0.05).backward()
    got_lp = logp.clone().requires_grad_(True)
    loss = call(impl, "grpo_loss", got_lp, old.clone(), ref.clone(), adv.clone(), mask.clone(), kl_coef=0.05)
    if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
        fail("grpo_loss", "the gradient with respect to logp", "a loss that carries a gradient", loss,
             "compute rho from logp itself (no .detach(), .item() or torch.no_grad()): the update needs "
             "d loss / d logp")
    loss.backward()
    check_tensor("grpo_loss", "d loss / d logp", got_lp.grad, want_lp.grad,
                 "the clip has zero gradient where it is the min; rho = exp(logp - old_logp) with old_logp constant",
                 atol=1e-6)
