"""Lowering the gradients of convolutions and pools (:mod:`hiertrain.train.lowering`'s rules for
ORT's ConvGrad, MaxPoolGrad and AveragePoolGrad) into standard ONNX ops:

- ConvGrad(dY, X, W) -> dX: ConvTranspose with output_padding (a Conv with the flipped kernel where
  stride is 1 and channels 16..128); dW: im2col built from one strided Slice per kernel offset, then
  one Gemm per group (a plain Gemm for 1x1 kernels); dB: ReduceSum;
- MaxPoolGrad(dY, Indices) -> MaxUnpool for non-overlapping windows, otherwise
  ScatterElements(reduction='add') over MaxPool's flat indices;
- AveragePoolGrad(dY) -> a depthwise ConvTranspose with a constant 1/prod(k) kernel.

Each rule takes the lowerer ``lw`` (its ``name``, ``const``, ``static``, ``fail``, ``shapes`` and
``producer``) and the node, and returns the nodes that replace it.
"""

from __future__ import annotations

import itertools
import numpy as np
import onnx
from onnx import helper, numpy_helper

from hiertrain.train.folding import attrs


def maxpool_grad(lw, node):
    a = attrs(node)
    dy, idx = node.input[:2]
    pool = lw.producer.get(idx)
    if pool is None or pool.op_type != "MaxPool" or len(pool.output) < 2 or pool.output[1] != idx:
        raise lw.fail(node, f"its indices {idx!r} do not come from a MaxPool")
    if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or a.get("storage_order", 0):
        raise lw.fail(node, "only auto_pad=NOTSET and storage_order=0 are supported")
    x = lw.static(node, pool.input[0])
    k, s = list(a["kernel_shape"]), list(a.get("strides", [1] * len(a["kernel_shape"])))
    pads, dil = list(a.get("pads", [0] * 2 * len(k))), list(a.get("dilations", [1] * len(k)))
    base = node.output[0]
    dys, n, shape = (lw.name(base, w) for w in ("dyshape", "n", "shape"))  # X's: [N of dY, static dims]
    out = [helper.make_node("Shape", [dy], [dys], name=dys),
           helper.make_node("Slice", [dys, lw.const(base, np.array([0], np.int64)),
                                      lw.const(base, np.array([1], np.int64))], [n], name=n),
           helper.make_node("Concat", [n, lw.const(base, np.array(x[1:], np.int64))], [shape], axis=0,
                            name=shape)]
    overlapping = any(ki > si for ki, si in zip(k, s)) or any(d != 1 for d in dil) or a.get("ceil_mode", 0)
    if not overlapping:  # every input position in at most one window: indices are unique
        out.append(helper.make_node("MaxUnpool", [dy, idx, shape], [node.output[0]], kernel_shape=k, strides=s,
                                    pads=pads, name=lw.name(base, "unpool")))
        return out
    zeros, flat, fi, fd, sc = (lw.name(base, w) for w in ("zeros", "flat", "flatidx", "flatdy", "scatter"))
    minus1 = lw.const(base, np.array([-1], np.int64))
    out += [helper.make_node("ConstantOfShape", [shape], [zeros], name=zeros,
                             value=numpy_helper.from_array(np.zeros(1, np.float32))),
            helper.make_node("Reshape", [zeros, minus1], [flat], name=flat),
            helper.make_node("Reshape", [idx, minus1], [fi], name=fi),
            helper.make_node("Reshape", [dy, minus1], [fd], name=fd),
            helper.make_node("ScatterElements", [flat, fi, fd], [sc], axis=0, reduction="add", name=sc),
            helper.make_node("Reshape", [sc, shape], [node.output[0]], name=lw.name(base, "reshape"))]
    return out

def average_pool_grad(lw, node):
    # a depthwise ConvTranspose of dY with a constant 1/prod(k) kernel: every window spreads its
    # gradient evenly over the inputs it averaged (padding included or, without pads, none)
    a = attrs(node)
    dy = node.input[0]
    k, nd = list(a["kernel_shape"]), len(a["kernel_shape"])
    s, pads = list(a.get("strides", [1] * nd)), list(a.get("pads", [0] * 2 * nd))
    if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or a.get("ceil_mode", 0):
        raise lw.fail(node, "only auto_pad=NOTSET and ceil_mode=0 are supported")
    if any(pads) and not a.get("count_include_pad", 0):
        raise lw.fail(node, "padded windows that exclude the padding from the count are not supported "
                              "(export with count_include_pad=True or without padding)")
    xname = node.output[0][:-len("_grad")] if node.output[0].endswith("_grad") else None
    x = lw.static(node, xname or node.output[0])
    c = x[1]
    w = np.full((c, 1, *k), 1.0 / float(np.prod(k)), np.float32)
    ys = [(x[2 + i] + pads[i] + pads[nd + i] - k[i]) // s[i] + 1 for i in range(nd)]
    outpad = [x[2 + i] - ((ys[i] - 1) * s[i] - pads[i] - pads[nd + i] + k[i]) for i in range(nd)]
    return [helper.make_node("ConvTranspose", [dy, lw.const(node.output[0], w)], [node.output[0]],
                             kernel_shape=k, strides=s, pads=pads, group=c, output_padding=outpad,
                             name=lw.name(node.output[0], "convtranspose"))]

def conv_grad(lw, node):
    a = attrs(node)
    dy, x, w = node.input[:3]
    outs = list(node.output) + [""] * (3 - len(node.output))
    if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise lw.fail(node, f"auto_pad={a['auto_pad']!r} is not supported; give explicit pads")
    xs = lw.static(node, x)
    k = list(a["kernel_shape"])
    r = len(k)
    s = list(a.get("strides", [1] * r))
    d = list(a.get("dilations", [1] * r))
    p = list(a.get("pads", [0] * 2 * r))
    g = int(a.get("group", 1))
    ys = [(xs[2 + i] + p[i] + p[r + i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(r)]
    base = (outs[1] or outs[0] or outs[2])
    o = lw.shapes.get(w, [None])[0]
    if not isinstance(o, int) or o <= 0:
        raise lw.fail(node, f"the shape of the weight {w!r} is not known statically")
    nodes: list[onnx.NodeProto] = []
    flip = [d[i] * (k[i] - 1) - p[i] for i in range(r)] + [d[i] * (k[i] - 1) - p[r + i] for i in range(r)]
    if outs[0] and all(v == 1 for v in s) and g == 1 and min(flip) >= 0 and 16 <= xs[1] and max(xs[1], o) <= 128:
        # stride 1: dX is the convolution of dY with the flipped, transposed kernel; ORT runs
        # it in its blocked (NCHWc) layout, measured faster than ConvTranspose for 16..128 channels
        wt, wf = lw.name(base, "wt"), lw.name(base, "wflip")
        nodes += [helper.make_node("Transpose", [w], [wt], perm=[1, 0, *range(2, 2 + r)], name=wt),
                  helper.make_node("Slice", [wt, lw.const(base, np.full(r, -1, np.int64)),
                                             lw.const(base, np.full(r, np.iinfo(np.int64).min, np.int64)),
                                             lw.const(base, np.arange(2, 2 + r, dtype=np.int64)),
                                             lw.const(base, np.full(r, -1, np.int64))], [wf], name=wf),
                  helper.make_node("Conv", [dy, wf], [outs[0]], kernel_shape=k, pads=flip, dilations=d,
                                   name=lw.name(base, "dx"))]
    elif outs[0]:  # dX
        op = [xs[2 + i] - ((ys[i] - 1) * s[i] - p[i] - p[r + i] + d[i] * (k[i] - 1) + 1) for i in range(r)]
        if any(not 0 <= v < max(s[i], d[i]) for i, v in enumerate(op)):
            raise lw.fail(node, f"no ConvTranspose reproduces input shape {xs}")
        nodes.append(helper.make_node("ConvTranspose", [dy, w], [outs[0]], kernel_shape=k, strides=s, pads=p,
                                      dilations=d, group=g, output_padding=op, name=lw.name(base, "dx")))
    if outs[1]:  # dW
        nodes += _conv_dw(lw, base, dy, x, outs[1], xs, ys, k, s, d, p, g, o)
    if outs[2]:  # dB
        axes = lw.const(base, np.array([0, *range(2, 2 + r)], np.int64))
        nodes.append(helper.make_node("ReduceSum", [dy, axes], [outs[2]], keepdims=0, name=lw.name(base, "db")))
    return nodes

def _conv_dw(lw, base, dy, x, dw, xs, ys, k, s, d, p, g, o):
    r = len(k)
    c = xs[1]
    perm = [1, 0, *range(2, 2 + r)]
    kk = int(np.prod(k))
    if kk >= 25:  # measured: for 5x5 and larger kernels the Conv is faster
        return _dw_by_conv(lw, base, dy, x, dw, xs, ys, k, s, d, p, g, o)
    # im2col from slices: one strided Slice of the padded, transposed input per kernel offset,
    # stacked into cols [C * k.., N * pixels]; then one GEMM per group with the output gradient.
    # A 1x1 kernel at stride 1 needs no slice: the transposed input is already cols.
    xt, yt, y2, cols = (lw.name(base, w) for w in ("xt", "yt", "y2", "cols"))
    nodes = [helper.make_node("Transpose", [x], [xt], perm=perm, name=xt),
             helper.make_node("Transpose", [dy], [yt], perm=perm, name=yt),
             helper.make_node("Reshape", [yt, lw.const(base, np.array([0, -1], np.int64))], [y2], name=y2)]
    if kk == 1 and all(v == 1 for v in s) and not any(p):
        nodes.append(helper.make_node("Reshape", [xt, lw.const(base, np.array([c, -1], np.int64))], [cols],
                                      name=cols))
        return nodes + _dw_gemm(lw, base, y2, cols, dw, c, o, k, g)
    if any(p):
        xp = lw.name(base, "xpad")
        pads = [0, 0, *p[:r], 0, 0, *p[r:]]
        nodes.append(helper.make_node("Pad", [xt, lw.const(base, np.array(pads, np.int64))], [xp], name=xp))
        xt = xp
    axes = lw.const(base, np.arange(2, 2 + r, dtype=np.int64))
    steps = lw.const(base, np.array(s, np.int64))
    one = lw.const(base, np.array([1], np.int64))
    parts = []
    for off in itertools.product(*(range(ki) for ki in k)):
        start = [off[i] * d[i] for i in range(r)]
        end = [start[i] + s[i] * (ys[i] - 1) + 1 for i in range(r)]
        sl, un = lw.name(base, "slice"), lw.name(base, "col")
        nodes += [helper.make_node("Slice", [xt, lw.const(base, np.array(start, np.int64)),
                                             lw.const(base, np.array(end, np.int64)), axes, steps], [sl], name=sl),
                  helper.make_node("Unsqueeze", [sl, one], [un], name=un)]
        parts.append(un)
    stacked = lw.name(base, "stacked")
    nodes += [helper.make_node("Concat", parts, [stacked], axis=1, name=stacked),
              helper.make_node("Reshape", [stacked, lw.const(base, np.array([c * kk, -1], np.int64))], [cols],
                               name=cols)]
    return nodes + _dw_gemm(lw, base, y2, cols, dw, c, o, k, g)

def _dw_gemm(lw, base, y2, cols, dw, c, o, k, g):
    """dW from the output gradient [O, N * pixels] and cols [C * k.., N * pixels]: a GEMM per group."""
    kk = int(np.prod(k))
    shape = lw.const(base, np.array([o, c // g, *k], np.int64))
    if g == 1:
        mm = lw.name(base, "mm")
        return [helper.make_node("Gemm", [y2, cols], [mm], transB=1, name=mm),
                helper.make_node("Reshape", [mm, shape], [dw], name=lw.name(base, "dw"))]
    yg = [lw.name(base, f"yg{i}_") for i in range(g)]
    cg = [lw.name(base, f"cg{i}_") for i in range(g)]
    mg = [lw.name(base, f"mg{i}_") for i in range(g)]
    cat = lw.name(base, "cat")
    nodes = [helper.make_node("Split", [y2, lw.const(base, np.array([o // g] * g, np.int64))], yg, axis=0,
                              name=lw.name(base, "splity")),
             helper.make_node("Split", [cols, lw.const(base, np.array([c // g * kk] * g, np.int64))], cg, axis=0,
                              name=lw.name(base, "splitcols"))]
    nodes += [helper.make_node("Gemm", [yi, ci], [mi], transB=1, name=mi) for yi, ci, mi in zip(yg, cg, mg)]
    return nodes + [helper.make_node("Concat", mg, [cat], axis=0, name=cat),
                    helper.make_node("Reshape", [cat, shape], [dw], name=lw.name(base, "dw"))]

def _dw_by_conv(lw, base, dy, x, dw, xs, ys, k, s, d, p, g, o):
    """dW as a Conv of the transposed input [C, N, ..] with the transposed output gradient
    [O, N, ..] as its kernel (stride and dilation swapped), per group: few, large copies."""
    r, c = len(k), xs[1]
    perm = [1, 0, *range(2, 2 + r)]
    nodes: list[onnx.NodeProto] = []
    xt, yt = lw.name(base, "xt"), lw.name(base, "yt")
    nodes += [helper.make_node("Transpose", [x], [xt], perm=perm, name=xt),
              helper.make_node("Transpose", [dy], [yt], perm=perm, name=yt)]
    xg, yg = [xt], [yt]
    if g > 1:
        xg = [lw.name(base, f"xg{i}_") for i in range(g)]
        yg = [lw.name(base, f"yg{i}_") for i in range(g)]
        nodes += [helper.make_node("Split", [xt, lw.const(base, np.array([c // g] * g, np.int64))], xg, axis=0,
                                   name=lw.name(base, "splitx")),
                  helper.make_node("Split", [yt, lw.const(base, np.array([o // g] * g, np.int64))], yg, axis=0,
                                   name=lw.name(base, "splity"))]
    kz = [(xs[2 + i] + p[i] + p[r + i] - (ys[i] - 1) * s[i] - 1) // d[i] + 1 for i in range(r)]
    parts = []
    for i, (xi, yi) in enumerate(zip(xg, yg)):
        z = lw.name(base, f"z{i}_")
        nodes.append(helper.make_node("Conv", [xi, yi], [z], strides=d, dilations=s, pads=p, name=z))
        if kz != k:  # the correlation also covers rows past the kernel: keep the first k
            zs = lw.name(base, f"zs{i}_")
            nodes.append(helper.make_node("Slice", [z, lw.const(base, np.zeros(r, np.int64)),
                                                    lw.const(base, np.array(k, np.int64)),
                                                    lw.const(base, np.arange(2, 2 + r, dtype=np.int64))],
                                          [zs], name=zs))
            z = zs
        zt = lw.name(base, f"zt{i}_")
        nodes.append(helper.make_node("Transpose", [z], [zt if g > 1 else dw], perm=perm,
                                      name=zt))
        parts.append(zt)
    if g > 1:
        nodes.append(helper.make_node("Concat", parts, [dw], axis=0, name=lw.name(base, "dw")))
    return nodes
