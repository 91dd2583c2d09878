"""probe_confidence.py: the AUC, the simulated re-read, and the read-value probabilities of a real model."""

import json

from machinery import dataset, policy, rollout
import toy
from conftest import load_script

probe = load_script("probe/probe_confidence")


def test_auc():
    assert probe.auc([0.9, 0.8], [0.1, 0.2]) == 1.0
    assert probe.auc([0.1], [0.9]) == 0.0
    assert probe.auc([0.5, 0.5], [0.5]) == 0.5  # ties count half
    assert probe.auc([0.9, 0.3], [0.5]) == 0.5
    assert probe.auc([], [0.5]) is None
    assert abs(probe.auc_se(0.5, 100, 100) - 0.0409) < 1e-4  # Hanley & McNeil's closed form at no signal
    assert probe.auc_se(1.0, 10, 10) == 0.0 and probe.auc_se(0.8, 50, 50) < probe.auc_se(0.8, 10, 10)


def _problem(family):
    return next(p for p in (toy.make_problem(s, "toy-dots") for s in range(1000)) if p["family"] == family)


def test_reread_replaces_only_values_below_the_threshold():
    p = _problem("add")
    (c1, n1), (c2, n2) = json.loads(p["solution"])["reads"]
    reads = [{"colour": c1, "value": n1, "p": 0.9, "second": n1 + 1, "p_second": 0.05},
             {"colour": c2, "value": n2 + 1, "p": 0.4, "second": n2, "p_second": 0.3}]
    assert not probe.reread(p, reads, 0.0)  # the first answer: n1 + (n2 + 1)
    assert probe.reread(p, reads, 0.5)  # the unsure value re-read as its second choice
    assert not probe.reread(p, reads, 0.95)  # the sure one too: now n1 is wrong
    assert probe.answer_from(p, {c1: n1}) is None  # a value never read


def test_read_probabilities_are_the_greedy_choices(base_model_dir):
    """Under greedy decoding the value written is the likeliest digit: the probe must find that token."""
    model, processor = policy.load_policy(base_model_dir)
    test = toy.toy_dataset("test", 12)
    problems = [test[i] for i in range(12)]
    system = dataset.SYSTEM_PROMPTS["plain"]
    responses = rollout.generate_responses(model, processor, test["question"], test["image"], system_prompt=system,
                                          max_new_tokens=48, batch_size=12)
    reads = probe.read_probabilities(model, processor, problems, responses, system)
    n = sum(len(row) for row in reads)
    assert n >= 6, responses  # the briefly trained base writes "colour: value." reads
    for row in reads:
        for r in row:
            assert 0 < r["p"] <= 1 and r["p"] >= r["p_second"] and r["second"] != r["value"]


def test_read_probabilities_find_the_value_tokens(tiny_model_dir):
    """Hand-written responses: only "colour: N." in the first <think> counts, each at its own token."""
    model, processor = policy.load_policy(tiny_model_dir)
    tok = processor.tokenizer
    responses = ["<think> red: 3 blue: 2.</think>\n<answer>5</answer>",  # "red: 3" lacks its full stop
                 "<think> total: 3. green: 4. 4 + 0 = 4.</think>\n<answer>4</answer>",  # not a colour
                 "<think> red: 12. blue: 1.</think>\n<answer>13</answer>",  # 12 may be two tokens
                 "<think> red: 3. blue: 2. 3 + 2 = 5. blue: 4.",  # no </think>: no first think
                 "<think> red: 1.</think>\n<answer>1</answer>\n<reflection>red: 2.</reflection>"]
    problems = [toy.make_problem(s, "toy-dots") for s in range(len(responses))]
    reads = probe.read_probabilities(model, processor, problems, responses, dataset.SYSTEM_PROMPTS["plain"])
    assert [[(r["colour"], r["value"]) for r in row] for row in reads][:2] == [[("blue", 2)], [("green", 4)]]
    assert ("blue", 1) in [(r["colour"], r["value"]) for r in reads[2]] and reads[3] == []
    assert [(r["colour"], r["value"]) for r in reads[4]] == [("red", 1)]
    for response, row in zip(responses, reads):
        ids = tok(response, add_special_tokens=False)["input_ids"]
        for r in row:
            assert tok.decode([ids[r["token"]]]) == f" {r['value']}"
            assert tok.decode(ids[:r["token"]]).endswith(f"{r['colour']}:")


def test_main_writes_the_report(base_model_dir, tmp_path):
    out = tmp_path / "probe.json"
    result = probe.main(probe.Args(model=base_model_dir, n=20, batch_size=10, max_new_tokens=48, out=str(out)))
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert [r["threshold"] for r in result["reread_sweep"]] == probe.THRESHOLDS
    assert result["reread_sweep"][0]["accuracy"] == result["first_accuracy_from_reads"]
    assert result["reread_sweep"][0]["wrong_to_right"] == result["reread_sweep"][0]["right_to_wrong"] == 0
    # Each family's best threshold is at least as good as threshold 0, so the bound is at least the first answers.
    assert result["reread_bound"] >= result["first_accuracy_from_reads"]
    for r in result["per_family"].values():
        assert 0 <= r["read_right"] <= 1 and (r["auc"] is None or 0 <= r["auc"] <= 1)
