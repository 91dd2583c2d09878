"""The switch: 02_sft.py and 03_grpo.py run with student/core.py's functions in place of the project's, so a
student watches their own code train the toy. From the repository's root, a script and its usual flags:

    python -m student.switch 02_sft.py ...     # Eq. 1's label mask and loss: sft_labels, sft_loss
    python -m student.switch 03_grpo.py ...    # Eqs. 2, 3, 7, 8 and the log-probs: grpo_loss, group_advantages,
                                               # i_eff, f_len, response_logprobs

The script is loaded as a module (its functions defined, nothing run), install_sft or install_grpo rebinds the
names its loop calls in its globals (and I_eff and f_len in rewards.py), for this process only, then its main
runs as `python 02_sft.py ...` would. What stays the project's: tokenising and batching, the model, sampling,
the optimizer, and 03's logged statistics (kl, clip_frac, ...), which its own grpo_loss computes beside yours;
the loss that trains is yours. The log-probs run the model on every position (yours slice them), which costs
more memory than the project's path: a toy-scale switch.
"""

import os
import sys

import torch

from student import adapters, core

GRPO_LOSS_AGGS = ("token-mean", "seq-mean-token-mean")  # the ones core.grpo_loss implements


def announce(script, names):
    print(f"student track: {script} runs with {', '.join(names)} from student/core.py")


def install_sft(ns):
    """02_sft.py: the labels of every batch from core.sft_labels, the loss from core.sft_loss."""
    project_encode_rows = ns["encode_rows"]

    def encode_rows(processor, rows, **kwargs):
        batch = project_encode_rows(processor, rows, **kwargs)
        # Where each target starts is the tokeniser's business (the project's): the first position it trains, or
        # the row's end when --max_len cut its whole target. Which positions train is yours.
        trained = batch["labels"] != -100
        prompt_lens = torch.where(trained.any(1), trained.int().argmax(1), batch["attention_mask"].sum(1))
        batch["labels"] = core.sft_labels(batch["input_ids"], batch["attention_mask"], prompt_lens)
        return batch

    def target_ce_sum(model, batch):  # 02 wants (summed loss, target tokens) to normalise over the whole batch
        labels = batch["labels"]
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits  # (B, L, V)
        n = int((labels[:, 1:] != -100).sum())
        return core.sft_loss(logits, labels) * n, n

    ns["encode_rows"], ns["target_ce_sum"] = encode_rows, target_ce_sum
    announce("02_sft.py", ["sft_labels (Eq. 1)", "sft_loss (Eq. 1)"])


def install_grpo(ns):
    """03_grpo.py: advantages, loss and log-probs from core; the reward's I_eff and f_len too (rewards.py)."""
    rewards, project_loss, UserError = ns["rewards"], ns["grpo_loss"], ns["cli"].UserError

    def grpo_loss(logp, old_logp, ref_logp, advantages, mask, args):
        if args.loss_agg not in GRPO_LOSS_AGGS or args.clip_eps_high:
            raise UserError(f"the student track's grpo_loss takes --loss_agg {' or '.join(GRPO_LOSS_AGGS)} and no "
                            "--clip_eps_high")
        loss = core.grpo_loss(logp, old_logp, ref_logp, advantages, mask, clip_eps=args.clip_eps,
                              kl_coef=args.kl_coef, loss_agg=args.loss_agg)
        with torch.no_grad():  # the logged statistics, as the project computes them
            _, stats = project_loss(logp.detach(), old_logp, ref_logp, advantages, mask, args)
        return loss, stats

    def logprobs(model, prompts, comp, temperature, vision_start_id):
        """One forward pass over prompt + completion, every position's logits to core.response_logprobs."""
        full = {**prompts, "input_ids": torch.cat([prompts["input_ids"], comp], 1),
                "attention_mask": torch.cat([prompts["attention_mask"], torch.ones_like(comp)], 1),
                "mm_token_type_ids": torch.cat([prompts["mm_token_type_ids"], torch.zeros_like(comp)], 1)}
        logits = model(**full, use_cache=False).logits  # (b, Lp + T, V)
        return core.response_logprobs(logits, full["input_ids"], prompts["input_ids"].shape[1], temperature)

    ns["group_advantages"] = core.group_advantages
    ns["grpo_loss"] = grpo_loss
    ns["one_pass_logprobs"] = ns["prompt_shared_logprobs"] = logprobs  # 03 picks one of the two per pass
    # the reward looks both up in its module at every call (rewards.paper_reward, rewards.released_reward)
    rewards.f_len = core.f_len
    rewards.EFFECTIVENESS = {(a, b): core.i_eff(a, b) for a in (True, False) for b in (True, False)}
    announce("03_grpo.py", ["group_advantages (Eq. 3)", "grpo_loss (Eq. 2)", "response_logprobs", "i_eff (Eq. 7)",
                            "f_len (Eq. 8)"])


INSTALLS = {"02_sft": install_sft, "03_grpo": install_grpo}


def main(argv):
    """python -m student.switch 03_grpo.py [its flags]: the script's main with your functions swapped in."""
    name = os.path.basename(argv[0]).removesuffix(".py") if argv else ""
    if name not in INSTALLS:
        raise SystemExit("usage: python -m student.switch {02_sft.py | 03_grpo.py} [the script's flags]")
    # A copy of its own (the reference in adapters.py keeps the project's): its functions are defined, its
    # `if __name__ == "__main__"` block does not run, and its globals are where its main looks names up.
    script = adapters.script(name, module_name=f"student_{name}")
    INSTALLS[name](vars(script))
    script.cli.run(script.main, script.Args, argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
