#!/usr/bin/env bash
# bench families on scikit-learn's digits (1,797 8x8 images, upscaled to 16x16), the hand-written families
# and transformers' own models (LIBRARIES="written transformers" by default), then REPORT.md.
# scikit-learn is only needed to write the data: it goes into a throwaway virtualenv.
set -euo pipefail
cd "$(dirname "$0")/.."
R=${RESULTS:-bench/results}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$tmp/venv"
"$tmp/venv/bin/pip" install -q scikit-learn numpy
"$tmp/venv/bin/python" - "$tmp/digits16.npz" <<'PY'
import sys
import numpy as np
from sklearn.datasets import load_digits
d = load_digits()
x = np.kron(d.images[:, None] / 16.0, np.ones((1, 1, 2, 2))).astype(np.float32)
np.savez(sys.argv[1], x=x, y=d.target.astype(np.int64))
PY
for lib in ${LIBRARIES:-written transformers}; do
  out=$R/families.json
  [ "$lib" = written ] || out=$R/families-$lib.json
  .venv/bin/hiertrain bench families --library "$lib" --data "$tmp/digits16.npz" --count 150 --batch 32 --out "$out" >/dev/null
done
.venv/bin/hiertrain bench report --results "$R" >/dev/null
