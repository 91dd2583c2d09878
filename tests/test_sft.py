"""02_sft.py: the Eq. (1) label mask, learning, resume, 2-process data parallel, LoRA and QLoRA.

The SFT input is built here from the toy (toy.cot_response + toy.oracle_reflection, images as PNG
beside a JSONL), in the schema 01_reflect_data.py writes, so these tests do not depend on 01.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from machinery import dataset, policy, rollout
import toy
from conftest import ROOT, load_script

sft = load_script("02_sft")


def make_sft_jsonl(folder, n=48, style="reflect", seed=0):
    """An SFT JSONL like 01's: ~70% of first answers wrong (a misread count), teacher = the toy oracle."""
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    rows = []
    for i, p in enumerate(toy.toy_dataset("train", n, seed=seed)):
        reads = [tuple(r) for r in json.loads(p["solution"])["reads"]]
        if i % 10 < 7:  # misread the first value
            reads[0] = (reads[0][0], reads[0][1] % 4 + 1)
        cot = toy.cot_response(p, reads=reads)
        first_correct = re.search(r"<answer>(.*)</answer>", cot).group(1) == p["answer"]
        if style == "reflect":
            response = (f"{cot}\n<reflection>{toy.oracle_reflection(p, cot, first_correct)}</reflection>\n"
                        f"<answer>{p['answer']}</answer>")
        else:
            response = toy.cot_response(p)
        image = f"images/{p['id']}.png"
        p["image"].save(os.path.join(folder, image))
        rows.append({"id": p["id"], "question": p["question"], "image": image, "answer": p["answer"],
                     "choices": p["choices"], "response": response, "prompt_style": style,
                     "first_correct": first_correct})
    path = os.path.join(folder, f"sft_{style}.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    return make_sft_jsonl(str(tmp_path_factory.mktemp("reflect")))


def tiny_args(model, data, out_dir, **kw):
    """A few-second run: small batches, no before/after generation."""
    defaults = dict(model=model, data=data, out_dir=str(out_dir), batch_size=4, max_steps=4, lr=3e-3,
                    eval_size=0, save_every=0, threads=1)
    return sft.Args(**{**defaults, **kw})


def weights(path):
    return load_file(os.path.join(path, "model.safetensors"))


# ----------------------------------------------------------------------------------------------


def test_label_mask_covers_exactly_the_assistant_tokens(tiny_model_dir, sft_data):
    processor = policy.load_processor(tiny_model_dir)
    tok = processor.tokenizer
    ds = sft.load_sft_data(sft_data)
    rows = ds.select([0, 3])  # two lengths, so the shorter row is padded
    batch = sft.encode_rows(processor, rows, root=os.path.dirname(sft_data), data_path=sft_data)
    assert batch["pixel_values"].shape[0] == 2 * 64 and batch["image_grid_thw"].tolist() == [[1, 8, 8]] * 2
    im_start, im_end = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
    header = len(tok("assistant\n")["input_ids"])
    for i, row in enumerate(rows):
        ids, labels = batch["input_ids"][i].tolist(), batch["labels"][i].tolist()
        n = int(batch["attention_mask"][i].sum())
        # Independently of encode_sft: the target starts after the third <|im_start|> (system, user,
        # assistant) and its header, and ends with the first <|im_end|> after that.
        starts = [t for t, x in enumerate(ids) if x == im_start]
        assert len(starts) == 3
        begin = starts[2] + 1 + header
        end = ids.index(im_end, begin) + 1
        assert end == n  # nothing but padding after the target
        assert tok.decode(ids[begin:end], skip_special_tokens=False) == row["response"] + "<|im_end|>"
        for t in range(len(ids)):  # token by token: trained exactly on [begin, end), as themselves
            assert labels[t] == (ids[t] if begin <= t < end else -100), (i, t, tok.decode([ids[t]]))
        image_positions = [t for t, x in enumerate(ids) if x == processor.image_token_id]
        assert len(image_positions) == 16 and all(labels[t] == -100 for t in image_positions)
        assert tok.decode(ids[:begin]).count(row["question"]) == 1  # the user turn is in the masked part
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    # --no-train_first_attempt: the same tokens, trained from the separator after the first answer on (the
    # decision to go on and reflect is trained; only the first attempt itself is context)
    cut = sft.encode_rows(processor, rows, root=os.path.dirname(sft_data), data_path=sft_data,
                          untrained_prefix="<reflection>")
    assert torch.equal(cut["input_ids"], batch["input_ids"])
    reflection = tok.convert_tokens_to_ids("<reflection>")
    for i in range(len(rows)):
        ids, labels = batch["input_ids"][i].tolist(), cut["labels"][i].tolist()
        start = ids.index(reflection, [t for t, x in enumerate(ids) if x == im_start][2]) - 1  # the target's "\n"
        assert tok.decode(ids[start - 1:start + 2]) == "</answer>\n<reflection>"
        assert all(x == -100 for x in labels[:start]) and labels[start:] == batch["labels"][i].tolist()[start:]


def test_untrained_first_attempt_trains_a_merged_separator_token():
    """A BPE tokenizer may merge the first attempt's last character with the separator (">\n"): encode_sft then
    trains that token, since it decides whether the model goes on after the first answer. A stand-in
    processor whose vocabulary is one token per character, except ">\n", which is one token."""
    from types import SimpleNamespace

    def encode(text):
        out, k = [], 0
        while k < len(text):
            step = 2 if text[k:k + 2] == ">\n" else 1
            out.append(1000 if step == 2 else ord(text[k]))
            k += step
        return out

    class Chars:
        tokenizer = SimpleNamespace(convert_tokens_to_ids=lambda _: 7)

        def apply_chat_template(self, messages, **_):
            return "P|"

        def __call__(self, text, **_):
            ids = [encode(t.replace("<|im_end|>", "\x07")) for t in text]
            width = max(map(len, ids))
            return {"input_ids": torch.tensor([x + [0] * (width - len(x)) for x in ids]),
                    "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])}

    target = "<a>1</a>\n<r>ok</r><a>1</a>"
    batch = dataset.encode_sft(Chars(), ["q"], [None], [target], "system", untrained_prefix="<r>")
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    merged = ids.index(1000)
    assert all(x == -100 for x in labels[:merged]) and labels[merged:] == ids[merged:]
    plain = dataset.encode_sft(Chars(), ["q"], [None], [target.replace("\n", " ")], "system", untrained_prefix="<r>")
    space = plain["input_ids"][0].tolist().index(ord(" "))  # no merge: trained from the separator itself
    assert all(x == -100 for x in plain["labels"][0, :space]) and plain["labels"][0, space] == ord(" ")


def test_bad_rows_name_file_row_and_field(tmp_path, sft_data):
    rows = dataset.read_jsonl(sft_data)[:3]
    shutil.copytree(os.path.join(os.path.dirname(sft_data), "images"), tmp_path / "images")

    def write(rows, name):
        path = tmp_path / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(path)

    with pytest.raises(ValueError, match=r"missing column.*'response'"):
        sft.load_sft_data(write([{k: v for k, v in r.items() if k != "response"} for r in rows], "a.jsonl"))
    bad = [dict(r) for r in rows]
    bad[1]["image"] = "images/nope.png"
    with pytest.raises(FileNotFoundError, match=rf"b.jsonl: row 1 \(id '{rows[1]['id']}'\): field 'image'"):
        sft.load_sft_data(write(bad, "b.jsonl"))
    bad = [dict(r) for r in rows]
    bad[2]["prompt_style"] = "fancy"
    with pytest.raises(ValueError, match=r"row 2 .*field 'prompt_style'"):
        sft.load_sft_data(write(bad, "c.jsonl"))
    (tmp_path / "images" / "broken.png").write_bytes(b"not a png")
    bad = [dict(r) for r in rows]
    bad[0]["image"] = "images/broken.png"
    path = write(bad, "d.jsonl")
    with pytest.raises(ValueError, match=rf"d.jsonl: row id '{rows[0]['id']}': field 'image': cannot read"):
        sft.encode_rows(None, sft.load_sft_data(path).select([0]), root=str(tmp_path), data_path=path)


def test_loss_falls_and_outputs_load_back(tiny_model_dir, sft_data, tmp_path):
    out = tmp_path / "sft"
    res = sft.main(tiny_args(tiny_model_dir, sft_data, out, batch_size=8, max_steps=12, eval_size=4,
                             eval_max_new_tokens=8))
    rows = dataset.read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert {"loss", "lr", "tokens", "seconds", "grad_norm"} <= set(rows[0])
    first, last = sum(r["loss"] for r in rows[:3]) / 3, sum(r["loss"] for r in rows[-3:]) / 3
    assert last < 0.8 * first, (first, last)
    # warm-up to the peak (10% of 12 steps = 2 steps), then cosine decay towards 0
    lrs = [r["lr"] for r in rows]
    assert lrs[:3] == pytest.approx([1.5e-3, 3e-3, 3e-3]) and 0 < lrs[-1] < lrs[6] < lrs[2]
    assert (out / "loss.png").stat().st_size > 0
    assert {"before", "after", "rank_digests"} <= set(res) and len(dataset.read_jsonl(out / "eval_samples.jsonl")) == 8
    model, _ = policy.load_policy(str(out), device="cpu")  # 03/04 load it as-is
    saved = weights(str(out))
    assert torch.equal(model.model.language_model.embed_tokens.weight, saved["model.embed_tokens.weight"])
    # the vision tower and projector are frozen by default; the language model trained
    before = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    assert all(torch.equal(before[n], saved[n]) for n in saved if n.startswith("visual."))
    assert all(not torch.equal(before[n], saved[n]) for n in saved if n.startswith("model.layers.") and "proj.weight" in n)


def test_resume_reaches_the_same_weights(tiny_model_dir, sft_data, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    sft.main(tiny_args(tiny_model_dir, sft_data, full, max_steps=6, save_every=2))
    # "Killed" after step 5: the last checkpoint is step 4, so resuming redoes step 5.
    assert sft.main(tiny_args(tiny_model_dir, sft_data, cut, max_steps=6, save_every=2, stop_after=5)) == {"stopped_at": 5}
    state = json.loads((cut / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["extra"]["epoch"] == 0 and state["extra"]["batch_in_epoch"] == 4
    sft.main(tiny_args(tiny_model_dir, sft_data, cut, max_steps=6, save_every=2, resume=True))
    a, b = weights(str(full)), weights(str(cut))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-7, msg=name)
    la, lb = dataset.read_jsonl(full / "metrics.jsonl"), dataset.read_jsonl(cut / "metrics.jsonl")
    assert [r["step"] for r in lb] == list(range(1, 7))
    assert [r["loss"] for r in la] == pytest.approx([r["loss"] for r in lb], rel=1e-6)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_accelerate_launch(tiny_model_dir, sft_data, tmp_path):
    """DDP over gloo on the CPU via the shipped configs/ddp.yaml; both ranks end with the same weights,
    and (loss normalised over the whole effective batch) the same as one process with the same batches."""
    two, one = tmp_path / "two", tmp_path / "one"
    script_args = ["--model", tiny_model_dir, "--data", sft_data, "--batch_size", "8", "--grad_accum", "2",
                   "--max_steps", "3", "--lr", "3e-3", "--eval_size", "0", "--save_every", "2", "--cpu",
                   "--threads", "1"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", os.path.join(ROOT, "configs", "ddp.yaml"),
           "--num_processes", "2", "--main_process_port", str(_free_port()), os.path.join(ROOT, "02_sft.py"),
           *script_args, "--out_dir", str(two)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.load(open(two / "sft_summary.json"))
    assert len(summary["rank_digests"]) == 2 and len(set(summary["rank_digests"])) == 1
    assert os.path.isdir(two / "checkpoint") and len(dataset.read_jsonl(two / "metrics.jsonl")) == 3
    sft.main(tiny_args(tiny_model_dir, sft_data, one, batch_size=8, grad_accum=4, max_steps=3))
    a, b = weights(str(one)), weights(str(two))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("mode", ["lora", "qlora"])
def test_lora_and_qlora_train_and_save(tiny_model_dir, sft_data, tmp_path, mode):
    out = tmp_path / mode
    # LoRA: also the merged copy and the after-training check on the (merged) model
    kw = dict(lora_r=4, merge_lora=True, eval_size=2, eval_max_new_tokens=4) if mode == "lora" else \
        dict(load_in_4bit=True)  # QLoRA without --lora_r: r = 16
    sft.main(tiny_args(tiny_model_dir, sft_data, out, max_steps=2, lr=1e-2, save_every=1, **kw))
    assert (out / "adapter_model.safetensors").exists() and (out / "checkpoint" / "model.safetensors").exists()
    # the checkpoint holds the trainable weights only: the adapters, not the (frozen, maybe 4-bit) base
    assert all("lora_" in n for n in load_file(str(out / "checkpoint" / "model.safetensors")))
    r = json.loads((out / "adapter_config.json").read_text())["r"]
    assert r == json.loads((out / "sft_summary.json").read_text())["lora_r_used"] == (4 if mode == "lora" else 16)
    base, adapter = policy.resolve_model(str(out))
    assert base == tiny_model_dir and adapter == str(out)
    model, processor = policy.load_policy(base, adapter_path=adapter, load_in_4bit=mode == "qlora", device="cpu")
    trained = load_file(str(out / "adapter_model.safetensors"))
    assert any("lora_B" in n and t.abs().sum() > 0 for n, t in trained.items())  # B starts at 0: it moved
    batch = dataset.encode_prompts(processor, ["How many red dots are there?"], [toy.make_problem(1)["image"]],
                                  dataset.SYSTEM_PROMPTS["reflect"])
    assert len(rollout.generate(model, processor, batch, max_new_tokens=4)[2]) == 1
    if mode == "lora":  # the merged copy is a plain checkpoint
        merged, _ = policy.load_policy(str(out / "merged"), device="cpu")
        assert not hasattr(merged, "peft_config")
