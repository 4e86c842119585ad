#!/usr/bin/env bash
# The paper's experiments on the emulated testbed, then bench/results/REPORT.md (root; 35 min on 2 cores at stop 40).
# Each step writes JSON and a PNG into $RESULTS; `hiertrain bench report` alone rebuilds the report.
set -euo pipefail
cd "$(dirname "$0")/.."
H=.venv/bin/hiertrain
R=${RESULTS:-bench/results}
ALL=hiertrain,all-edge,all-cloud,jointdnn,jointdnn+,jalad,two-way,three-way
# the device's and the edge's interpreters emulated apart from their kernels (hiertrain/lab/emulation.py)
I=${INTERPRETER:-17.5:2.8}
# AlexNet skips the three-way validity schedule: it syncs four units' weights each iteration (~100 s/iteration)
$H bench testbed --model lenet5 --batch 32 --count 10 --points 1.5,2,3,4,5 --policies $ALL --interpreter-ratios $I --out "$R/testbed-lenet5.json" >/dev/null
$H bench testbed --model alexnet --batch 16 --count 4 --points 1.5,2,3,4,5 --policies ${ALL%,three-way} --interpreter-ratios $I --out "$R/testbed-alexnet.json" >/dev/null
# LeNet-5 runs all on the edge at 5 Mbit/s from the device; at 0.5 its optimum is all on the device
$H bench replan --from "$R/testbed-lenet5.json" --link device_edge --points 5,0.5 --count 8 --out "$R/replan-lenet5.json" >/dev/null
$H bench edgecores --from "$R/testbed-alexnet.json" --points 1.5,3.5 --count 4 --out "$R/edgecores-alexnet.json" >/dev/null
$H bench report --results "$R"
