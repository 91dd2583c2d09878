#!/usr/bin/env bash
# The GPU check of bench_gpu.py (see its docstring): 7B nf4 GRPO memory and step time, decode speed
# against the bandwidth floor. Run on a CUDA machine from the repository root: bash bench/gpu_check.sh
# Where the machine has no network, put the missing wheels in .whl/ (bitsandbytes 0.50.2,
# math-verify 0.9.0, latex2sympy2_extended, antlr4-python3-runtime); they are installed into /tmp/site,
# prints the GPU and versions, then runs bench_gpu.py; the whole check ends within ~7 minutes.
# Arguments are passed on to bench_gpu.py (a rerun on the same warm machine: --runs p1 --reuse_model).
# Everything printed goes to $OUT/log; bench_gpu.py also writes $OUT/results.json after each phase.
set -o pipefail
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
start=$(date +%s)
{
  if ls .whl/*.whl >/dev/null 2>&1; then  # a machine without network: wheels brought along
    timeout 120 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || { echo "gpu_check.sh: wheel install failed"; exit 1; }
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  timeout 60 python3 -c "
import sys, torch, transformers, accelerate, peft, bitsandbytes, math_verify, torchvision
print('python', sys.version.split()[0], '| torch', torch.__version__, '| transformers', transformers.__version__,
      '| accelerate', accelerate.__version__, '| peft', peft.__version__, '| bitsandbytes', bitsandbytes.__version__,
      '| torchvision', torchvision.__version__, '|', torch.cuda.get_device_name())"
  left=$((405 - ($(date +%s) - start)))  # seconds left of the ~7 minutes
  timeout -k 5 $((left - 5)) python3 bench/bench_gpu.py --budget_s $((left - 20)) --out "$OUT" "$@"
  rc=$?
  echo "gpu_check.sh: bench_gpu.py exit code $rc, $(($(date +%s) - start)) s in all"
  exit $rc
} 2>&1 | tee "$OUT/log"
