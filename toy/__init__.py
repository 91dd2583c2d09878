"""The embedded toy world: what every script runs on by default, offline, on a CPU.

* `toy/world.py` - the visual math problems (images, questions, gold answers, solutions) and the toy's
  teacher (`oracle_reflection`, the stand-in for o4-mini).
* `toy/model.py` - the tokenizer trained here, `ToyProcessor` (Qwen2.5-VL's processor's tensors) and the
  tiny Qwen2.5-VL (`build_tiny_model`).
* `toy/families.py` - the same tiny model and processor for Qwen3-VL and Qwen3.5 (`TOY_FAMILIES`), for the
  tests and benchmarks of those families.
* `toy/base_model/` - the shipped base model: the tiny Qwen2.5-VL trained by 00_base_model.py, the toy's
  stand-in for downloading Qwen2.5-VL-7B-Instruct.

The toy imports nothing of the project. `import toy` gives the names below from world.py and model.py.
"""

from toy.model import ToyProcessor, build_tiny_model, build_tokenizer
from toy.world import (BASE_SEED_OFFSET, CELL, COLOURS, DOTS_FAMILIES, FAMILIES, IMAGE_SIZE, MAX_ADDEND, MAX_DOTS,
                       MAX_MULTIPLIER, STEP_CUE, TASKS, TEST_SEED_OFFSET, answer_from_reads, check_steps, check_task,
                       cot_response, count_blobs, is_two_step, make_problem, oracle_reflection, problem_from_id,
                       single_step_problem, solution_text, toy_dataset)
