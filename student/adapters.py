"""The one adapter between the grader and the code it grades (the model: CS336 assignment 5's adapters).

`implementation()` returns the seven functions of student/core.py's API from one of three places:
    student/core.py                      (the default: your code)
    the project's own functions          (STUDENT_REF=1: `make grade REF=1`)
    a catalogued mistake                 (STUDENT_MISTAKE=name: the reference with one function wrong)
The reference adapters below call the project's functions (03_grpo.py, 02_sft.py, machinery/dataset.py,
rewards.py) behind the student API, so the grader follows the project: if the project's convention
changes, the reference changes with it.
"""

import importlib.util
import os
import sys
from types import SimpleNamespace

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import rewards  # noqa: E402 (the root is on the path now)
from machinery import dataset  # noqa: E402

# The reward's pieces as they are at import: student/switch.py rebinds them in rewards.py for a student's run,
# and a core.py that calls this reference must still reach the project's own, not loop back into itself.
PROJECT = {"f_len": rewards.f_len, "EFFECTIVENESS": dict(rewards.EFFECTIVENESS)}

FUNCTIONS = ("sft_labels", "sft_loss", "response_logprobs", "i_eff", "f_len", "group_advantages", "grpo_loss")
EQUATIONS = {"sft_labels": "Eq. 1", "sft_loss": "Eq. 1", "response_logprobs": "the log-probs of Eq. 2",
             "i_eff": "Eq. 7", "f_len": "Eq. 8", "group_advantages": "Eq. 3", "grpo_loss": "Eq. 2"}


def script(name, module_name=None):
    """A numbered script (e.g. '03_grpo') as a module; importing it only defines its functions. Under its own
    name it is loaded once (the test suite may have loaded it already); under another, a fresh copy."""
    module_name = module_name or name
    if module_name == name and name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(module_name, os.path.join(ROOT, name + ".py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------------------------
# The reference: the project's functions behind the student API


class _Replay:
    """A stand-in processor for dataset.encode_sft: its texts are row numbers, its tensors the caller's.

    encode_sft tokenises the prompts alone (their lengths are where the targets start), then prompt +
    target; this one answers the first with `prompt_lens` and the second with the batch as given, so
    the project's own masking lines run on exactly these tensors.
    """

    def __init__(self, input_ids, attention_mask, prompt_lens):
        self.input_ids, self.attention_mask, self.prompt_lens = input_ids, attention_mask, prompt_lens
        last = int(attention_mask[0].sum()) - 1  # encode_sft checks its end-of-turn id is in the batch
        self.tokenizer = SimpleNamespace(convert_tokens_to_ids=lambda _: int(input_ids[0, last]))

    def apply_chat_template(self, messages, **_):
        return f"row {messages[-1]['content'][-1]['text']}|"

    def __call__(self, text, **_):
        if all(t.endswith("|") for t in text):  # the prompts alone
            rows = [int(t[4:-1]) for t in text]
            lens = [int(self.prompt_lens[i]) for i in rows]
            return {"attention_mask": torch.tensor([[1] * n + [0] * (max(lens) - n) for n in lens])}
        return {"input_ids": self.input_ids.clone(), "attention_mask": self.attention_mask.clone()}


def ref_sft_labels(input_ids, attention_mask, prompt_lens):
    B = len(input_ids)
    batch = dataset.encode_sft(_Replay(input_ids, attention_mask, prompt_lens), [str(i) for i in range(B)],
                               [None] * B, ["target"] * B, "system")
    return batch["labels"]


class _Logits:
    """A stand-in model that returns given logits at the positions it is asked for (`logits_to_keep`), so
    the project's own shift (which logits score which token) is what runs."""

    def __init__(self, logits):
        self.logits = logits

    def __call__(self, logits_to_keep, **_):
        keep = logits_to_keep
        return SimpleNamespace(logits=self.logits[keep] if keep.dtype == torch.bool else self.logits[:, keep])


def ref_sft_loss(logits, labels):
    sft = script("02_sft")
    ce_sum, n = sft.target_ce_sum(_Logits(logits), {"input_ids": labels.clamp(min=0), "labels": labels})
    return ce_sum / max(n, 1)  # 02 divides the sum by the target tokens of the whole batch


def ref_response_logprobs(logits, input_ids, prompt_len, temperature=1.0):
    grpo = script("03_grpo")
    prompts = {"input_ids": input_ids[:, :prompt_len], "attention_mask": torch.ones_like(input_ids[:, :prompt_len]),
               "mm_token_type_ids": torch.zeros_like(input_ids[:, :prompt_len])}
    return grpo.one_pass_logprobs(_Logits(logits), prompts, input_ids[:, prompt_len:], temperature, None)


def ref_i_eff(first_correct, final_correct):
    return PROJECT["EFFECTIVENESS"][(bool(first_correct), bool(final_correct))]


def ref_f_len(response_len, first_len):
    return PROJECT["f_len"](response_len, first_len)


def ref_group_advantages(rewards):
    return script("03_grpo").group_advantages(rewards)


def ref_grpo_loss(logp, old_logp, ref_logp, advantages, mask, clip_eps=0.2, kl_coef=0.0, loss_agg="token-mean"):
    args = SimpleNamespace(clip_eps=clip_eps, clip_eps_high=0.0, kl_coef=kl_coef, loss_agg=loss_agg,
                           max_new_tokens=logp.shape[1])
    return script("03_grpo").grpo_loss(logp, old_logp, ref_logp, advantages, mask, args)[0]


def reference():
    return SimpleNamespace(**{name: globals()["ref_" + name] for name in FUNCTIONS}, name="the project's functions")


# ----------------------------------------------------------------------------------------------
# The choice


def student():
    from student import core

    return SimpleNamespace(**{name: getattr(core, name) for name in FUNCTIONS}, name="student/core.py")


def with_mistake(name):
    """The reference with one function replaced by a catalogued mistake (student/mistakes.py)."""
    from student import mistakes

    if name not in mistakes.CATALOGUE:
        raise KeyError(f"no mistake {name!r} in student/mistakes.py; there are: {', '.join(mistakes.CATALOGUE)}")
    function, wrong = mistakes.CATALOGUE[name]
    impl = reference()
    setattr(impl, function, wrong)
    impl.name = f"the mistake {name!r} ({function}: {mistakes.describe(name)})"
    return impl


def implementation():
    """What the grader grades: STUDENT_MISTAKE=name, else STUDENT_REF=1, else student/core.py."""
    if os.environ.get("STUDENT_MISTAKE"):
        return with_mistake(os.environ["STUDENT_MISTAKE"])
    if os.environ.get("STUDENT_REF", "") not in ("", "0"):
        return reference()
    return student()
