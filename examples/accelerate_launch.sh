#!/usr/bin/env bash
# The monitor under accelerate: the same script and monitor config from one CPU process to
# several GPUs. Pick the config file; see integrations/accelerate/README.md for the silent
# fallbacks (no config file starts ONE process; on a CPU pass --use_cpu true).
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG="${CONFIG:-integrations/accelerate/ddp_cpu.yaml}"   # ddp.yaml, fsdp.yaml, deepspeed_zero2.yaml ...
EXTRA=()
if ! nvidia-smi -L >/dev/null 2>&1; then EXTRA+=(--use_cpu true); fi
exec .venv/bin/accelerate launch --config_file "$CONFIG" examples/trainer_script.py \
  --output_dir runs/accelerate --max_steps "${MAX_STEPS:-20}" --per_device_train_batch_size 4 \
  --learning_rate 2e-3 --report_to tensorboard --save_strategy no "${EXTRA[@]}" "$@"
