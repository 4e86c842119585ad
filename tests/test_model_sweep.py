"""Never a traceback from a model file: `hiertrain model import` on every test model the `onnx` wheel
ships (onnx/backend/test/data, ~1,400 files of every op and opset) accepts it or refuses it in one
line, and what it accepts has gradients that build."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import onnx
import pytest

from hiertrain.errors import HiertrainError
from hiertrain.train import onnxmodel, segments

pytestmark = [pytest.mark.compute, pytest.mark.slow]
DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"


def sweep(files: list[Path]) -> tuple[int, int, list[tuple[Path, str]]]:
    """``model import``'s checks on ``files``: (accepted, refused, broken with why)."""
    accepted, refused, broken = 0, 0, []
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
        accepted += 1
        if segments.can_build():  # what `model import` checks next
            try:
                onnxmodel.check_gradients(spec)
            except Exception as exc:  # noqa: BLE001 - what the test is for
                broken.append((f, f"gradients: {type(exc).__name__}: {exc}"))
    return accepted, refused, broken


def test_every_onnx_test_model_is_accepted_or_refused_in_one_line():
    files = sorted(DATA.rglob("model.onnx"))
    assert len(files) > 1000, f"the onnx wheel ships {len(files)} test models under {DATA}"
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:  # one per core
        parts = list(pool.map(sweep, [files[0::2], files[1::2]]))
    accepted, refused = sum(p[0] for p in parts), sum(p[1] for p in parts)
    broken = [b for p in parts for b in p[2]]
    assert not broken, "\n".join(f"{f.relative_to(DATA)}: {why}" for f, why in broken[:20])
    assert accepted and refused > 1000


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
