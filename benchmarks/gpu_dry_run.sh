#!/usr/bin/env bash
# The dry run of every shipped GPU config on one GPU, at each config's own per-device batch (CycleRL: its group
# size too), 2 optimizer steps each: random-init Janus-Pro-1B, synthetic data, the config's precision, gradient
# checkpointing and rollout compilation. Writes one JSON report per config and a log into OUT (default
# benchmarks/results/dry_run_gpu). Each run has its own time limit, so one slow config cannot hide the others.
# Last, the paper's benchmarks on 16 layouts at the real architecture (benchmarks/paper_eval_check.py).
#
#   bash benchmarks/gpu_dry_run.sh [OUT]          (ONLY="name ..." runs those reports' configs alone)
set -u
out=${1:-benchmarks/results/dry_run_gpu}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
log="$out/gpu_dry_run.log"
: >"$log"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$python" -c "import torch, transformers, trl, peft, accelerate, datasets; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'trl', trl.__version__, 'peft', peft.__version__, \
'accelerate', accelerate.__version__, 'datasets', datasets.__version__)"
} 2>&1 | tee -a "$log"

run() {  # name, time limit (s), config, extra fields
    local name=$1 limit=$2 config=$3
    shift 3
    [[ -z ${ONLY:-} || " $ONLY " == *" $name "* ]] || return 0
    local start=$SECONDS
    timeout -k 10 "$limit" "$python" -m echogen_rl.cli dry-run --config "$config" --steps 2 \
        --batch-size "$(awk '/^per_device_train_batch_size:/ {print $2}' "$config")" \
        --json "$out/$name.json" -- "$@" >>"$log" 2>&1
    echo "== $name: exit $? after $((SECONDS - start)) s" | tee -a "$log"
}

c=recipes/configs
run pmtp_janus_pro_1b_coco "${LIMIT_PMTP:-80}" $c/pmtp/janus_pro_1b_coco.yaml
run djo_janus_pro_1b "${LIMIT_DJO:-80}" $c/djo/janus_pro_1b.yaml
run cyclerl_janus_pro_1b_lora "${LIMIT_CYCLERL:-120}" $c/cyclerl/janus_pro_1b_lora.yaml \
    --num_generations "$(awk '/^num_generations:/ {print $2}' $c/cyclerl/janus_pro_1b_lora.yaml)"
run cyclerl_janus_pro_1b_full "${LIMIT_CYCLERL:-120}" $c/cyclerl/janus_pro_1b_full.yaml \
    --num_generations "$(awk '/^num_generations:/ {print $2}' $c/cyclerl/janus_pro_1b_full.yaml)"
run pmtp_janus_pro_1b_layoutsam "${LIMIT_PMTP:-80}" $c/pmtp/janus_pro_1b_layoutsam.yaml
# Every `echogen-rl eval --benchmark` path on 16 layouts at the real architecture (random init), on this GPU.
if [[ -z ${ONLY:-} || " $ONLY " == *" paper_eval "* ]]; then
    start=$SECONDS
    (cd benchmarks && timeout -k 10 "${LIMIT_EVAL:-240}" "$python" paper_eval_check.py --device cuda --num 16 \
        --out "../$out/paper_eval.json") >>"$log" 2>&1
    echo "== paper_eval: exit $? after $((SECONDS - start)) s" | tee -a "$log"
fi
grep -E "^(== |  (step|peak|estimate|GPU))" "$log" || true
