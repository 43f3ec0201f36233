#!/usr/bin/env bash
# The GPU figures of bench/ in one go, for a CUDA machine with torch, transformers, peft,
# safetensors, numpy, tqdm and pytest (nothing here imports DVC or FAISS; stage-tests and
# merge-tests import pydantic). Each step
# has a time limit of its own, so one that runs long leaves the others their turn; each logs to
# $OUT/<step>.txt (default bench-out/).
#
#   bash bench/device.sh                       # every step at 7B shapes (time limits: 15 min in all)
#   bash bench/device.sh merge-tests merge     # some of the steps (7 min of limits), and
#   bash bench/device.sh dora-tests dora adapter embed search   # the others (8 min)
#   bash bench/device.sh stage-tests           # the adapter, embed and search stages on "cuda" (2 min)
#   bash bench/device.sh --tiny                # tiny shapes: a smoke run, on a CPU too
#
# Steps: merge-tests (the merge invariants with READAPTIR_DEVICE=cuda), merge (Llama-2-7B shape,
# ~27 GB of inputs written under a temporary folder; merged on the GPU, where there is one), dora-tests
# (the DoRA forward against PEFT's, on the CPU and the GPU), dora, adapter, embed, search, and
# stage-tests (tests/test_gpu.py: the adapter, embed and search stages on the GPU against the CPU).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}
tiny=()
seven_b=(--hidden 4096 --layers 32 --heads 32 --intermediate 11008 --vocab 32000)
if [[ "${1:-}" == "--tiny" ]]; then
  tiny=(--tiny)
  seven_b=()
  shift
fi
steps=("$@")
[[ ${#steps[@]} -eq 0 ]] && steps=(merge-tests merge dora-tests dora adapter embed search)
device=cpu
$py -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" && device=cuda
# the merge's inputs and output (~40 GB at 7B shape) go to the first of these folders with room,
# else to the one with the most
need_gb=45
[[ ${#tiny[@]} -gt 0 ]] && need_gb=1
roomiest= most=-1
for dir in "${TMPDIR:-/tmp}" "$PWD" /dev/shm; do
  free=$(df -P -BG "$dir" 2>/dev/null | awk 'NR == 2 { sub("G", "", $4); print $4 }')
  [[ -n $free && -w $dir ]] || continue
  if (( free >= need_gb )); then roomiest=$dir; break; fi
  (( free > most )) && roomiest=$dir most=$free
done
scratch=$(mktemp -d -p "${roomiest:-/tmp}")
trap 'rm -rf "$scratch"' EXIT

step() {  # step NAME SECONDS COMMAND...: run it, log it, go on whatever its exit
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit} s): $*" | tee "$out/$name.txt"
  local start=$SECONDS
  # progress bars redraw with \r: keep their last state only
  # line by line all the way, so that a run cut short by an outer limit still has its log
  timeout "$limit" "$@" 2>&1 | stdbuf -oL tr '\r' '\n' | grep --line-buffered -v -E '[0-9]%\|' \
    | tee -a "$out/$name.txt"
  echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s" | tee -a "$out/$name.txt"
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
  $py -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', \
torch.version.cuda, 'transformers', transformers.__version__, 'peft', peft.__version__)"
  echo "device: $device; steps: ${steps[*]}"
  echo "scratch: $scratch ($(df -P -h "$scratch" | awk 'NR == 2 { print $4 " free of " $2 }'))"
  grep -E '^(VmHWM|VmRSS)' /proc/self/status || echo "no VmHWM: peak RSS from ru_maxrss"
} 2>&1 | tee "$out/machine.txt"

for name in "${steps[@]}"; do
  case $name in
    merge-tests)
      step merge-tests 120 env READAPTIR_DEVICE=$device $py -m pytest -q -p no:cacheprovider \
        tests/test_merge.py tests/test_weights.py -k "not minilm" ;;
    merge)  # where the merge stage runs by default: on the GPU if there is one
      mkdir -p "$scratch/merge"
      step merge 300 $py bench/merge.py "${tiny[@]}" "${seven_b[@]}" --device $device \
        --repeat 2 --dir "$scratch/merge"
      rm -rf "$scratch/merge" ;;
    dora-tests) step dora-tests 60 $py -m pytest -q -p no:cacheprovider tests/test_dora.py ;;
    stage-tests) step stage-tests 120 $py -m pytest -q -p no:cacheprovider tests/test_gpu.py ;;
    dora) step dora 60 $py bench/dora.py "${tiny[@]}" ;;
    adapter) step adapter 240 $py bench/adapter.py "${tiny[@]}" ;;
    embed) step embed 120 $py bench/embed.py "${tiny[@]}" ;;
    search) step search 60 $py bench/search.py "${tiny[@]}" ;;
    *) echo "unknown step $name (merge-tests, merge, dora-tests, dora, adapter, embed, search," \
         "stage-tests)" >&2; exit 2 ;;
  esac
done
