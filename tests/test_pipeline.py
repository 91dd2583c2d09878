"""The whole toy pipeline (00 -> 01 -> 02 -> 03 -> 04) at a tiny budget: every stage's outputs exist
and are well formed. The learning itself is what `make demo` shows, not something a timed test asserts."""

import json
import os

import datasets

import common
from conftest import load_script


def test_whole_pipeline_small_budget(base_model_dir, tmp_path):
    reflect, sft, grpo, evaluate = (load_script(n) for n in ("01_reflect_data", "02_sft", "03_grpo", "04_eval"))
    out = tmp_path

    # 01: reflection data (the base model comes from 00 via the session fixture)
    reflect.main(reflect.Args(model=base_model_dir, out_dir=str(out / "reflect"), pool_size=40, num_samples=20,
                              batch_size=20, max_new_tokens=32))
    rows = common.read_jsonl(out / "reflect" / "sft_reflect.jsonl")
    assert len(rows) == 20 and all(r["prompt_style"] == "reflect" for r in rows)
    assert all("<reflection>" in r["response"] and r["response"].endswith(f"<answer>{r['answer']}</answer>") for r in rows)
    ds = datasets.load_dataset("json", data_files=str(out / "reflect" / "sft_reflect.jsonl"), split="train")
    assert len(ds) == 20 and all(os.path.exists(out / "reflect" / p) for p in ds["image"])
    stats = json.loads((out / "reflect" / "stats.json").read_text())
    assert stats["pool"] == 40 and stats["reflections"] == 20

    # 02: reflection SFT and plain-CoT SFT
    for data, name in (("sft_reflect.jsonl", "sft"), ("sft_cot.jsonl", "sft_cot")):
        sft.main(sft.Args(model=base_model_dir, data=str(out / "reflect" / data), out_dir=str(out / name),
                          max_steps=2, batch_size=4, eval_size=0, save_every=0))
        assert (out / name / "model.safetensors").exists() and (out / name / "loss.png").exists()
        assert len(common.read_jsonl(out / name / "metrics.jsonl")) == 2

    # 03: SRPO from the reflection-SFT model, plain GRPO from the plain-CoT SFT model
    for model, reward, name in (("sft", "paper", "srpo"), ("sft_cot", "grpo", "grpo")):
        res = grpo.main(grpo.Args(model=str(out / model), reward=reward, out_dir=str(out / name), steps=2,
                                  prompts_per_step=2, group_size=2, max_new_tokens=24, train_size=20, save_every=0))
        assert len(res["metrics"]) == 2 and (out / name / "model.safetensors").exists()

    # 04: the comparison across the four models
    models = f"base={base_model_dir}@plain,sft={out / 'sft'},srpo={out / 'srpo'},grpo={out / 'grpo'}@plain"
    summaries = evaluate.main(evaluate.Args(models=models, limit=8, out_dir=str(out / "eval"), max_new_tokens=48))
    assert set(summaries) == {"base", "sft", "srpo", "grpo"}
    comparison = json.loads((out / "eval" / "toy-test" / "comparison.json").read_text())
    for name in ("base", "sft", "srpo", "grpo"):
        for key in ("final_accuracy", "first_accuracy", "wrong_to_right", "right_to_wrong"):
            assert 0.0 <= comparison[name][key] <= 1.0, (name, key, comparison[name][key])
    assert (out / "eval" / "toy-test" / "comparison.png").exists()
