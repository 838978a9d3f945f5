#!/usr/bin/env bash
# There, in one device call: the GPU measurements bench/RESULTS.md waits for, each part bounded by its own time
# limit so one that runs long leaves the others their time. Prepare here first (bench/device/wheels.sh), then
#
#   run(command="bash bench/device/session.sh profile train", carry=[".whl"], timeout_s=600)
#   run(command="bash bench/device/session.sh generate sdxl", carry=[".whl"], timeout_s=600)
#
# Parts (minutes each on one H100 are estimates from the 2026-11-22 runs: 100-115 s per train_step command,
# most of it building the SD-1.5-sized model on the CPU):
#   profile   where an SD-1.5-sized LoRA step's time goes, Lightning loop, 512 px, bf16 (bench/profile_step.py), ~2
#   train     the LoRA step against the diffusers-example step, batch 1, with torch.compile ablated, ~2-3
#   generate  layout-retouch against plain generation, SD-1.5-sized, 512 px, 50 steps, fp16, ~2-3
#   sdxl      the SDXL LoRA config and Layout-and-Retouch config as shipped: steps/s, peak memory (the 24 GB
#             question), ~3-4
# What comes back ($OUT, at most 8 files): each part's markdown and JSON, RESULTS.md with the sections the benches
# write, and the log. DEVICE=cpu MODEL=tiny runs the same parts on the CPU with lrkit's tiny models (a dry run).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/device-out}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site:.whl/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__,
'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())" || exit 1
if [ "$DEVICE" = cuda ]; then SD=sd15 XL=sdxl; RES=512; STEPS=50; else SD=tiny XL=tiny-xl; RES=64; STEPS=4; fi
if [ "${MODEL:-}" = tiny ]; then SD=tiny XL=tiny-xl; RES=64; STEPS=4; fi
cp bench/RESULTS.md "$OUT/RESULTS.md"
status=0
part() {  # part NAME SECONDS COMMAND...: run it with its time limit, note how it ended
    local name=$1 limit=$2; shift 2
    echo "== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout --kill-after 10 "$limit" "$@"
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - start)) s"
    [ $rc -eq 0 ] || status=1
}
for name in "$@"; do
    case $name in
        profile)
            part profile 200 python3 bench/profile_step.py --device "$DEVICE" --model "$SD" \
                $([ "$SD" = tiny ] || echo --resolution "$RES") --config configs/train/lora.yaml --steps 5 --warmup 5 \
                --out /tmp/profile --markdown "$OUT/RESULTS.md"
            cp /tmp/profile/profile.md /tmp/profile/profile.json "$OUT/" 2>/dev/null ;;
        train)
            part train 300 python3 bench/train_step.py --device "$DEVICE" --model "$SD" --resolution "$RES" \
                --precision "$([ "$DEVICE" = cuda ] && echo bf16 || echo fp32)" --batch-size 1 --methods lora \
                --steps 5 --rounds 5 --warmup 2 --compile --out "$OUT/train_step.json" --markdown "$OUT/RESULTS.md" ;;
        generate)
            part generate 240 python3 bench/generate.py --device "$DEVICE" --model "$SD" --resolution "$RES" \
                --steps "$STEPS" --dtype "$([ "$DEVICE" = cuda ] && echo fp16 || echo fp32)" --repeats 3 \
                --out "$OUT/generate.json" --markdown "$OUT/RESULTS.md" ;;
        sdxl)
            part sdxl 300 python3 bench/user_paths.py --device "$DEVICE" --model "$XL" \
                --configs sdxl_lora.yaml layout_retouch_sdxl.yaml --steps 10 --warmup 3 --out /tmp/user_paths
            cp /tmp/user_paths/user_paths.md /tmp/user_paths/user_paths.json "$OUT/" 2>/dev/null ;;
        *) echo "unknown part $name (profile, train, generate, sdxl)"; status=1 ;;
    esac
done
exit $status
