# `make demo`: set up and run the whole toy pipeline (base -> 01 -> 02 -> 03 -> 04) from scratch;
# `make test`: the test suite (what CI runs).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
OUT := runs/toy
# Tiny models run fastest single-threaded, and 1 thread never fights a second process for the cores.
export OMP_NUM_THREADS ?= 1

.PHONY: demo test clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements.txt
	touch $@

demo: $(VENV)/.installed
	rm -rf $(OUT) runs/demo
	$(PY) 00_base_model.py --out_dir $(OUT)/base
	$(PY) 01_reflect_data.py --model $(OUT)/base --out_dir $(OUT)/reflect
	$(PY) 02_sft.py --model $(OUT)/base --data $(OUT)/reflect/sft_reflect.jsonl --out_dir $(OUT)/sft --epochs 3 --eval_size 0
	$(PY) 02_sft.py --model $(OUT)/base --data $(OUT)/reflect/sft_cot.jsonl --out_dir $(OUT)/sft_cot --epochs 3 --eval_size 0
	$(PY) 03_grpo.py --model $(OUT)/sft --out_dir $(OUT)/srpo
	$(PY) 03_grpo.py --model $(OUT)/sft_cot --reward grpo --out_dir $(OUT)/grpo
	$(PY) 04_eval.py --out_dir runs/demo \
		--models base=$(OUT)/base@plain,sft=$(OUT)/sft,srpo=$(OUT)/srpo,grpo=$(OUT)/grpo@plain
	cp runs/demo/toy-test/comparison.json runs/demo/comparison.json
	cp runs/demo/toy-test/comparison.png runs/demo/comparison.png
	@echo "comparison: runs/demo/comparison.md .json .png"
	cp runs/demo/toy-test/comparison.md runs/demo/comparison.md

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

clean:
	rm -rf runs
