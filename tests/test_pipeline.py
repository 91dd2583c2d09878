"""The whole toy pipeline (00 -> 01 -> 02 -> 03 -> 04 -> report) at a tiny budget, with both baselines:
every stage's outputs exist and are well formed, and the report page is self-contained. The learning
itself is what `make demo` shows, not something a timed test asserts."""

import json
import os
from html.parser import HTMLParser

import datasets

from machinery import dataset
import toy
from conftest import load_script

MODELS = ("base", "sft", "srpo", "grpo", "scratchpad")


class _Page(HTMLParser):
    """What the report test looks at: element ids, table rows per model, image sources, links."""

    def __init__(self):
        super().__init__()
        self.ids, self.models, self.images, self.links = set(), [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "tr" and "data-model" in a:
            self.models.append(a["data-model"])
        if tag == "img":
            self.images.append(a.get("src", ""))
        if tag in ("a", "link", "script"):
            self.links.append(a.get("href") or a.get("src") or "")


def test_whole_pipeline_small_budget(base_model_dir, tmp_path):
    reflect, sft, grpo, evaluate = (load_script(n) for n in ("01_reflect_data", "02_sft", "03_grpo", "04_eval"))
    import report

    out = tmp_path

    # 01: reflection data (the base model comes from 00 via the session fixture), and both baselines' SFT sets
    # (with direct rows, as `make demo` asks for them: right answers outside the selection, no reflection)
    reflect.main(reflect.Args(model=base_model_dir, out_dir=str(out / "reflect"), pool_size=40, num_samples=20,
                              batch_size=20, max_new_tokens=32, direct_rows=4))
    stats = json.loads((out / "reflect" / "stats.json").read_text())
    n = 20 + stats["direct"]
    rows = dataset.read_jsonl(out / "reflect" / "sft_reflect.jsonl")
    assert len(rows) == n and all(r["prompt_style"] == "reflect" for r in rows)
    assert sum("<reflection>Check: " in r["response"] for r in rows) == 20
    assert all(r["response"].endswith(f"<answer>{r['answer']}</answer>") for r in rows if "<reflection>" in r["response"])
    ds = datasets.load_dataset("json", data_files=str(out / "reflect" / "sft_reflect.jsonl"), split="train")
    assert len(ds) == n and all(os.path.exists(out / "reflect" / p) for p in ds["image"])
    assert stats["pool"] == 40 and stats["reflections"] == 20 and stats["scratchpad"] == stats["cot"] == n
    scratch = dataset.read_jsonl(out / "reflect" / "sft_scratchpad.jsonl")
    assert {r["id"] for r in scratch} == {r["id"] for r in rows} and all(r["prompt_style"] == "plain" for r in scratch)

    # 02: reflection SFT, plain-CoT SFT and the scratchpad SFT
    for sft_file, name in (("sft_reflect.jsonl", "sft"), ("sft_cot.jsonl", "sft_cot"),
                           ("sft_scratchpad.jsonl", "sft_scratchpad")):
        sft.main(sft.Args(model=base_model_dir, data=str(out / "reflect" / sft_file), out_dir=str(out / name),
                          max_steps=2, batch_size=4, eval_size=0, save_every=0))
        assert (out / name / "model.safetensors").exists() and (out / name / "loss.png").exists()
        assert len(dataset.read_jsonl(out / name / "metrics.jsonl")) == 2

    # 03: SRPO from the reflection-SFT model, plain GRPO from the other two
    runs = out / "runs"
    for model, reward, name in (("sft", "paper", "srpo"), ("sft_cot", "grpo", "grpo"), ("sft_scratchpad", "grpo", "scratchpad")):
        res = grpo.main(grpo.Args(model=str(out / model), reward=reward, out_dir=str(runs / name), steps=2,
                                  prompts_per_step=2, group_size=2, max_new_tokens=24, train_size=20, save_every=0))
        assert len(res["metrics"]) == 2 and (runs / name / "model.safetensors").exists()

    # 04: the comparison across the five models, with paired differences
    models = (f"base={base_model_dir}@plain,sft={out / 'sft'},srpo={runs / 'srpo'},grpo={runs / 'grpo'}@plain,"
              f"scratchpad={runs / 'scratchpad'}@plain")
    summaries = evaluate.main(evaluate.Args(models=models, limit=8, out_dir=str(out / "demo"), max_new_tokens=48, seed=1,
                                            samples=2))  # and the headroom gauge
    assert set(summaries) == set(MODELS)
    comparison = json.loads((out / "demo" / "toy-test" / "comparison.json").read_text())
    assert list(comparison) == list(MODELS)
    for name in MODELS:
        for key in ("final_accuracy", "first_accuracy", "wrong_to_right", "right_to_wrong"):
            assert 0.0 <= comparison[name][key] <= 1.0, (name, key, comparison[name][key])
        assert comparison[name]["n"] == 8 and set(comparison[name]["paired"]) == set(MODELS) - {name}
    diff = comparison["srpo"]["paired"]["base"]["difference"]
    assert abs(diff - (comparison["srpo"]["final_accuracy"] - comparison["base"]["final_accuracy"])) < 1e-3
    assert (out / "demo" / "toy-test" / "comparison.png").exists()
    assert all(comparison[m]["headroom"]["k"] == 2 and comparison[m]["headroom"]["final"]["n"] == 8 for m in MODELS)
    assert "Headroom (k = 2" in (out / "demo" / "toy-test" / "comparison.md").read_text()
    items = dataset.read_jsonl(out / "demo" / "toy-test" / "srpo" / "items.jsonl")
    assert {i["id"] for i in items} == {f"toy-{toy.TEST_SEED_OFFSET + 8 + k}" for k in range(8)}  # --seed 1: the next 8

    # the tables across seeds (here the same run twice) and the ablation table (the models it has)
    seeds = report.seeds_table(report.Args(seeds=f"{out / 'demo'},{out / 'demo'}", pairs="srpo-sft"))
    assert seeds.count("| 1 | 8 |") == 2 and "| all | 16 |" in seeds and "| 1 | srpo |" in seeds
    ablations = report.ablations_table(report.Args(ablations=str(out / "demo")))
    assert "| SRPO: reflection SFT, then RL with the paper's reward | 53.5 |" in ablations
    assert "| plain-CoT SFT + plain GRPO (the demo's `grpo`) | 51.4 |" in ablations
    assert "from the base model" not in ablations  # rows of models this run does not have are left out
    assert (out / "demo" / "ablations.md").exists()

    # report.html: one self-contained page
    path = report.write_report(report.Args(demo_dir=str(out / "demo"), runs_dir=str(runs),
                                           ablations_dir=str(out / "demo")))
    page = _Page()
    page.feed(open(path).read())
    assert page.models == list(MODELS)
    assert {"comparison", "paired", "chart", "curves", "wrong-to-right", "right-to-wrong", "right-to-right",
            "headroom", "ablations"} <= page.ids
    assert page.images and all(src.startswith("data:image/png;base64,") for src in page.images)
    assert page.links == []  # nothing to fetch: no links, scripts or stylesheets


def test_dots_task_still_runs_end_to_end(tmp_path):
    """The contrast (--data toy-dots, --benchmark toy-dots) at the smallest budget: every stage takes it."""
    base, reflect, sft, grpo, evaluate = (load_script(n) for n in ("00_base_model", "01_reflect_data", "02_sft",
                                                                    "03_grpo", "04_eval"))
    out = tmp_path
    result = base.main(base.Args(data="toy-dots", out_dir=str(out / "base"), steps=80, batch_size=16, lr=3e-3, train_size=800,
                                 eval_size=8, hidden=64, layers=2))
    assert result["task"] == "toy-dots" and set(result["accuracy"]) <= set(toy.DOTS_FAMILIES) | {"all"}
    assert json.loads((out / "base" / "toy_processor.json").read_text())["task"] == "toy-dots"
    stats = reflect.main(reflect.Args(data="toy-dots", model=str(out / "base"), out_dir=str(out / "reflect"),
                                      pool_size=16, num_samples=8, batch_size=16, max_new_tokens=24, fill_from_other=True))
    assert stats["scratchpad"] == 0 and not (out / "reflect" / "sft_scratchpad.jsonl").exists()
    rows = dataset.read_jsonl(out / "reflect" / "sft_cot.jsonl")
    assert rows and all(r["id"].startswith("dots-") for r in rows)
    sft.main(sft.Args(model=str(out / "base"), data=str(out / "reflect" / "sft_cot.jsonl"), out_dir=str(out / "sft"),
                      max_steps=1, batch_size=2, eval_size=4, eval_max_new_tokens=16, save_every=0))
    summary = json.loads((out / "sft" / "sft_summary.json").read_text())
    assert summary["after"]["n"] == 4 and set(summary["after"]["categories"]) <= set(toy.DOTS_FAMILIES)
    res = grpo.main(grpo.Args(data="toy-dots", model=str(out / "sft"), reward="grpo", out_dir=str(out / "grpo"),
                              steps=1, prompts_per_step=2, group_size=2, max_new_tokens=16, train_size=8, save_every=0))
    assert len(res["metrics"]) == 1
    summaries = evaluate.main(evaluate.Args(benchmark="toy-dots", model=str(out / "grpo"), prompt="plain", limit=4,
                                            out_dir=str(out / "eval"), max_new_tokens=16))
    assert set(summaries["grpo"]["categories"]) <= set(toy.DOTS_FAMILIES)
    assert {r["id"] for r in dataset.read_jsonl(out / "eval" / "toy-dots-test" / "grpo-plain" / "items.jsonl")} == \
        {f"dots-{toy.TEST_SEED_OFFSET + k}" for k in range(4)}


def test_the_answer_key_reports_an_exercise_against_its_reference(tmp_path):
    """report.py --answers: the figures of one stage-2 exercise beside its reference, from 04's and 03's files."""
    import report

    ex, ref_run = tmp_path / "exercises" / "ex6", tmp_path / "srpo"
    responses = {"a": ("<think> x</think><answer>1</answer><reflection>Check: 1. The first answer is right."
                       "</reflection><answer>1</answer>", True, True),
                 "b": ("<think> x</think><answer>2</answer><reflection>Check: 1. The first answer is right."
                       "</reflection><answer>1</answer>", False, True)}
    comparison = {}
    for name, model, right in (("reference", str(ref_run), {"a"}), ("ex6", str(ex / "model"), {"a", "b"})):
        folder = ex / "eval" / "toy-test" / name
        for item, (text, first, _) in responses.items():
            dataset.append_jsonl(str(folder / "items.jsonl"), {"id": item, "response": text, "first_correct": first,
                                                               "correct": item in right})
        comparison[name] = {"folder": name, "model": model, "n": 2, "final_accuracy": len(right) / 2,
                            "reflection": {"first_acc": 50.0, "reflection_rate": 100.0, "wrong_to_right": 0.0,
                                           "right_to_wrong": 0.0, "mean_response_tokens": 20.0}}
    (ex / "eval" / "toy-test" / "comparison.json").write_text(json.dumps(comparison))
    (ex / "seconds.txt").write_text("123\n")
    for run, f_len in ((ref_run, 0.002), (ex / "model", 0.0)):
        for step in range(12):
            dataset.append_jsonl(str(run / "metrics.jsonl"), {"step": step, "f_len": f_len, "length": f_len / 10,
                                                              "response_tokens": 60})
    args = report.Args(answers=str(tmp_path / "exercises"), answers_out=str(tmp_path / "answers.md"),
                       demo_dir=str(tmp_path / "demo"), runs_dir=str(tmp_path), dots_demo_dir=str(tmp_path / "dots"))
    key = report.answers_markdown(args)
    assert "## 6. no length reward" in key and "123 s" in key and "## 7. no I_eff\n\nnot run" in key
    assert "| reference | 50.0 |" in key and "| exercise 6 | 100.0 |" in key
    assert "+50.0 [" in key  # the paired difference, in points
    assert "f_len 0.002 → 0" in key and "| 20 | 100 / 100 |" in key  # "right" over a right and a wrong first answer
    assert "*Notice*: f_len over the reference's last ten steps is 0.002, so alpha x f_len is about 0.0002" in key
    assert "## 0. Find the equations\n\nRewards [1, 0, 0, 1]: advantages ±0.866" in key
    assert "## 17. Does the dots model know when it is wrong?\n\nnot run" in key
    assert open(args.answers_out).read() == key
