"""Bad input fails at once, before any model loads, in one line naming the flag, file or line, with exit
status 2 (cli.run); the stages' --help says how to resume."""

import os
import subprocess
import sys

import pytest

from conftest import ROOT


def _run(*argv):
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def _one_line_error(res):
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in res.stderr, res.stderr
    return lines[0]


@pytest.mark.parametrize("flag, value", [("reward", "bogus"), ("loss_agg", "bogus"), ("rollout", "vllm"),
                                         ("save_dtype", "int8"), ("group_size", "1")])
def test_grpo_bad_flag_values_fail_before_loading_a_model(tmp_path, flag, value):
    # --model points nowhere: a model load would fail differently, so the error must come first
    res = _run("03_grpo.py", f"--{flag}", value, "--model", str(tmp_path / "no-model"),
               "--out_dir", str(tmp_path))
    assert f"--{flag}" in _one_line_error(res)


def test_malformed_jsonl_names_the_file_and_line_in_01_and_03(tmp_path):
    data = tmp_path / "pool.jsonl"
    data.write_text('{"question": "q", "answer": "1", "image": ""}\n{"question": "q2", "answer": \n')
    for script in ("01_reflect_data.py", "03_grpo.py"):
        res = _run(script, "--data", str(data), "--model", str(tmp_path / "no-model"),
                   "--out_dir", str(tmp_path / script))
        assert f"{data}: line 2 is not valid JSON" in _one_line_error(res), script


def test_sft_missing_data_file_is_one_line(tmp_path):
    res = _run("02_sft.py", "--data", str(tmp_path / "nothing.jsonl"), "--out_dir", str(tmp_path / "sft"))
    assert "nothing.jsonl" in _one_line_error(res)


@pytest.mark.parametrize("script", ["01_reflect_data.py", "02_sft.py", "03_grpo.py", "04_eval.py"])
def test_help_says_how_to_resume(script):
    res = _run(script, "--help")
    assert res.returncode == 0 and "resume" in res.stdout.lower().split("options:")[0], res.stdout[:500]


def test_report_to_a_tracker_that_is_not_installed_fails_at_once(tmp_path):
    import importlib.util

    if importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed here")
    res = _run("03_grpo.py", "--report_to", "tensorboard", "--out_dir", str(tmp_path))
    assert "pip install tensorboard" in _one_line_error(res)
