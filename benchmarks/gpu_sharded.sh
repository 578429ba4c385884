#!/usr/bin/env bash
# Each stage (PMTP, DJO, CycleRL) for 2 steps under each shipped accelerate config (ddp, zero2, zero3, fsdp) on the
# GPUs this machine has, on a tiny Janus checkpoint: does the launch path run, and what actually ran (distributed
# type, wrapper, FSDP2 shards or ZeRO stage, mixed precision). One JSON per run in OUT (default
# benchmarks/results/sharded_gpu) and a log; a DeepSpeed config is skipped, and says so, where deepspeed is absent.
# Each run has its own time limit (LIMIT, default 90 s), so 12 runs fit in 10 minutes on one GPU.
#
#   bash benchmarks/gpu_sharded.sh [OUT]          (CONFIGS="fsdp zero3" or STAGES="pmtp" run those alone)
set -u
out=${1:-benchmarks/results/sharded_gpu}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 ACCELERATE_LOG_LEVEL=warning
python=${PYTHON:-python3}
gpus=$("$python" -c "import torch; print(torch.cuda.device_count())")
log="$out/gpu_sharded.log"
: >"$log"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$python" -c "import torch, transformers, trl, accelerate; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'trl', trl.__version__, 'accelerate', accelerate.__version__)"
    "$python" -c "import deepspeed; print('deepspeed', deepspeed.__version__)" 2>&1 | tail -1
} 2>&1 | tee -a "$log"
checkpoint="$out/tiny-janus"
"$python" -m echogen_rl.cli init-tiny "$checkpoint" --overwrite >>"$log" 2>&1

for config in ${CONFIGS:-ddp zero2 zero3 fsdp}; do
    if [[ $config == zero* ]] && ! "$python" -c "import deepspeed" 2>/dev/null; then
        echo "{\"config\": \"$config\", \"skipped\": \"deepspeed is not installed\"}" >"$out/$config.skipped.json"
        echo "== $config: skipped, deepspeed is not installed" | tee -a "$log"
        continue
    fi
    for stage in ${STAGES:-pmtp djo cyclerl}; do
        start=$SECONDS
        timeout -k 10 "${LIMIT:-90}" "$python" -m accelerate.commands.launch \
            --config_file "recipes/accelerate_configs/$config.yaml" --num_processes "$gpus" \
            benchmarks/sharded_check.py --stage "$stage" --checkpoint "$checkpoint" \
            --out "$out/${stage}_$config.json" >>"$log" 2>&1
        echo "== ${stage} under $config ($gpus GPU): exit $? after $((SECONDS - start)) s" | tee -a "$log"
    done
done
rm -rf "$checkpoint"
