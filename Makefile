# `make demo`: set up and run the toy pipeline (01 -> 02 -> 03 -> 04 -> report) from the shipped base
# model; `make test`: the test suite (what CI runs); `make base`: rebuild the shipped base model (00);
# `make demo-dots`: the contrast, the dots task, from its own base model; `make seeds`: the demo and the
# headroom gauge on seeds 0, 1 and 2, and the tables across them; `make ablations`: the paper's ablation
# rows (and five of ours) on one seed; `make grade`: grade the student track (student/core.py; REF=1: the project's own).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SEED ?= 0
BASE ?= toy/base_model
OUT ?= runs/toy
DEMO ?= runs/demo
# One thread per process: the paired stages below run two processes at once; a stage that runs
# alone gets up to four cores (THREADS; 01 keeps its own --threads).
export OMP_NUM_THREADS ?= 1
THREADS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); echo $$(( n < 4 ? n : 4 )))
SFT_ARGS ?= --eval_size 0
RL_ARGS ?=

# $(call side_by_side,LOG,BACKGROUND COMMAND,FOREGROUND COMMAND): run both, the first into LOG;
# fail if either fails (showing LOG's tail when the background one did).
side_by_side = $(2) > $(1) 2>&1 & $(3); fg=$$?; wait $$!; bg=$$?; \
	[ $$bg -eq 0 ] || tail -n 20 $(1); [ $$fg -eq 0 ] && [ $$bg -eq 0 ]

.PHONY: demo demo-dots base seeds ablations exercise answers test clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements.txt
	touch $@

comma := ,
# The recipe's one departure from the paper's data (chosen on a dev seed: docs/notebook.md): beside the
# 1,200 reflective rows, 01 adds 1,200 rows of the policy's own right answers without a reflection (from
# a pool of 3,600), so that SFT teaches the habit without making it automatic and RL has a choice to
# reward: reflect, and the answer improves.
REFLECT_ARGS ?= --pool_size 3600 --direct_rows 1200
# The comparison: the base model (plain chain of thought), reflection SFT, SRPO, and the paper's baseline
# trained from the same base on the same problems for the same RL steps: plain-CoT SFT + plain GRPO
# (`grpo`, the logic of the paper's Table 3). `make ablations` adds the rest.
MODELS = base=$(BASE)@plain,sft=$(OUT)/sft,srpo=$(OUT)/srpo,grpo=$(OUT)/grpo@plain
EVAL = $(PY) 04_eval.py --benchmark toy --seed $(SEED) --out_dir $(DEMO)
# The two SFT runs, then the two RL runs, are independent: SRPO (the slowest) runs on one core, the
# baseline on the other, with its progress in a log file so that the progress bars don't interleave;
# that core then evaluates the three models that are ready, and the final 04 call resumes from their
# rows and only answers with SRPO.
demo: $(VENV)/.installed
	rm -rf $(OUT) $(DEMO)
	OMP_NUM_THREADS=$(THREADS) $(PY) 01_reflect_data.py --model $(BASE) --seed $(SEED) --out_dir $(OUT)/reflect $(REFLECT_ARGS)
	@echo "the baseline's SFT runs alongside; its log: $(OUT)/sft_cot.log"
	$(call side_by_side,$(OUT)/sft_cot.log,\
		$(PY) 02_sft.py --model $(BASE) --data $(OUT)/reflect/sft_cot.jsonl --out_dir $(OUT)/sft_cot --seed $(SEED) $(SFT_ARGS),\
		$(PY) 02_sft.py --model $(BASE) --data $(OUT)/reflect/sft_reflect.jsonl --out_dir $(OUT)/sft --seed $(SEED) $(SFT_ARGS))
	@echo "plain GRPO, then the evaluation of three models, run alongside; their log: $(OUT)/baselines.log"
	$(call side_by_side,$(OUT)/baselines.log,\
		( $(PY) 03_grpo.py --model $(OUT)/sft_cot --reward grpo --out_dir $(OUT)/grpo --seed $(SEED) $(RL_ARGS) && \
		  $(EVAL) --models base=$(BASE)@plain$(comma)sft=$(OUT)/sft$(comma)grpo=$(OUT)/grpo@plain ),\
		$(PY) 03_grpo.py --model $(OUT)/sft --out_dir $(OUT)/srpo --seed $(SEED) $(RL_ARGS))
	OMP_NUM_THREADS=$(THREADS) $(EVAL) --models $(MODELS)
	cp $(DEMO)/toy-test/comparison.json $(DEMO)/toy-test/comparison.png $(DEMO)/toy-test/comparison.md $(DEMO)/
	$(PY) report.py --demo_dir $(DEMO) --runs_dir $(OUT)
	@echo "comparison: $(DEMO)/comparison.md .json .png; one page: $(DEMO)/report.html"

# The shipped base model (the toy's stand-in for downloading Qwen2.5-VL-7B-Instruct), ~7 minutes
# (toy/base_model/eval.json: 367 s of training on 2 CPU cores, then the gate).
base: $(VENV)/.installed
	OMP_NUM_THREADS=$(THREADS) $(PY) 00_base_model.py --out_dir $(BASE)

# The demo on three seeds (each changes every stage's seed and draws a different test set), each with the
# headroom gauge (16 samples on each of 500 test problems) of the base, reflection-SFT and SRPO models,
# then the tables across them with paired 95% intervals. About 11 minutes a seed on 2 cores.
seeds: $(VENV)/.installed
	for s in 0 1 2; do $(MAKE) demo SEED=$$s OUT=runs/toy-seed$$s DEMO=runs/demo-seed$$s && \
		OMP_NUM_THREADS=$(THREADS) $(PY) 04_eval.py --benchmark toy --seed $$s --out_dir runs/gauge-seed$$s --samples 16 --limit 500 \
			--models base=$(BASE)@plain,sft=runs/toy-seed$$s/sft,srpo=runs/toy-seed$$s/srpo || exit 1; done
	$(PY) report.py --seeds runs/demo-seed0,runs/demo-seed1,runs/demo-seed2
	$(PY) report.py --seeds runs/gauge-seed0,runs/gauge-seed1,runs/gauge-seed2 --pairs srpo-sft,sft-base

# The paper's 7B ablation rows on the toy, on one seed, from the demo's base model, data and models (in
# $(OUT), made by `make demo` with the same SEED first if they are missing), the new runs two at a time
# (28 minutes on 2 cores): SRPO; without reflection SFT (SRPO's RL from the base); without
# reflection RL (SFT alone); without f_len; without I_eff; plain-CoT SFT + GRPO; plain GRPO from the base;
# and ours: without I_ref, without R_accuracy, the authors' released reward, reflection SFT + RL on the
# final answer alone, and the check procedure as the first attempt + plain GRPO (`scratchpad`: the
# same serial computation without a reflection). The table beside the paper's figures:
# $(ABL)/eval/ablations.md (`report.py --ablations_dir` puts it on a report page).
ABL ?= runs/ablations
RL = $(PY) 03_grpo.py --seed $(SEED) $(RL_ARGS)
ablations: $(VENV)/.installed
	[ -f $(OUT)/srpo/model.safetensors ] && [ -f $(OUT)/grpo/model.safetensors ] || $(MAKE) demo SEED=$(SEED) OUT=$(OUT) DEMO=$(DEMO)
	$(PY) -c "import json,sys; s=json.load(open('$(OUT)/reflect/stats.json'))['args']['seed']; \
		sys.exit(0 if s == $(SEED) else f'$(OUT) holds seed {s}, not SEED=$(SEED): make demo SEED=$(SEED) first')"
	rm -rf $(ABL) && mkdir -p $(ABL)
	@echo "the ablation runs, two at a time; the second lane's log: $(ABL)/lane2.log"
	$(call side_by_side,$(ABL)/lane2.log,\
		( $(RL) --model $(BASE) --out_dir $(ABL)/no_sft && \
		  $(RL) --model $(OUT)/sft --out_dir $(ABL)/no_ieff --no-use_effectiveness && \
		  $(RL) --model $(OUT)/sft --out_dir $(ABL)/no_acc --no-use_accuracy && \
		  $(RL) --model $(OUT)/sft --out_dir $(ABL)/sft_grpo --reward final && \
		  $(RL) --model $(BASE) --out_dir $(ABL)/base_grpo --reward grpo ),\
		$(PY) 02_sft.py --model $(BASE) --data $(OUT)/reflect/sft_scratchpad.jsonl --out_dir $(ABL)/sft_scratchpad --seed $(SEED) $(SFT_ARGS) && \
		$(RL) --model $(ABL)/sft_scratchpad --out_dir $(ABL)/scratchpad --reward grpo && \
		$(RL) --model $(OUT)/sft --out_dir $(ABL)/no_flen --no-use_length && \
		$(RL) --model $(OUT)/sft --out_dir $(ABL)/no_iref --no-use_reflection_format && \
		$(RL) --model $(OUT)/sft --out_dir $(ABL)/released --reward released)
	OMP_NUM_THREADS=$(THREADS) $(PY) 04_eval.py --benchmark toy --seed $(SEED) --out_dir $(ABL)/eval --models \
		base=$(BASE)@plain,sft=$(OUT)/sft,srpo=$(OUT)/srpo,grpo=$(OUT)/grpo@plain,no_sft=$(ABL)/no_sft,no_flen=$(ABL)/no_flen,no_ieff=$(ABL)/no_ieff,no_iref=$(ABL)/no_iref,no_acc=$(ABL)/no_acc,released=$(ABL)/released,sft_grpo=$(ABL)/sft_grpo,base_grpo=$(ABL)/base_grpo@plain,scratchpad=$(ABL)/scratchpad@plain
	$(PY) report.py --ablations $(ABL)/eval

# The contrast: the dots task, where a second look at the image is the same glance as the first, with
# the settings its RESULTS.md figures were measured with (600 SFT rows; RL 40 steps of 8 prompts at lr 1e-4).
DOTS_RL := --steps 40 --prompts_per_step 8 --lr 1e-4
DOTS := runs/toy-dots
DOTS_DEMO := runs/demo-dots
demo-dots: $(VENV)/.installed
	rm -rf $(DOTS) $(DOTS_DEMO)
	OMP_NUM_THREADS=$(THREADS) $(PY) 00_base_model.py --data toy-dots --out_dir $(DOTS)/base
	OMP_NUM_THREADS=$(THREADS) $(PY) 01_reflect_data.py --data toy-dots --model $(DOTS)/base --out_dir $(DOTS)/reflect \
		--pool_size 1200 --num_samples 600
	$(call side_by_side,$(DOTS)/sft_cot.log,\
		$(PY) 02_sft.py --model $(DOTS)/base --data $(DOTS)/reflect/sft_cot.jsonl --out_dir $(DOTS)/sft_cot $(SFT_ARGS),\
		$(PY) 02_sft.py --model $(DOTS)/base --data $(DOTS)/reflect/sft_reflect.jsonl --out_dir $(DOTS)/sft $(SFT_ARGS))
	$(call side_by_side,$(DOTS)/grpo.log,\
		$(PY) 03_grpo.py --data toy-dots --model $(DOTS)/sft_cot --reward grpo --out_dir $(DOTS)/grpo $(DOTS_RL) $(RL_ARGS),\
		$(PY) 03_grpo.py --data toy-dots --model $(DOTS)/sft --out_dir $(DOTS)/srpo $(DOTS_RL) $(RL_ARGS))
	OMP_NUM_THREADS=$(THREADS) $(PY) 04_eval.py --benchmark toy-dots --out_dir $(DOTS_DEMO) \
		--models base=$(DOTS)/base@plain,sft=$(DOTS)/sft,srpo=$(DOTS)/srpo,grpo=$(DOTS)/grpo@plain
	@echo "comparison: $(DOTS_DEMO)/toy-dots-test/comparison.md"

# The classroom exercises (EXERCISES.md): `make exercise N=<n>` runs exercise n into $(EX)/ex<n>, which
# `make demo` and `make ablations` never delete, from the demo's models in $(OUT) (made first if missing),
# and compares its model with the reference (stage 1: the demo's reflection SFT; stage 2: its SRPO) on 500
# test problems: $(EX)/ex<n>/eval/toy-test/comparison.md. 02 and 03 run at one thread, as the demo's do.
EX ?= runs/exercises
DEMO_FIRST = [ -f $(OUT)/srpo/model.safetensors ] || $(MAKE) demo SEED=$(SEED) OUT=$(OUT) DEMO=$(DEMO)
X = $(EX)/ex$(N)
SFT_X = $(PY) 02_sft.py --model $(BASE) --seed $(SEED) --out_dir $(X)/model $(SFT_ARGS)
RL_X = $(PY) 03_grpo.py --model $(OUT)/sft --seed $(SEED) --out_dir $(X)/model $(RL_ARGS)
REFLECT_X = OMP_NUM_THREADS=$(THREADS) $(PY) 01_reflect_data.py --model $(BASE) --seed $(SEED) --out_dir $(X)/reflect
EXERCISE_1 = $(REFLECT_X) $(REFLECT_ARGS) --correct_fraction 0.7 && $(SFT_X) --data $(X)/reflect/sft_reflect.jsonl
EXERCISE_2 = $(REFLECT_X) && $(SFT_X) --data $(X)/reflect/sft_reflect.jsonl
EXERCISE_3 = $(REFLECT_X) $(REFLECT_ARGS) --no-oracle_reread && $(SFT_X) --data $(X)/reflect/sft_reflect.jsonl
EXERCISE_4 = $(SFT_X) --data $(OUT)/reflect/sft_reflect.jsonl --epochs 1
EXERCISE_5 = $(SFT_X) --data $(OUT)/reflect/sft_reflect.jsonl --no-train_first_attempt
EXERCISE_6 = $(RL_X) --alpha 0
EXERCISE_7 = $(RL_X) --no-use_effectiveness
EXERCISE_8 = $(RL_X) --reward released
EXERCISE_9 = $(RL_X) --kl_coef 0.1
EXERCISE_10 = $(RL_X) --group_size 2 --prompts_per_step 128
EXERCISE_11 = $(RL_X) --filter none
EXERCISE_12 = $(RL_X) --updates_per_rollout 4
EXERCISE_13 = $(RL_X) --loss_agg seq-mean-token-mean
EXERCISE_14 = $(RL_X) --verdict_reward 0.25
EXERCISE_REF = $(if $(filter $(N),1 2 3 4 5),$(OUT)/sft,$(OUT)/srpo)
exercise: $(VENV)/.installed
	@case "$(N)" in [0-9]|1[0-8]) ;; *) echo "make exercise N=<0-18> (EXERCISES.md)"; exit 2;; esac
	$(DEMO_FIRST)
	rm -rf $(X) && mkdir -p $(X) && date +%s > $(X)/started && (git describe --always --dirty > $(X)/commit 2>/dev/null || true)
ifeq ($(N),0)
	@echo "exercise 0 is reading: README.md's paper-to-code table, then 03_grpo.py:group_advantages"
else ifeq ($(N),15)
	OMP_NUM_THREADS=$(THREADS) $(PY) 04_eval.py --benchmark toy --seed $(SEED) --models sft=$(OUT)/sft --samples 16 --limit 500 --out_dir $(X)
else ifeq ($(N),16)
	cat $(DEMO)/comparison.md
else ifeq ($(N),17)
	[ -f $(DOTS)/srpo/model.safetensors ] || $(MAKE) demo-dots
	OMP_NUM_THREADS=$(THREADS) $(PY) probe/probe_confidence.py --model $(DOTS)/base --out $(X)/base.json
	OMP_NUM_THREADS=$(THREADS) $(PY) probe/probe_confidence.py --model $(DOTS)/sft --prompt reflect --out $(X)/sft.json
else ifeq ($(N),18)
	cat $(DEMO)/comparison.md $(DOTS_DEMO)/toy-dots-test/comparison.md toy/base_model/eval.json
else
	$(EXERCISE_$(N))
	OMP_NUM_THREADS=$(THREADS) $(PY) 04_eval.py --benchmark toy --seed $(SEED) --limit 500 --out_dir $(X)/eval \
		--models reference=$(EXERCISE_REF),ex$(N)=$(X)/model
endif
	@echo $$(( $$(date +%s) - $$(cat $(X)/started) )) > $(X)/seconds.txt

# The teacher's answer key, docs/answers.md: every exercise that trains or measures (1-15) run as above, two
# at a time on one thread each, then 17 (which makes the dots task's models first), then the key from their
# outputs and the demo's; its time, besides the demo's, is written into the key.
answers: $(VENV)/.installed
	$(DEMO_FIRST)
	mkdir -p $(EX) && date +%s > $(EX)/answers_started
	$(call side_by_side,$(EX)/lane2.log,\
		for n in 2 4 6 8 10 12 14; do $(MAKE) exercise N=$$n THREADS=1 || exit 1; done,\
		for n in 1 3 5 7 9 11 13 15; do $(MAKE) exercise N=$$n THREADS=1 || exit 1; done)
	$(MAKE) exercise N=17
	echo $$(( $$(date +%s) - $$(cat $(EX)/answers_started) )) > $(EX)/answers_seconds.txt
	$(PY) report.py --answers $(EX) --answers_out docs/answers.md --demo_dir $(DEMO) --runs_dir $(OUT) \
		--dots_demo_dir $(DOTS_DEMO)

# DeepSpeed, for the ZeRO-2/3 tests only (tests/test_sharded.py): not in requirements.txt, since the toy
# never needs it. DS_BUILD_OPS=0: nothing is compiled at install time (on a CPU the first run compiles
# one small op, ~1 min, cached).
$(VENV)/.deepspeed: $(VENV)/.installed
	DS_BUILD_OPS=0 $(VENV)/bin/pip install --quiet deepspeed==0.19.8
	touch $@

test: $(VENV)/.installed $(VENV)/.deepspeed
	$(PY) -m pytest -q tests

# The student track (student/README.md): `make grade` grades student/core.py (the paper's core, written by the
# student) with student/test_grade.py; `make grade REF=1` grades the project's own functions with the same tests,
# `make grade MISTAKE=name` one of student/mistakes.py's catalogued mistakes. About 10 s.
.PHONY: grade
grade: $(VENV)/.installed
	STUDENT_REF=$(REF) STUDENT_MISTAKE=$(MISTAKE) $(PY) -m pytest -q student

clean:
	rm -rf runs
