#!/usr/bin/env bash
# The GPU path, checked in one unattended run of at most about 8 minutes on one GPU:
#   bash benchmarks/gpu_check.sh [--out DIR] [--dry-run]
#
# 1. the test subset marked `gpu` (every method's bf16 and fp16 steps, NCCL, resume, fused attention)
# 2. the measured bf16 / fp16 matmul peak at ViT-B's shapes
# 3. ViT-B/16 MAE at batch 128: the trainer path in bf16 beside the original code's fp16-autocast
#    step with explicit softmax attention, with MFU against the measured peak; then with --compile
# 4. peak memory of ViT-B (batch 128) and ViT-L (batch 64) MAE steps, with and without
#    train.grad_checkpointing
# 5. in-context retrieval queries/s against 1M and 10M keys of 768 dims
# Each step has its own time limit; one that fails or runs out is recorded and the rest still run.
# Results: DIR/*.json (default benchmarks/gpu/), logs DIR/*.log, DIR/status.tsv, and
# DIR/summary.json with the table benchmarks/gpu_summary.py prints (the targets beside the figures).
# Installs nothing: run it inside the environment `bash run.sh` creates (or any with mimkit).
#
# --dry-run runs every step on the CPU at toy sizes in about a minute (the test suite does, so the
# script cannot rot); its figures mean nothing.
set -uo pipefail
cd "$(dirname "$0")/.."

out=benchmarks/gpu
dry=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --dry-run) dry=1; shift ;;
    *) echo "gpu_check.sh: unknown argument '$1'; valid: --out DIR, --dry-run" >&2; exit 2 ;;
  esac
done
PY="${PYTHON:-python}"
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
mkdir -p "$out"
status="$out/status.tsv"
printf 'step\texit\tseconds\n' > "$status"

if [ "$dry" = 1 ]; then
  export CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=1
  device=cpu
  tests=(-m gpu tests/gpu -q -p no:cacheprovider)
  peak=(--backbone vit_tiny_patch16 --img-size 32 --batch 2 --dtypes fp32 --device cpu --min-seconds 0.01)
  base=(--backbone vit_tiny_patch16 --img-size 32 --steps 1 --warmup 0 --precision fp32 --peak-gflops 1)
  sets=(method.decoder_dim=32 method.decoder_depth=1 method.decoder_heads=2)
  vitb=(--batch 2 --reference-precision fp32)
  vitl=(--batch 2)
  large=vit_tiny_patch16
  compile_flag=()   # inductor's CPU compile takes minutes; the dry run checks the plumbing only
  retrieval=(--device cpu --dim 16 --memory-sizes 1000 2000 --queries 64 --repeat 1)
  limit_scale=4
else
  device=cuda
  tests=(-m gpu tests/gpu -q -p no:cacheprovider -x)
  peak=(--backbone vit_base_patch16 --batch 128 --dtypes bf16 fp16 --device cuda)
  base=(--backbone vit_base_patch16 --steps 10 --warmup 3 --precision bf16)
  sets=()
  vitb=(--batch 128 --reference-attention naive --reference-precision fp16)
  vitl=(--batch 64)
  large=vit_large_patch16
  compile_flag=(--compile)
  retrieval=(--device cuda --dim 768 --memory-sizes 1000000 10000000 --key-dtype fp16)
  limit_scale=1
fi

run_step() {  # name, time limit (s), command...
  local name="$1" limit=$(( $2 * limit_scale )) start rc
  shift 2
  echo "== $name (limit ${limit}s)" >&2
  start=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - start ))" >> "$status"
  [ "$rc" = 0 ] || { echo "   $name exited $rc; last lines of $out/$name.log:" >&2; tail -5 "$out/$name.log" >&2; }
}

bench=("$PY" tools/benchmark.py)
mem_args=(--no-reference --steps 2 --warmup 1)
[ "$dry" = 1 ] && mem_args=(--no-reference --steps 1 --warmup 0)

run_step machine 30 "$PY" -c "
import json, platform, torch
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
info = {'gpu': gpu, 'cuda': torch.version.cuda, 'torch': torch.__version__, 'python': platform.python_version(),
        'dry_run': $dry, 'device': '$device'}
json.dump(info, open('$out/machine.json', 'w'), indent=1)
print(info)"
run_step tests 150 "$PY" -m pytest "${tests[@]}"
run_step peak 40 "${bench[@]}" peak "${peak[@]}" --no-progress --json "$out/peak.json"
# --set comes last in each command: it takes every KEY=VALUE up to the end
run_step step_vitb 90 "${bench[@]}" step "${base[@]}" --no-progress "${vitb[@]}" --json "$out/step_vitb.json" --set "${sets[@]}"
run_step step_vitb_compile 150 "${bench[@]}" step "${base[@]}" --no-progress "${vitb[@]}" --no-reference "${compile_flag[@]}" \
  --json "$out/step_vitb_compile.json" --set "${sets[@]}"
for ckpt in false true; do
  run_step "memory_vitb_ckpt_$ckpt" 45 "${bench[@]}" step "${base[@]}" --no-progress "${vitb[@]}" "${mem_args[@]}" \
    --json "$out/memory_vitb_ckpt_$ckpt.json" --set "${sets[@]}" "train.grad_checkpointing=$ckpt"
  run_step "memory_vitl_ckpt_$ckpt" 60 "${bench[@]}" step "${base[@]}" --no-progress --backbone "$large" "${vitl[@]}" \
    "${mem_args[@]}" --json "$out/memory_vitl_ckpt_$ckpt.json" --set "${sets[@]}" "train.grad_checkpointing=$ckpt"
done
run_step retrieval 60 "${bench[@]}" incontext "${retrieval[@]}" --no-progress --json "$out/retrieval.json"
"$PY" benchmarks/gpu_summary.py "$out"
