"""Never a traceback from a model file: `hiertrain model import` on every test model the `onnx` wheel
ships (onnx/backend/test/data, ~1,400 files of every op and opset) accepts it or refuses it in one
line, and what it accepts has gradients that build."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from hiertrain.errors import HiertrainError
from hiertrain.train import onnxmodel, segments

pytestmark = [pytest.mark.compute, pytest.mark.slow]
DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"


def test_every_onnx_test_model_is_accepted_or_refused_in_one_line():
    files = sorted(DATA.rglob("model.onnx"))
    assert len(files) > 1000, f"the onnx wheel ships {len(files)} test models under {DATA}"
    accepted, refused, broken = [], 0, []
    for f in files:
        try:
            spec, _ = onnxmodel.inspect(f)
        except HiertrainError as exc:
            refused += 1
            if "\n" in str(exc) or not str(exc):
                broken.append((f, f"refused in {len(str(exc).splitlines())} lines"))
            continue
        except Exception as exc:  # noqa: BLE001 - what the test is for
            broken.append((f, f"{type(exc).__name__}: {exc}"))
            continue
        accepted.append(spec)
    assert not broken, "\n".join(f"{f.relative_to(DATA)}: {why}" for f, why in broken[:20])
    assert accepted and refused > 1000
    if segments.can_build():
        for spec in accepted:  # what `model import` checks next
            onnxmodel.check_gradients(spec)


@pytest.mark.process
def test_a_model_that_crashes_onnxs_version_converter_is_refused_in_one_line():
    """onnx 1.17's converter segfaults on ReduceMax 18 -> 17: it runs in a child process."""
    f = DATA / "node" / "test_reduce_max_default_axes_keepdim_example" / "model.onnx"
    if not f.exists():
        pytest.skip(f"this onnx wheel has no {f.relative_to(DATA)}")
    out = subprocess.run([sys.executable, "-m", "hiertrain", "model", "import", str(f)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 1 and out.stdout == "" and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "could not be converted to 17" in out.stderr and "export with opset_version=17" in out.stderr
