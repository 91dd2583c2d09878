"""The student track's grader (student/) is self-consistent: the project's own functions pass every grader test,
each catalogued mistake (student/mistakes.py) fails at least one, and the untouched stubs of student/core.py
fail at least one test per function. The grader's tests are called here directly with each implementation
(they take only `impl`), so pytest collects them once, from student/, under `make grade`."""

import inspect
import json

import pytest

from student import adapters, mistakes
from student import test_grade as grade

TESTS = {name: f for name, f in vars(grade).items() if name.startswith("test_") and inspect.isfunction(f)}


def failures(impl):
    """{test name: the first line of its message} of every grader test that fails on `impl`; an exception the
    implementation raised itself (not the grader's report) is named by its type."""
    out = {}
    for name, test in TESTS.items():
        try:
            test(impl)
        except pytest.fail.Exception as e:  # the grader's report (a BaseException, not an Exception)
            out[name] = str(e).splitlines()[0]
        except Exception as e:  # noqa: BLE001 (a wrong implementation may raise anything)
            out[name] = f"raised {type(e).__name__}"
    return out


def test_the_grader_tests_every_function():
    for function in adapters.FUNCTIONS:
        assert any(function in name for name in TESTS), f"no grader test names {function}"
    assert set(adapters.FUNCTIONS) == {f for f, _ in mistakes.CATALOGUE.values()}


def test_the_reference_passes_every_grader_test():
    assert failures(adapters.reference()) == {}


@pytest.mark.parametrize("name", list(mistakes.CATALOGUE))
def test_each_catalogued_mistake_fails_a_grader_test(name):
    function = mistakes.CATALOGUE[name][0]
    failed = failures(adapters.with_mistake(name))
    assert failed, f"the mistake {name!r} ({mistakes.describe(name)}) passes every grader test"
    # caught by a test of its own function, whose report names the function and its equation
    assert any(function in test for test in failed), failed
    assert all(msg.startswith((f"{function} (", "raised ")) for msg in failed.values()), failed


def test_the_catalogue_describes_each_mistake_in_one_line():
    for name, (function, wrong) in mistakes.CATALOGUE.items():
        assert function in adapters.FUNCTIONS, name
        assert wrong.__doc__ and len(mistakes.describe(name)) <= 110, name
        assert list(inspect.signature(wrong).parameters) == list(inspect.signature(
            getattr(adapters, "ref_" + function)).parameters), f"{name}: not {function}'s signature"


def test_the_untouched_stubs_fail_every_function():
    from student import core

    stubs = [f for f in adapters.FUNCTIONS if "raise NotImplementedError" in inspect.getsource(getattr(core, f))]
    if not stubs:
        pytest.skip("every function of student/core.py has been written")
    failed = failures(adapters.student())
    for function in stubs:  # a student's finished functions are graded by `make grade`, not here
        mine = [t for t in failed if function in t]
        assert mine, f"no grader test fails on the {function} stub"
        assert all("not written yet" in failed[t] for t in mine), failed


# ----------------------------------------------------------------------------------------------
# The switch (student/switch.py): the student's functions go where 02's and 03's loops call theirs


@pytest.fixture
def core_as_reference(monkeypatch):
    """student/core.py filled in with the reference, each function counting its calls (core.calls), and
    rewards.py's pieces restored after the test."""
    import collections

    import rewards
    from student import core

    calls = collections.Counter()

    def counted(name, f):
        def call(*args, **kwargs):
            calls[name] += 1
            return f(*args, **kwargs)
        return call

    for name in adapters.FUNCTIONS:
        monkeypatch.setattr(core, name, counted(name, getattr(adapters.reference(), name)))
    monkeypatch.setattr(core, "calls", calls, raising=False)
    monkeypatch.setattr(rewards, "f_len", rewards.f_len)
    monkeypatch.setattr(rewards, "EFFECTIVENESS", rewards.EFFECTIVENESS)
    return core


def test_the_switch_runs_03_on_the_student_functions(core_as_reference, tiny_model_dir):
    from types import SimpleNamespace

    import torch

    import rewards
    import toy
    from machinery import dataset, policy
    from student import switch

    grpo = adapters.script("03_grpo")
    ns = dict(vars(grpo))  # the script's globals, as its __main__ block would hand them over
    switch.install_grpo(ns)
    assert ns["group_advantages"] is core_as_reference.group_advantages
    assert rewards.f_len is core_as_reference.f_len and rewards.EFFECTIVENESS == adapters.PROJECT["EFFECTIVENESS"]
    model, proc = policy.load_policy(tiny_model_dir)
    rows = toy.toy_dataset("test", 2)
    prompts = dataset.encode_prompts(proc, list(rows["question"]), list(rows["image"]), "sys")
    comp = torch.tensor([proc.tokenizer(t, add_special_tokens=False).input_ids[:6]  # text tokens, no image token
                         for t in ("<think>2 + 3 = 5</think>", "<answer>7</answer> more")])
    vs = proc.tokenizer.convert_tokens_to_ids("<|vision_start|>")
    with torch.no_grad():
        want = grpo.one_pass_logprobs(model, prompts, comp, 0.9, vs)
        for name in ("one_pass_logprobs", "prompt_shared_logprobs"):
            assert torch.allclose(ns[name](model, prompts, comp, 0.9, vs), want, atol=1e-5), name
    args = SimpleNamespace(clip_eps=0.2, clip_eps_high=0.0, kl_coef=0.05, loss_agg="token-mean", max_new_tokens=6)
    logp, old, ref, adv, mask = grade.rich_case()
    (loss, stats), (want_loss, want_stats) = (f(logp, old, ref, adv, mask, args)
                                              for f in (ns["grpo_loss"], grpo.grpo_loss))
    assert torch.allclose(loss, want_loss) and stats == want_stats
    assert rewards.srpo_reward("<think>1+1=2</think><answer>2</answer><reflection>Fine.</reflection>"
                               "<answer>2</answer>", "2")["effectiveness"] == 0.25  # right -> right
    ns["group_advantages"](torch.tensor([[1.0, 0.0]]))
    assert set(core_as_reference.calls) == {"group_advantages", "grpo_loss", "response_logprobs", "i_eff", "f_len"}


def test_python_m_student_switch_runs_03(core_as_reference, tiny_model_dir, tmp_path):
    from student import switch

    switch.main(["03_grpo.py", "--model", tiny_model_dir, "--out_dir", str(tmp_path), "--steps", "1", "--mu", "2",
                 "--prompts_per_step", "2", "--group_size", "2", "--max_new_tokens", "8", "--train_size", "20",
                 "--kl_coef", "0.05", "--filter", "none", "--save_every", "0", "--sample_every", "0"])
    assert (tmp_path / "model.safetensors").exists()
    assert {"group_advantages", "grpo_loss", "response_logprobs"} <= set(core_as_reference.calls)
    with pytest.raises(SystemExit, match="usage"):
        switch.main(["04_eval.py"])


def test_the_switch_runs_02_on_the_student_functions(core_as_reference, tiny_model_dir, tmp_path):
    import torch

    import toy
    from machinery import policy
    from student import switch

    sft = adapters.script("02_sft")
    ns = dict(vars(sft))
    switch.install_sft(ns)
    rows = []
    for p in toy.toy_dataset("train", 3):
        p["image"].save(tmp_path / f"{p['id']}.png")
        response = toy.cot_response(p) + f"\n<reflection>Fine.</reflection>\n<answer>{p['answer']}</answer>"
        rows.append({"id": p["id"], "question": p["question"], "image": f"{p['id']}.png", "prompt_style": "reflect",
                     "response": response})
    model, proc = policy.load_policy(tiny_model_dir)
    for kw in ({}, {"untrained_prefix": "<reflection>"}):  # 02 --no-train_first_attempt: a later target start
        batch, want = (f(proc, rows, root=str(tmp_path), **kw) for f in (ns["encode_rows"], sft.encode_rows))
        assert torch.equal(batch["labels"], want["labels"])
    with torch.no_grad():
        (ce, n), (want_ce, want_n) = (f(model, batch) for f in (ns["target_ce_sum"], sft.target_ce_sum))
    assert n == want_n and torch.allclose(ce, want_ce, rtol=1e-5)
    assert set(core_as_reference.calls) == {"sft_labels", "sft_loss"}, core_as_reference.calls
    # python -m student.switch 02_sft.py: one step on these rows
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    switch.main(["02_sft.py", "--model", tiny_model_dir, "--data", str(tmp_path / "sft.jsonl"),
                 "--out_dir", str(tmp_path / "out"), "--max_steps", "1", "--batch_size", "2", "--eval_size", "0",
                 "--save_every", "0"])
    assert (tmp_path / "out" / "model.safetensors").exists()
