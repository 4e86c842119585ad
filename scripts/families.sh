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
"$tmp/venv/bin/python" - "$tmp/digits16.npz" "$tmp/digits32.npz" <<'PY'
import sys
import numpy as np
from sklearn.datasets import load_digits
d = load_digits()
for k, path in ((2, sys.argv[1]), (4, sys.argv[2])):
    x = np.kron(d.images[:, None] / 16.0, np.ones((1, 1, k, k))).astype(np.float32)
    np.savez(path, x=x, y=d.target.astype(np.int64))
PY
# the written families on 16x16 digits; transformers' at 32x32 (EfficientNet's 5x5 kernels need a 4x4 map at
# its third stride, which PyTorch itself refuses at 16x16)
for lib in ${LIBRARIES:-written transformers}; do
  out=$R/families.json data=$tmp/digits16.npz
  [ "$lib" = written ] || { out=$R/families-$lib.json; data=$tmp/digits32.npz; }
  .venv/bin/hiertrain bench families --library "$lib" --data "$data" --count 150 --batch 32 --out "$out" >/dev/null
done
.venv/bin/hiertrain bench report --results "$R" >/dev/null
