"""03_grpo.py: the GRPO pieces (advantages, ratio, KL, masks, log-probs) and short real runs."""

import os
import random
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from machinery import dataset, policy, rollout
import rewards
import toy
from conftest import ROOT, load_script

grpo = load_script("03_grpo")


def test_group_advantages_mean_zero_unit_spread():
    r = torch.tensor([[1.6, 0.85, 1.35, 0.85], [1.0, 1.0, 1.0, 1.0], [0.0, 1.5, 0.0, 0.0]])
    a = grpo.group_advantages(r)
    assert torch.allclose(a.mean(1), torch.zeros(3), atol=1e-6)
    assert torch.allclose(a[[0, 2]].std(1), torch.ones(2), atol=1e-3)
    assert torch.equal(a[1], torch.zeros(4))  # no spread, no signal


def test_every_response_scored_against_its_own_prompt():
    prompts = [{"answer": str(i), "choices": []} for i in range(10)]
    G = 3
    fn = lambda text, p: rewards.srpo_reward(text, p["answer"], variant="grpo")  # noqa: E731
    texts = [f"<think>it is {i // G}</think><answer>{i // G}</answer>" for i in range(len(prompts) * G)]
    assert all(s["accuracy"] == 1.0 for s in grpo.score_responses(texts, prompts, G, fn))
    # Shuffle the prompts and their response groups together: still all right.
    order = list(range(10))
    random.Random(0).shuffle(order)
    shuffled_texts = [texts[i * G + g] for i in order for g in range(G)]
    assert all(s["accuracy"] == 1.0 for s in grpo.score_responses(shuffled_texts, [prompts[i] for i in order], G, fn))
    # Shuffle only the prompts: responses now meet the wrong gold.
    assert sum(s["accuracy"] for s in grpo.score_responses(texts, [prompts[i] for i in order], G, fn)) < len(texts)


def _rollout(model_dir, G=2, n=3, T=1.0, max_new_tokens=24):
    model, proc = policy.load_policy(model_dir)
    ds = toy.toy_dataset("test", n)
    vs = proc.tokenizer.convert_tokens_to_ids("<|vision_start|>")
    enc = dataset.encode_prompts(proc, list(ds["question"]), list(ds["image"]), dataset.SYSTEM_PROMPTS["plain"])
    enc = {k: v.to(model.device) for k, v in enc.items()}  # as 03 does (a GPU machine runs these too)
    group = dataset.repeat_for_group(enc, G, vs)
    torch.manual_seed(0)
    model.eval()
    comp, mask, texts = rollout.generate(model, proc, group, max_new_tokens=max_new_tokens, temperature=T)
    return model, proc, enc, group, comp, mask, vs


def test_reward_flags_reach_the_reward():
    """make_reward_fn passes every reward flag of 03 on: here the ablations' switches and exercise 14's term."""
    prompt = {"answer": "7", "choices": []}
    text = ("<think>Add.</think><answer>8</answer><reflection>The first answer is wrong.</reflection>"
            "<think>Again.</think><answer>7</answer>")
    words = lambda t: len(t.split())  # noqa: E731  (B = 2 words, L = 5 = T_max: f_len = 1/e)
    score = lambda **flags: grpo.make_reward_fn(grpo.Args(**flags), words)(text, prompt)  # noqa: E731
    base = score()
    assert (base["verdict_honest"], base["verdict"], base["effectiveness"]) == (1.0, 0.0, 0.5) and base["length"] > 0
    assert score(verdict_reward=0.25)["total"] == pytest.approx(base["total"] + 0.25)
    assert score(use_effectiveness=False)["total"] == pytest.approx(base["total"] - 0.5)
    assert score(alpha=0.2)["length"] == pytest.approx(2 * base["length"])
    assert score(use_length=False)["length"] == 0 and score(use_reflection_format=False)["reflection_format"] == 0
    assert score(reward="grpo")["total"] == 1.0  # the last answer, no format for the reflective layout


def test_repeat_for_group_repeats_images(tiny_model_dir):
    proc = policy.load_processor(tiny_model_dir)
    ds = toy.toy_dataset("test", 3)
    enc = dataset.encode_prompts(proc, list(ds["question"]), list(ds["image"]), "sys")
    vs = proc.tokenizer.convert_tokens_to_ids("<|vision_start|>")
    g = dataset.repeat_for_group(enc, 4, vs)
    assert g["input_ids"].shape[0] == 12 and g["image_grid_thw"].shape[0] == 12
    per = enc["image_grid_thw"][0].prod().item()
    for i in range(12):  # row i's patches are prompt (i // 4)'s patches
        src = i // 4
        assert torch.equal(g["pixel_values"][i * per:(i + 1) * per], enc["pixel_values"][src * per:(src + 1) * per])
    sub = dataset.select_rows(g, [5, 0], vs)
    assert torch.equal(sub["pixel_values"][:per], enc["pixel_values"][per:2 * per])


def test_ratio_is_exactly_one_on_first_iteration_and_kl_zero(base_model_dir):
    model, proc, enc, group, comp, mask, vs = _rollout(base_model_dir)
    model.train()
    with torch.no_grad():
        old = grpo.token_logprobs(model, group, comp, 1.0, 4, vs)
    new = grpo.token_logprobs(model, group, comp, 1.0, 4, vs)
    args = SimpleNamespace(clip_eps=0.2, clip_eps_high=0.0, kl_coef=0.1, loss_agg="token-mean", max_new_tokens=24)
    adv = torch.randn(comp.shape[0]).to(comp.device)
    loss, stats = grpo.grpo_loss(new, old, new.detach(), adv, mask.float(), args)
    assert torch.equal(new.detach(), old)  # ratio exp(0) == 1 exactly
    assert stats["clip_frac"] == 0.0 and stats["kl"] == 0.0  # policy == reference -> k3 == 0
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_training_logprobs_match_sampling_distribution(base_model_dir):
    """log_softmax(logits / T) of the training pass == the distribution generate() sampled from."""
    T = 0.7
    # fp32 on any device: this checks the temperature scaling, not bf16 rounding (on a GPU "auto" is bf16).
    model, proc = policy.load_policy(base_model_dir, dtype="float32")
    ds = toy.toy_dataset("test", 3)
    vs = proc.tokenizer.convert_tokens_to_ids("<|vision_start|>")
    enc = dataset.encode_prompts(proc, list(ds["question"]), list(ds["image"]), dataset.SYSTEM_PROMPTS["plain"])
    enc = {k: v.to(model.device) for k, v in enc.items()}
    model.eval()
    torch.manual_seed(0)
    out = model.generate(**enc, max_new_tokens=12, do_sample=True, temperature=T, top_k=0, top_p=1.0,
                         output_scores=True, return_dict_in_generate=True,
                         eos_token_id=rollout.eos_token_ids(proc), pad_token_id=proc.tokenizer.pad_token_id)
    comp = out.sequences[:, enc["input_ids"].shape[1]:]
    sampled = torch.stack([torch.log_softmax(s.float(), -1) for s in out.scores], 1)  # processed = logits / T
    sampled = sampled.gather(-1, comp.unsqueeze(-1)).squeeze(-1)
    mask = rollout.completion_mask(comp, rollout.eos_token_ids(proc)).bool()
    with torch.no_grad():
        train = grpo.token_logprobs(model, enc, comp, T, 2, vs)
    assert torch.allclose(train[mask], sampled[mask], atol=1e-4)


def test_completion_mask_stops_at_first_eos_when_pad_is_eos():
    eos = 2
    ids = torch.tensor([[5, 6, 2, 2, 2], [2, 2, 2, 2, 2], [5, 5, 5, 5, 5], [7, 2, 9, 2, 2]])
    m = rollout.completion_mask(ids, [eos])
    assert m.tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]


def test_filters_keep_the_groups_they_promise():
    # rewards of 3 groups: all final answers right but first answers differ; all wrong the same way; mixed
    r = torch.tensor([[1.6, 1.35, 1.6, 1.35], [0.85, 0.85, 0.85, 0.85], [1.6, 0.85, 1.1, 0.85]])
    final_acc = torch.tensor([1.0, 0.0, 0.5])
    assert grpo.group_filter("final", r, final_acc, 0.1, 0.9).tolist() == [False, False, True]
    assert grpo.group_filter("spread", r, final_acc, 0.1, 0.9).tolist() == [True, False, True]
    assert grpo.group_filter("none", r, final_acc, 0.1, 0.9).tolist() == [True, True, True]


def test_loss_aggregations_differ_as_documented():
    per_token = torch.tensor([[1.0, 1.0, 0.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert grpo.aggregate(per_token, mask, "token-mean", 3).item() == pytest.approx(2.0)
    assert grpo.aggregate(per_token, mask, "seq-mean-token-mean", 3).item() == pytest.approx(2.5)
    assert grpo.aggregate(per_token, mask, "seq-mean-token-sum-norm", 3).item() == pytest.approx(1.0)
    # Dr. GRPO divides by the length cap, not by this batch's longest response: padding changes nothing
    padded, pmask = torch.nn.functional.pad(per_token, (0, 4)), torch.nn.functional.pad(mask, (0, 4))
    assert grpo.aggregate(padded, pmask, "seq-mean-token-sum-norm", 3).item() == pytest.approx(1.0)
    assert grpo.aggregate(per_token, mask, "seq-mean-token-sum-norm", 6).item() == pytest.approx(0.5)


@pytest.mark.parametrize("how", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_lockstep_rows_give_the_same_loss_and_gradient_as_dropping_filtered_groups(how):
    """Under ZeRO/FSDP every process keeps all its groups (filtered ones weighted 0), so that all run
    the same number of micro-batches; the update must be the one of the kept groups alone."""
    torch.manual_seed(0)
    P, G, T, micro = 4, 3, 5, 4
    keep = torch.tensor([True, False, True, False])
    logp_all = torch.randn(P * G, T, requires_grad=True)
    old, adv = logp_all.detach() + 0.1 * torch.randn(P * G, T), torch.randn(P * G)
    mask = (torch.rand(P * G, T) > 0.3).float()
    args = SimpleNamespace(clip_eps=0.2, clip_eps_high=0.0, kl_coef=0.0, loss_agg=how, max_new_tokens=T)
    totals, grads = [], []
    for lockstep in (False, True):
        [(rows, weight)] = grpo.update_slices(keep, G, 1, lockstep)
        assert len(rows) == (P * G if lockstep else 2 * G)
        cmask = mask[rows] * weight[:, None]
        n_tok, n_kept = cmask.sum().clamp(min=1), int(keep.sum()) * G
        total = 0.0
        for s in range(0, len(rows), micro):
            mb = rows[s:s + micro]
            loss, _ = grpo.grpo_loss(logp_all[mb], old[mb], None, adv[mb], cmask[s:s + micro], args)
            total = total + loss * grpo.micro_batch_share(how, cmask[s:s + micro], n_tok, n_kept)
        logp_all.grad = None
        total.backward()
        totals.append(total.item())
        grads.append(logp_all.grad.clone())
    assert totals[0] == pytest.approx(totals[1], rel=1e-6, abs=1e-7)
    assert torch.allclose(grads[0], grads[1], atol=1e-7)


def test_clipping_stops_gradient_beyond_the_trust_region():
    args = SimpleNamespace(clip_eps=0.2, clip_eps_high=0.0, kl_coef=0.0, loss_agg="token-mean", max_new_tokens=1)
    logp = torch.tensor([[0.5]], requires_grad=True)  # ratio e^0.5 = 1.65 > 1.2
    loss, stats = grpo.grpo_loss(logp, torch.zeros(1, 1), None, torch.tensor([1.0]), torch.ones(1, 1), args)
    loss.backward()
    assert logp.grad.item() == 0.0 and stats["clip_frac"] == 1.0


@pytest.mark.parametrize("reward", ["grpo", "released", "paper"])
def test_short_runs_complete(base_model_dir, tmp_path, reward):
    out = tmp_path / reward
    res = grpo.main(grpo.Args(model=base_model_dir, out_dir=str(out), reward=reward, steps=2, prompts_per_step=2,
                              group_size=4, max_new_tokens=24, train_size=20, save_every=1, kl_coef=0.05,
                              mu=2, sample_every=1))
    rows = res["metrics"]
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("reward", "format", "accuracy", "effectiveness", "final_accuracy", "kl", "clip_frac",
                "wrong_to_right", "zero_spread_groups", "tokens_per_s", "gen_s"):
        assert key in rows[0] and rows[0][key] == rows[0][key]  # present and not NaN
    assert (out / "model.safetensors").exists() and (out / "curves.png").exists() and (out / "samples.jsonl").exists()
    # the lr logged is the one each step's first update used: 1 warm-up step of 4 updates, then the cosine
    # (step 2's first update is the schedule's third: 0.1 + 0.9 * (1 + cos(pi / 3)) / 2 = 0.775 of lr)
    assert [r["lr"] for r in rows] == pytest.approx([4e-4, 4e-4 * 0.775])


def test_stop_and_resume_matches_uninterrupted_run(base_model_dir, tmp_path):
    from safetensors.torch import load_file

    kw = dict(model=base_model_dir, reward="grpo", prompts_per_step=2, group_size=2, max_new_tokens=16,
              train_size=20, save_every=1, steps=3, lr=1e-3)
    grpo.main(grpo.Args(out_dir=str(tmp_path / "a"), **kw))
    grpo.main(grpo.Args(out_dir=str(tmp_path / "b"), stop_after=2, **kw))  # "killed" after step 2
    res = grpo.main(grpo.Args(out_dir=str(tmp_path / "b"), resume=True, **kw))
    assert [r["step"] for r in res["metrics"]] == [1, 2, 3]
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_two_process_accelerate_cpu_run(base_model_dir, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           os.path.join(ROOT, "03_grpo.py"), "--model", base_model_dir, "--out_dir", str(out), "--reward", "grpo",
           "--steps", "2", "--prompts_per_step", "2", "--group_size", "2", "--max_new_tokens", "16",
           "--train_size", "20", "--save_every", "0", "--updates_per_rollout", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = subprocess.run(cmd, check=True, cwd=ROOT, env=env, timeout=300, capture_output=True, text=True)
    assert "processes: 2" in log.stdout + log.stderr  # really two ranks, not a silent single process
    assert len(dataset.read_jsonl(out / "metrics.jsonl")) == 2 and (out / "model.safetensors").exists()
    assert [u["update"] for u in dataset.read_jsonl(out / "updates.jsonl")] == [1, 2, 1, 2]  # 2 steps a rollout


def test_local_jsonl_prompts_and_bad_rows(tmp_path, capsys):
    ds = toy.toy_dataset("test", 3)
    rows = []
    for r in ds:
        r["image"].save(tmp_path / f"{r['id']}.png")
        rows.append({"question": r["question"], "answer": r["answer"], "image": f"{r['id']}.png"})  # no id, no choices
    # A JPEG cut short passes the start-up check (PIL verifies only PNG checksums) but not decoding.
    Image.effect_noise((112, 112), 60).convert("RGB").save(tmp_path / "whole.jpg")
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "whole.jpg").read_bytes()[:3000])
    rows[2]["image"] = "cut.jpg"
    for r in rows + [{**rows[0], "image": "missing.png"}, {**rows[1], "answer": ""}]:
        dataset.append_jsonl(tmp_path / "rl.jsonl", r)
    prompts = dataset.load_prompts(grpo.Args(data=str(tmp_path / "rl.jsonl")))  # all rows: no --train_size
    assert [p["answer"] for p in prompts] == list(ds["answer"]) and [p["id"] for p in prompts] == ["row0", "row1", "row2"]
    assert dataset.open_image("cut.jpg", str(tmp_path), verify_only=True) is None  # passes the check
    out = capsys.readouterr().out
    assert "skipped 1 row(s), missing image: row 4 (id row3)" in out and "missing.png" in out
    assert "skipped 1 row(s), empty gold: row 5 (id row4)" in out
    # At a step, the undecodable image's prompt is replaced by the next one (wrapping round), and said so.
    batch, images = dataset.batch_images([prompts[2], prompts[1]], prompts, 0)
    assert [p["id"] for p in batch] == ["row0", "row1"] and [im.size for im in images] == [(112, 112)] * 2
    assert "row 3 (id row2): cannot read" in capsys.readouterr().out
    (tmp_path / "bad.jsonl").write_text((tmp_path / "rl.jsonl").read_text().splitlines()[3] + "\n")
    with pytest.raises(ValueError, match="no usable RL prompts"):
        dataset.load_prompts(grpo.Args(data=str(tmp_path / "bad.jsonl")))


def test_prompts_from_a_parquet_with_other_column_names_and_no_images(tmp_path):
    """03 reads what 01 reads: a hub-style table with an Image feature, renamed columns, a size cap."""
    import datasets

    ds = toy.toy_dataset("test", 6).rename_columns({"question": "problem", "answer": "solution_letter"})
    ds.to_parquet(str(tmp_path / "rl.parquet"))
    assert isinstance(datasets.load_dataset("parquet", data_files=str(tmp_path / "rl.parquet"),
                                            split="train").features["image"], datasets.Image)
    args = grpo.Args(data=str(tmp_path / "rl.parquet"), question_column="problem", answer_column="solution_letter",
                     id_column="", train_size=4)
    prompts = dataset.load_prompts(args)
    assert len(prompts) == 4 and {p["id"] for p in prompts} <= {f"row{i}" for i in range(6)}
    assert {(p["question"], p["answer"]) for p in prompts} <= set(zip(ds["problem"], ds["solution_letter"]))
    assert all(im.size == (112, 112) for im in dataset.batch_images(prompts, prompts, 0)[1])
    text_only = dataset.load_prompts(grpo.Args(data=str(tmp_path / "rl.parquet"), question_column="problem",
                                            answer_column="solution_letter", image_column=""))
    assert len(text_only) == 6 and dataset.batch_images(text_only[:2], text_only, 0)[1] == [None, None]
    with pytest.raises(ValueError, match=r"--answer_column 'answer'.*'solution_letter'"):
        dataset.load_prompts(grpo.Args(data=str(tmp_path / "rl.parquet"), question_column="problem"))


@pytest.mark.parametrize("how", ["token-mean", "seq-mean-token-mean"])
def test_two_processes_take_the_step_one_process_takes_on_the_whole_batch(tiny_model_dir, tmp_path, how):
    """The loss is normalised over the batch of ALL processes: with the accuracy filter keeping 3 groups on
    one process and 1 on the other, 2 processes must move the weights exactly as 1 process does on all
    rows (a per-process mean would weigh the lone group's tokens 3x)."""
    from safetensors.torch import load_file

    worker = os.path.join(ROOT, "tests", "grpo_step_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    subprocess.run([sys.executable, worker, tiny_model_dir, str(one), how], check=True, cwd=ROOT, env=env, timeout=300)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", worker, tiny_model_dir,
           str(two), how]
    log = subprocess.run(cmd, cwd=ROOT, env=env, timeout=300, capture_output=True, text=True)
    assert log.returncode == 0, log.stdout[-3000:] + log.stderr[-3000:]
    a, b = load_file(one), load_file(two)
    before = dict(policy.load_policy(tiny_model_dir, device="cpu")[0].named_parameters())
    assert sum((a[n] - before[n]).abs().sum() for n in a) > 0, "the step changed no weight"
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


def test_prompt_shared_logprobs_equal_one_pass_values_and_gradients(base_model_dir):
    """Each prompt run once per micro-batch, its keys and values repeated for its G completions: the same
    log-probs and gradients as prompt + completion in one pass (groups of 3 split over micro-batches of
    4, left padding, images, completions that end at different lengths)."""
    model, proc, enc, group, comp, mask, vs = _rollout(base_model_dir, G=3, n=3)
    model.train()
    results = []
    for share in (False, True):
        model.zero_grad()
        logp = grpo.token_logprobs(model, group, comp, 0.8, 4, vs, share_prompts=share)
        (logp * mask).sum().backward()
        results.append((logp.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (a, ga), (b, gb) = results
    assert a.shape == comp.shape and torch.allclose(a, b, atol=2e-5), (a - b).abs().max()
    assert ga.keys() == gb.keys() and len(ga) > 10
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-4, atol=1e-5, msg=n)
