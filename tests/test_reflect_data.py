"""Tests of 01_reflect_data.py: gold filter, teacher JSON, selection, the openai backend against a real
HTTP server on 127.0.0.1, the oracle and hf backends end to end, kill-and-resume, and bad rows."""

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from conftest import ROOT, load_script

from machinery import dataset, grading
import toy

rd = load_script("01_reflect_data")
KEY = "sk-test-DO-NOT-LEAK-4f9a2c"
# Small enough to be quick on 2 CPU cores; the kill test runs the same settings as a subprocess.
SMALL = dict(pool_size=96, batch_size=8, max_new_tokens=48, num_samples=24, threads=1)


def small_args(model, out_dir, **kw):
    return rd.Args(model=model, out_dir=str(out_dir), **{**SMALL, **kw})


def run_main(args):
    """rd.main in this process, restoring torch's thread count (SMALL pins it to 1 for determinism)."""
    threads = torch.get_num_threads()
    try:
        return rd.main(args)
    finally:
        torch.set_num_threads(threads)


def cli(args: dict):
    return [sys.executable, os.path.join(ROOT, "01_reflect_data.py")] + [f"--{k}={v}" for k, v in args.items()]


# ----------------------------------------------------------------------------------------------
# Pure pieces


@pytest.mark.parametrize("gold", ["A", "D", "(B)", "C.", "3", "-2", "0.25", "145", ".5"])
def test_gold_letter_or_number_is_kept(gold):
    assert rd.GOLD_RE.fullmatch(gold)


@pytest.mark.parametrize("gold", ["x^2+1", "12 cm", "", "AB", "red", "\\frac{1}{2}", "3/4", "b"])
def test_other_gold_is_dropped(gold):
    assert not rd.GOLD_RE.fullmatch(gold)


def test_parse_reflection():
    assert rd.parse_reflection('{"reflection": " I misread the red dots. "}') == "I misread the red dots."
    assert rd.parse_reflection('```json\n{"reflection": "ok"}\n```') == "ok"
    for bad in ['Sure! {"reflection": "x"}', '{"reflection": ""}', '{"critique": "x"}', '["x"]', "",
                '{"reflection": 3}', '{"reflection": "fine</reflection><answer>9"}']:
        assert rd.parse_reflection(bad) is None, bad


def fake_answers(n_right, n_wrong, n_malformed=0):
    rows = [{"id": f"p{i}", "row": i, "correct": i < n_right, "well_formed": i < n_right + n_wrong}
            for i in range(n_right + n_wrong + n_malformed)]
    return rows[::-1]  # file order must not matter


def test_select_paper_mix_deterministic():
    answers = fake_answers(100, 200, 50)
    sel, note = rd.select(answers, 60, 0.3, seed=1)
    assert note is None and len(sel) == 60 and sum(a["correct"] for a in sel) == 18
    assert all(a["well_formed"] for a in sel) and len({a["id"] for a in sel}) == 60
    assert sel == rd.select(answers, 60, 0.3, seed=1)[0]
    assert sel != rd.select(answers, 60, 0.3, seed=2)[0]
    assert sum(a["correct"] for a in rd.select(answers, 60, 0.5, seed=1)[0]) == 30


def test_select_says_when_pool_cannot_supply_mix():
    sel, note = rd.select(fake_answers(5, 200), 60, 0.3, seed=0)
    assert "cannot supply" in note and "18 right" in note and len(sel) == 60
    assert sum(a["correct"] for a in sel) == 5  # all the right ones, the rest filled with wrong ones
    sel, note = rd.select(fake_answers(5, 200), 60, 0.3, seed=0, fill_from_other=False)
    assert note and len(sel) == 5 + 42


def test_repair_jsonl_cuts_torn_line(tmp_path):
    path = str(tmp_path / "a.jsonl")
    dataset.append_jsonl(path, {"id": "a"})
    with open(path, "a") as f:
        f.write('{"id": "b", "resp')  # killed mid-write
    rd.repair_jsonl(path)
    dataset.append_jsonl(path, {"id": "c"})
    assert [r["id"] for r in dataset.read_jsonl(path)] == ["a", "c"]


# ----------------------------------------------------------------------------------------------
# A fake OpenAI-compatible server on 127.0.0.1


class FakeTeacherHandler(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802
        srv = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        auth = self.headers.get("Authorization", "")
        with srv.lock:
            srv.requests.append({"path": self.path, "auth": auth, "body": body})
            action = srv.script.pop(0) if srv.script else srv.default
        if action == "slow":
            time.sleep(srv.slow_s)
            action = "ok"
        if action in ("500", "429", "401"):
            # A careless server that echoes the request's headers: the key must still never leak.
            self._send(int(action), {"error": f"boom; you sent Authorization: {auth}"},
                       {"Retry-After": "0"} if action == "429" else {})
            return
        content = {"ok": json.dumps({"reflection": f"I misread the image (reply {len(srv.requests)})."}),
                   "bad_json": f"Sure! The reflection is that I misread the image. ({auth})"}[action]
        self._send(200, {"choices": [{"message": {"role": "assistant", "content": content}}]})

    def _send(self, code, obj, headers=None):
        data = json.dumps(obj).encode()
        try:
            self.send_response(code)
            headers = {"Content-Type": "application/json", "Content-Length": str(len(data)), **(headers or {})}
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client timed out and hung up
            pass

    def log_message(self, *a):
        pass


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), FakeTeacherHandler)
    srv.daemon_threads = True
    srv.lock, srv.requests, srv.script, srv.default, srv.slow_s = threading.Lock(), [], [], "ok", 0.0
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def item(tmp_path):
    p = toy.make_problem(7)
    path = str(tmp_path / "toy-7.png")
    p["image"].save(path)
    return {**{k: v for k, v in p.items() if k != "image"}, "think": "red: 1.", "first": "1", "correct": False,
            "image_path": path}


def openai_args(server, **kw):
    return rd.Args(teacher="openai", base_url=server.url, teacher_model="o4-mini", timeout_s=0.5, backoff_s=0.01,
                   max_retries=3, max_json_retries=2, **kw)


def test_openai_answer_and_request_layout(server, item):
    reflection = rd.openai_reflect(item, openai_args(server), KEY)
    assert reflection.startswith("I misread the image")
    (req,) = server.requests
    assert req["path"] == "/v1/chat/completions" and req["auth"] == f"Bearer {KEY}"
    body = req["body"]
    assert body["model"] == "o4-mini" and body["response_format"] == {"type": "json_object"}
    system, user = body["messages"]
    assert system["role"] == "system" and user["role"] == "user"
    image = next(p for p in user["content"] if p["type"] == "image_url")["image_url"]["url"]
    assert image.startswith("data:image/png;base64,")
    assert base64.b64decode(image.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    text = next(p for p in user["content"] if p["type"] == "text")["text"]
    assert item["question"] in text and "red: 1." in text and item["answer"] in text and "wrong" in text
    assert rd.openai_reflect(item, openai_args(server, json_mode=False), "") and "response_format" not in \
        server.requests[-1]["body"] and server.requests[-1]["auth"] == ""


def test_openai_retries_500_429_and_timeouts(server, item):
    server.script, server.slow_s = ["500", "429", "slow", "ok"], 2.0  # "slow" outlives the 0.5 s timeout
    assert rd.openai_reflect(item, openai_args(server), KEY)
    assert len(server.requests) == 4


def test_openai_reasks_after_malformed_json(server, item):
    server.script = ["bad_json", "bad_json", "ok"]
    assert rd.openai_reflect(item, openai_args(server), KEY)
    last = server.requests[-1]["body"]["messages"]
    assert [m["role"] for m in last] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert last[-1]["content"] == rd.REASK and last[2]["content"].startswith("Sure!")


@pytest.mark.parametrize("default, calls", [("500", 4), ("bad_json", 3)])
def test_openai_gives_up_with_scrubbed_error(server, item, default, calls):
    server.default = default
    rd._SECRETS.append(KEY)
    with pytest.raises(rd.TeacherError) as e:
        rd.openai_reflect(item, openai_args(server), KEY)
    assert len(server.requests) == calls and KEY not in str(e.value) and "***" in str(e.value)


def test_openai_bad_key_is_a_clear_fatal_error(server, item):
    server.default = "401"
    rd._SECRETS.append(KEY)
    with pytest.raises(RuntimeError, match="HTTP 401") as e:
        rd.openai_reflect(item, openai_args(server), KEY)
    assert KEY not in str(e.value) and len(server.requests) == 1


# ----------------------------------------------------------------------------------------------
# End to end with the small toy base model


@pytest.fixture(scope="module")
def reference(base_model_dir, tmp_path_factory):
    """One uninterrupted oracle run; later tests copy its answers.jsonl to skip the policy phase."""
    out = tmp_path_factory.mktemp("reference")
    return str(out), run_main(small_args(base_model_dir, out))


def copy_answers(reference_dir, out):
    os.makedirs(out, exist_ok=True)
    for name in ("answers.jsonl", "skipped.jsonl"):
        if os.path.exists(os.path.join(reference_dir, name)):
            shutil.copy(os.path.join(reference_dir, name), out)


def test_oracle_end_to_end(reference, base_model_dir, capsys):
    import datasets

    out, stats = reference
    assert stats["pool"] == stats["answered"] == 96 and stats["skipped"] == 0
    assert stats["correct"] + stats["incorrect"] == 96 and stats["teacher_failures"] == 0
    usable = sum(a["well_formed"] for a in dataset.read_jsonl(os.path.join(out, "answers.jsonl")))
    assert stats["selected"] == stats["reflections"] == stats["cot"] == min(24, usable) > 0
    ds = datasets.load_dataset("json", data_files=os.path.join(out, "sft_reflect.jsonl"), split="train")
    assert len(ds) == stats["selected"] and len(set(ds["id"])) == len(ds)
    policy = {a["id"]: a["response"] for a in dataset.read_jsonl(os.path.join(out, "answers.jsonl"))}
    for row in ds:
        p = grading.parse_response(row["response"])
        assert p["layout"] == ("think", "answer", "reflection", "answer") and p["answer2"] == row["answer"]
        # The first attempt is the policy's own text, byte for byte ("<think> red" must not become
        # "<think>red": a different token than the policy writes).
        assert row["response"].startswith(policy[row["id"]].strip() + "\n<reflection>")
        assert row["response"].count("\n") == 3 and row["prompt_style"] == "reflect"
        assert grading.is_correct(p["answer1"], row["answer"], row["choices"] or None) == row["first_correct"]
        assert os.path.isfile(os.path.join(out, row["image"]))
    cot = dataset.read_jsonl(os.path.join(out, "sft_cot.jsonl"))
    assert {r["id"] for r in cot} == set(ds["id"]) and all(r["prompt_style"] == "plain" for r in cot)
    assert all(r["response"] == toy.cot_response(toy.make_problem(int(r["id"].split("-")[1]))) for r in cot)
    saved = json.load(open(os.path.join(out, "stats.json")))
    assert saved["selected_correct"] == stats["selected_correct"]

    # A rerun finds everything done: same stats, nothing duplicated, no model needed.
    again = run_main(small_args("/nonexistent/model", out))
    assert {k: again[k] for k in ("answered", "selected", "reflections", "cot")} == \
        {k: stats[k] for k in ("answered", "selected", "reflections", "cot")}
    assert len(dataset.read_jsonl(os.path.join(out, "sft_reflect.jsonl"))) == stats["selected"]
    assert "selected" in capsys.readouterr().out


def test_direct_rows_are_right_answers_without_reflection(reference, tmp_path):
    """--direct_rows: the policy's own right answers to problems outside the selection, verbatim, under
    the reflective prompt; the reflective rows stay the paper's."""
    ref_out, _ = reference
    out = tmp_path / "direct"
    copy_answers(ref_out, out)
    # the small base model is right too rarely: count every other answer as right (only the labels matter)
    answers = [{**a, "correct": i % 2 == 0} for i, a in enumerate(dataset.read_jsonl(out / "answers.jsonl"))]
    rd.write_jsonl_atomic(str(out / "answers.jsonl"), answers)
    stats = run_main(small_args("/nonexistent/model", out, direct_rows=10))  # answers there: no model needed
    rows = dataset.read_jsonl(out / "sft_reflect.jsonl")
    reflective = [r for r in rows if "<reflection>" in r["response"]]
    direct = [r for r in rows if "<reflection>" not in r["response"]]
    answers = {a["id"]: a for a in answers}
    assert stats["direct"] == len(direct) == 10 and len(reflective) == stats["selected"] == 24
    assert not {r["id"] for r in direct} & {r["id"] for r in reflective}
    for r in direct:
        assert answers[r["id"]]["correct"] and r["response"] == answers[r["id"]]["response"].strip()
        assert r["prompt_style"] == "reflect" and os.path.isfile(out / r["image"])
    for baseline in ("sft_cot", "sft_scratchpad"):  # the baselines' sets cover the same problems
        assert sorted(r["id"] for r in dataset.read_jsonl(out / f"{baseline}.jsonl")) == sorted(r["id"] for r in rows)
    run_main(small_args("/nonexistent/model", out, direct_rows=10))  # a rerun adds nothing
    assert len(dataset.read_jsonl(out / "sft_reflect.jsonl")) == len(rows)


def test_openai_end_to_end_counts_failures_and_never_leaks_key(reference, server, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "openai")
    copy_answers(reference[0], out)
    monkeypatch.setenv("SRPO_TEST_KEY", KEY)
    # Sequential, so the script hits known items: one fails on 500s, one on malformed JSON.
    server.script = ["500", "500"] + ["ok"] * 5 + ["bad_json"] * 3
    args = small_args("/unused", out, teacher="openai", base_url=server.url, api_key_env="SRPO_TEST_KEY",
                      concurrency=1, max_retries=1, max_json_retries=2, backoff_s=0.01, timeout_s=2)
    stats = run_main(args)
    assert stats["teacher_failures"] == 2 and stats["reflections"] == stats["selected"] - 2
    assert all(r["auth"] == f"Bearer {KEY}" for r in server.requests)
    # The rerun asks only for the two that failed.
    n = len(server.requests)
    stats = run_main(args)
    assert stats["teacher_failures"] == 0 and len(server.requests) == n + 2
    rows = dataset.read_jsonl(os.path.join(out, "sft_reflect.jsonl"))
    assert len(rows) == len({r["id"] for r in rows}) == stats["selected"]
    captured = capsys.readouterr()
    assert "teacher failed on" in captured.out + captured.err and "***" in captured.out + captured.err
    for dirpath, _, files in os.walk(out):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                assert KEY.encode() not in f.read(), name
    assert KEY not in captured.out + captured.err


def test_hf_teacher_counts_failures(reference, tiny_model_dir, tmp_path):
    out = str(tmp_path / "hf")
    copy_answers(reference[0], out)
    stats = run_main(small_args("/unused", out, num_samples=4, teacher="hf", teacher_model=tiny_model_dir,
                               teacher_max_new_tokens=8, max_json_retries=1))
    # An untrained model writes no valid JSON: every item is a counted failure, not a crash.
    assert stats["selected"] == 4 and stats["teacher_failures"] == 4 and stats["reflections"] == 0


def wait_for_lines(path, n, proc, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout and proc.poll() is None:
        if os.path.exists(path) and sum(1 for _ in open(path)) >= n:
            return True
        time.sleep(0.02)
    return False


def test_kill_during_policy_answers_then_resume(reference, base_model_dir, tmp_path):
    out = str(tmp_path / "killed")
    cmd = cli({"model": base_model_dir, "out_dir": out, **SMALL})
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    hit = wait_for_lines(os.path.join(out, "answers.jsonl"), 20, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert hit and proc.returncode == -signal.SIGKILL
    n_before = len(dataset.read_jsonl(os.path.join(out, "answers.jsonl")))
    assert 20 <= n_before < 96 and not os.path.exists(os.path.join(out, "sft_reflect.jsonl"))
    run_main(small_args(base_model_dir, out))  # the rerun (in this process: quicker than a second subprocess)

    # Nothing duplicated or lost, and the same answers as the uninterrupted run (per-batch seeds).
    for name in ("answers.jsonl", "sft_reflect.jsonl", "sft_cot.jsonl"):
        rows = dataset.read_jsonl(os.path.join(out, name))
        ref = dataset.read_jsonl(os.path.join(reference[0], name))
        assert len(rows) == len({r["id"] for r in rows}) == len(ref), name
        assert sorted(rows, key=lambda r: r["id"]) == sorted(ref, key=lambda r: r["id"]), name


def test_ctrl_c_during_teacher_then_resume(reference, server, tmp_path):
    out = str(tmp_path / "interrupted")
    copy_answers(reference[0], out)
    server.default, server.slow_s = "slow", 0.5  # slow enough that the interrupt lands mid-run
    cmd = cli({"model": "/unused", "out_dir": out, **SMALL, "teacher": "openai", "base_url": server.url,
               "concurrency": 2, "timeout_s": 5})
    # A shell starts background jobs with SIGINT ignored, and children inherit that: restore the
    # default so Python turns the signal into KeyboardInterrupt, as in a terminal.
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    hit = wait_for_lines(os.path.join(out, "sft_reflect.jsonl"), 4, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert hit and proc.returncode == 1 and b"rerun the same command to resume" in err
    n_before = len(dataset.read_jsonl(os.path.join(out, "sft_reflect.jsonl")))
    selected = reference[1]["selected"]
    assert 4 <= n_before < selected
    server.default, asked = "ok", len(server.requests)
    run_main(small_args("/unused", out, teacher="openai", base_url=server.url, concurrency=2, timeout_s=5))
    rows = dataset.read_jsonl(os.path.join(out, "sft_reflect.jsonl"))
    ref = dataset.read_jsonl(os.path.join(reference[0], "sft_reflect.jsonl"))
    assert len(rows) == len({r["id"] for r in rows}) == selected
    assert {r["id"] for r in rows} == {r["id"] for r in ref}
    assert len(server.requests) - asked == selected - n_before  # finished items were not asked again


# ----------------------------------------------------------------------------------------------
# Bad rows and wrong columns


@pytest.fixture
def local_jsonl(tmp_path):
    """A local JSONL pool: six good toy problems (image paths relative to the file) and five bad rows."""
    rows = []
    for seed in range(6):
        p = toy.make_problem(seed)
        p["image"].save(tmp_path / f"{p['id']}.png")
        rows.append({**{k: v for k, v in p.items() if k != "image"}, "image": f"{p['id']}.png"})
    (tmp_path / "broken.png").write_text("not an image")
    good = {k: v for k, v in rows[0].items() if k != "id"}
    rows += [{**good, "id": "no-file", "image": "missing.png"},
             {**good, "id": "no-image", "image": None},
             {**good, "id": "broken", "image": "broken.png"},
             {**good, "id": "no-question", "question": "  "},
             {**good, "id": "bad-gold", "answer": "x^2+1"}]
    path = tmp_path / "pool.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_bad_rows_are_reported_and_skipped(local_jsonl, base_model_dir, tmp_path, capsys):
    out = tmp_path / "bad"
    stats = run_main(small_args(base_model_dir, out, data=local_jsonl, num_samples=4))
    assert stats["pool"] == 11 and stats["answered"] == 6 and stats["skipped"] == 5
    skipped = {r["id"]: r["reason"] for r in dataset.read_jsonl(str(out / "skipped.jsonl"))}
    assert skipped == {"no-file": "missing image", "no-image": "missing image", "broken": "unreadable image",
                       "no-question": "empty question", "bad-gold": "gold is not a letter or a number"}
    printed = capsys.readouterr()
    for pid in skipped:
        assert pid in printed.out + printed.err
    assert stats["reflections"] == stats["selected"] > 0


def test_wrong_column_names_the_columns_found(local_jsonl, tmp_path):
    with pytest.raises(ValueError, match=r"--question_column 'prompt'.*'question'.*'answer'"):
        rd.main(rd.Args(data=local_jsonl, question_column="prompt", out_dir=str(tmp_path / "x")))
