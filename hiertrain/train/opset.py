"""A user's model brought to the opset hiertrain builds with, by onnx's version converter run in a
child process: some of its adapters crash the interpreter (ReduceMax 18 -> 17 does, in onnx 1.17),
which must not take the importing service with it.
"""

from __future__ import annotations

from typing import Any

import onnx


CONVERT_TIMEOUT_S = 300


def converted(model: "onnx.ModelProto", opset: int) -> "onnx.ModelProto | str":
    """``model`` converted to ``opset`` by onnx's version converter, or why not. The converter runs
    in a child process: some of its adapters crash the interpreter (ReduceMax 18 -> 17 does, in
    onnx 1.17), which must not take the caller with it."""
    import multiprocessing

    parent, child = multiprocessing.get_context("fork").Pipe(duplex=False)
    proc = multiprocessing.get_context("fork").Process(target=_convert_in_child, args=(model.SerializeToString(),
                                                                                        opset, child), daemon=True)
    proc.start()
    child.close()
    try:
        if not parent.poll(CONVERT_TIMEOUT_S):
            proc.kill()
            proc.join()
            return f"onnx's version converter took more than {CONVERT_TIMEOUT_S} s"
        kind, payload = parent.recv()
    except EOFError:
        proc.join()
        return f"onnx's version converter crashed (exit {proc.exitcode})"
    proc.join()
    if kind == "error":
        return payload
    return onnx.load_from_string(payload)


def _convert_in_child(raw: bytes, opset: int, out: Any) -> None:
    import faulthandler

    faulthandler.disable()  # a crash here is reported by the parent, in one line
    try:
        from onnx import version_converter

        converted = version_converter.convert_version(onnx.load_from_string(raw), opset)
        out.send(("ok", converted.SerializeToString()))
    except Exception as exc:  # noqa: BLE001 - any failure is one line in the parent
        out.send(("error", str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__))
