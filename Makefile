# `make demo`: set up and run the whole toy pipeline (base -> 01 -> 02 -> 03 -> 04) from scratch;
# `make test`: the test suite (what CI runs).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
OUT := runs/toy
# One thread per process: the paired stages below run two processes at once; a stage that runs
# alone gets all the cores (THREADS).
export OMP_NUM_THREADS ?= 1
THREADS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); echo $$(( n < 4 ? n : 4 )))
SFT_ARGS ?= --eval_size 0
RL_ARGS ?=

# $(call side_by_side,LOG,BACKGROUND COMMAND,FOREGROUND COMMAND): run both, the first into LOG;
# fail if either fails (showing LOG's tail when the background one did).
side_by_side = $(2) > $(1) 2>&1 & $(3); fg=$$?; wait $$!; bg=$$?; \
	[ $$bg -eq 0 ] || tail -n 20 $(1); [ $$fg -eq 0 ] && [ $$bg -eq 0 ]

.PHONY: demo test clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements.txt
	touch $@

# The two SFT runs, then the two RL runs, are independent: each pair runs side by side, one per
# core, with the baseline's progress in a log file so that the two progress bars don't interleave.
# Plain GRPO is three times faster per step than SRPO, so its core then evaluates the three models
# that are ready; the final 04 call resumes from their rows and only answers with SRPO.
comma := ,
EARLY_EVAL = $(PY) 04_eval.py --out_dir runs/demo --models base=$(OUT)/base@plain$(comma)sft=$(OUT)/sft$(comma)grpo=$(OUT)/grpo@plain
demo: $(VENV)/.installed
	rm -rf $(OUT) runs/demo runs/probe
	OMP_NUM_THREADS=$(THREADS) $(PY) 00_base_model.py --out_dir $(OUT)/base
	OMP_NUM_THREADS=$(THREADS) $(PY) 01_reflect_data.py --model $(OUT)/base --out_dir $(OUT)/reflect
	@echo "plain-CoT SFT for the GRPO baseline runs alongside; its log: $(OUT)/sft_cot.log"
	$(call side_by_side,$(OUT)/sft_cot.log,\
		$(PY) 02_sft.py --model $(OUT)/base --data $(OUT)/reflect/sft_cot.jsonl --out_dir $(OUT)/sft_cot $(SFT_ARGS),\
		$(PY) 02_sft.py --model $(OUT)/base --data $(OUT)/reflect/sft_reflect.jsonl --out_dir $(OUT)/sft $(SFT_ARGS))
	@echo "plain GRPO from the plain-CoT SFT model, then the evaluation of base, sft and grpo, run alongside; their log: $(OUT)/grpo.log"
	$(call side_by_side,$(OUT)/grpo.log,\
		( $(PY) 03_grpo.py --model $(OUT)/sft_cot --reward grpo --out_dir $(OUT)/grpo $(RL_ARGS) && $(EARLY_EVAL) ),\
		$(PY) 03_grpo.py --model $(OUT)/sft --out_dir $(OUT)/srpo $(RL_ARGS))
	OMP_NUM_THREADS=$(THREADS) $(PY) 04_eval.py --out_dir runs/demo \
		--models base=$(OUT)/base@plain,sft=$(OUT)/sft,srpo=$(OUT)/srpo,grpo=$(OUT)/grpo@plain
	cp runs/demo/toy-test/comparison.json runs/demo/comparison.json
	cp runs/demo/toy-test/comparison.png runs/demo/comparison.png
	cp runs/demo/toy-test/comparison.md runs/demo/comparison.md
	@echo "comparison: runs/demo/comparison.md .json .png"

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

clean:
	rm -rf runs
