#!/usr/bin/env bash
# The vLLM rollout engine on one GPU, in about 8 minutes: installs the GPU extra (`vllm`, which brings its own
# torch), then (1) greedy parity torch vs vLLM and both engines' images/s at batch 16 and 64 on a random-init
# Janus-Pro-1B (bf16, 576 codes, CFG 5), (2) one CycleRL step of the shipped LoRA config with each engine (the
# dry run). JSON and a log go to OUT (default benchmarks/results/gpu_vllm).
#
#   bash benchmarks/gpu_check.sh [OUT]
set -u
out=${1:-benchmarks/results/gpu_vllm}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
log="$out/gpu_check.log"
: >"$log"
python=${PYTHON:-python3}
start=$SECONDS
if [[ -z ${SKIP_INSTALL:-} ]]; then
    "$python" -m pip install -q -e ".[vllm]" >>"$log" 2>&1
    echo "== install: exit $? after $((SECONDS - start)) s" | tee -a "$log"
fi
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$python" -c "import torch, transformers, vllm; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'vllm', vllm.__version__)"
} 2>&1 | tee -a "$log"

step() {  # name, time limit (s), command...
    local name=$1 limit=$2
    shift 2
    local t=$SECONDS
    timeout -k 10 "$limit" "$@" >>"$log" 2>&1
    echo "== $name: exit $? after $((SECONDS - t)) s" | tee -a "$log"
}

(cd benchmarks && step engines "${LIMIT_ENGINES:-240}" "$python" gpu_vllm_check.py --out "../$out/engines.json")
c=recipes/configs/cyclerl/janus_pro_1b_lora.yaml
g=$(awk '/^num_generations:/ {print $2}' $c)
for engine in torch vllm; do
    step "cyclerl_step_$engine" "${LIMIT_STEP:-100}" "$python" -m echogen_rl.cli dry-run --config $c --steps 1 \
        --batch-size "$g" --json "$out/cyclerl_step_$engine.json" -- --num_generations "$g" \
        --rollout_engine "$engine"
done
grep -E "^== " "$log"
