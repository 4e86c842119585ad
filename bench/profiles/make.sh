#!/usr/bin/env bash
# Profiles for the planner benchmark: cloud = all cores, edge = one core (the paper's NUC core),
# device = one core at a 0.15-core CPU quota (a Raspberry Pi 3 is roughly 7x slower than one NUC core).
set -euo pipefail
cd "$(dirname "$0")/../.."
for m in lenet5 alexnet vgg16 vgg19 googlenet resnet34; do
  b=8; [ "$m" = lenet5 ] && b=32
  .venv/bin/hiertrain profile --model $m --batch $b --repeat 3 --warmup 1 --tier cloud --out bench/profiles/$m.json
  .venv/bin/hiertrain profile --model $m --batch $b --repeat 3 --warmup 1 --tier edge --threads 1 --merge --out bench/profiles/$m.json
  .venv/bin/hiertrain profile --model $m --batch $b --repeat 3 --warmup 1 --tier device --threads 1 --cpu-quota 0.15 --merge --out bench/profiles/$m.json
done
