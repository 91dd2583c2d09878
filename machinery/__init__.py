"""The machinery the numbered stages share; the paper's concepts live in the stages and in rewards.py.

Imports run one way: the stages (00-04), rewards.py and report.py import from here; this package imports
nothing from the root but the toy world (`toy/`), and the toy imports nothing of the project.

* `cli.py`        - flags from dataclasses, and `UserError` (a one-line error, exit status 2)
* `dataset.py`    - prompts and answer layouts, SFT encoding, RL prompts, batches, images, JSONL
* `policy.py`     - loading and saving the model and processor (dtype, nf4, LoRA)
* `rollout.py`    - generation: HF `generate` and the fast path (static KV cache)
* `training.py`   - what 02 and 03 share: accelerator, optimizer, schedule, checkpoints, memory estimate
* `grading.py`    - parsing a response's blocks and grading an answer (math-verify)
* `scoring.py`    - 04's scoring of a response, summaries, and the headroom gauge
* `benchmarks.py` - the benchmarks' loaders and their official scorers, ported
* `llm_client.py` - one OpenAI-compatible client for 01's teacher and 04's judge
"""
