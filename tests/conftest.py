"""Shared test fixtures: the repo root on sys.path, script loading, and one tiny toy model per session."""

import importlib.util
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(ROOT, "..", "shared", "data")
sys.path.insert(0, ROOT)
# Tiny models gain nothing from a second thread, and subprocess tests would fight over the 2 cores.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


def load_script(name):
    """Import a numbered script (e.g. '03_grpo') as a module; importing does no work beyond definitions."""
    path = os.path.join(ROOT, name if name.endswith(".py") else name + ".py")
    spec = importlib.util.spec_from_file_location(os.path.basename(name).replace(".py", ""), path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclass and parse_args look modules up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """An untrained tiny Qwen2.5-VL + toy processor saved with save_pretrained (a real checkpoint layout)."""
    from machinery import dataset
    import toy

    path = tmp_path_factory.mktemp("tiny") / "model"
    tok = toy.build_tokenizer(extra_texts=list(dataset.SYSTEM_PROMPTS.values()))
    proc = toy.ToyProcessor.build(tok)
    model = toy.build_tiny_model(tok, hidden=64, layers=2, seed=0)
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def base_model_dir(tmp_path_factory):
    """A briefly trained toy base model (00_base_model.py at a tiny budget): answers in format."""
    mod = load_script("00_base_model")
    out = tmp_path_factory.mktemp("base") / "base"
    mod.main(mod.Args(out_dir=str(out), steps=200, batch_size=16, lr=3e-3, train_size=800, eval_size=20, hidden=64, layers=2))
    return str(out)
