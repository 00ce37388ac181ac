"""Op semantics of MIL (coremltools/converters/mil/mil/ops/defs), in numpy.

Each op takes (params, declared outputs) and returns one array or a tuple; the program (program.py) rounds every
result to the dtype the program declares and checks the declared shape. Ops compute in float32 from float16 inputs
(`_f`): see the package docstring for the arithmetic model. `OPS` maps each supported op type to its function.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np

from ..errors import UserError
from .dtypes import DTYPE_STRINGS, DTYPES, unpack_bits

VARIADIC = {("concat", "values"), ("stack", "values")}  # inputs that take a list of tensors


def _f(x) -> np.ndarray:
    """Compute dtype: float16 inputs are widened to float32 (see the package docstring, runtime/mil/__init__.py)."""
    x = np.asarray(x)
    return x.astype(np.float32) if x.dtype == np.float16 else x


def _scalar(x, default=None):
    if x is None:
        return default
    x = np.asarray(x)
    return x.item() if x.ndim == 0 else x.reshape(-1)[0].item()


def _ints(x) -> list[int]:
    return [int(v) for v in np.asarray(x).reshape(-1)]


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _binary(fn):
    return lambda p, d: fn(_f(p["x"]), _f(p["y"]))


def _unary(fn):
    return lambda p, d: fn(_f(p["x"]))


def _erf_approx(v) -> np.ndarray:
    """Abramowitz & Stegun 7.1.26 in float64: |error| < 1.5e-7."""
    v = np.asarray(v, np.float64)
    s, a = np.sign(v), np.abs(v)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return s * (1.0 - poly * np.exp(-a * a))


@functools.cache
def _erf_function() -> Callable:
    try:
        from scipy.special import erf  # exact to float precision where scipy is installed
    except ImportError:
        return _erf_approx
    return erf


def _erf(x: np.ndarray) -> np.ndarray:
    return np.asarray(_erf_function()(x), dtype=x.dtype)


def _gelu(p, d):
    x = _f(p["x"])
    mode = p.get("mode", "EXACT")
    if mode == "EXACT":
        return 0.5 * x * (1.0 + _erf(x / np.float32(math.sqrt(2.0))))
    if mode == "TANH_APPROXIMATION":
        return 0.5 * x * (1.0 + np.tanh(np.float32(math.sqrt(2.0 / math.pi)) * (x + 0.044715 * x**3)))
    if mode == "SIGMOID_APPROXIMATION":
        return x / (1.0 + np.exp(-1.702 * x))
    raise UserError(f"gelu mode {mode!r} is not implemented by the reference executor")


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _reduce(fn):
    def op(p, d):
        x = _f(p["x"])
        axes = p.get("axes")
        axes = None if axes is None else tuple(_axis(a, x.ndim) for a in _ints(axes))
        return fn(x, axis=axes, keepdims=bool(_scalar(p.get("keep_dims"), False)))

    return op


def _arg_reduce(fn):
    def op(p, d):
        x = _f(p["x"])
        axis = _axis(int(_scalar(p.get("axis"), -1)), x.ndim)
        out = fn(x, axis=axis)
        return np.expand_dims(out, axis) if _scalar(p.get("keep_dims"), False) else out

    return op


def _matmul(p, d):
    x, y = _f(p["x"]), _f(p["y"])
    if _scalar(p.get("transpose_x"), False) and x.ndim > 1:
        x = np.swapaxes(x, -1, -2)
    if _scalar(p.get("transpose_y"), False) and y.ndim > 1:
        y = np.swapaxes(y, -1, -2)
    return np.matmul(x, y)


def _linear(p, d):
    x, w = _f(p["x"]), _f(p["weight"])
    y = np.matmul(x, w.T)
    if p.get("bias") is not None:
        y = y + _f(p["bias"])
    return y


def _conv_pads(pad_type: str, pad, kernel, strides, dilations, spatial) -> list[tuple[int, int]]:
    n = len(kernel)
    if pad_type == "valid":
        return [(0, 0)] * n
    if pad_type == "custom":
        pad = _ints(pad) if pad is not None else [0] * (2 * n)
        return [(pad[2 * i], pad[2 * i + 1]) for i in range(n)]
    if pad_type in ("same", "same_lower"):
        pads = []
        for i in range(n):
            out = -(-spatial[i] // strides[i])
            total = max((out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - spatial[i], 0)
            small, big = total // 2, total - total // 2
            pads.append((big, small) if pad_type == "same_lower" else (small, big))
        return pads
    raise UserError(f"conv pad_type {pad_type!r} is not implemented by the reference executor")


def _conv(p, d):
    """N-d convolution (cross-correlation), groups, strides, dilations, MIL padding modes."""
    x, w = _f(p["x"]), _f(p["weight"])
    n = x.ndim - 2
    strides = _ints(p["strides"]) if p.get("strides") is not None else [1] * n
    dilations = _ints(p["dilations"]) if p.get("dilations") is not None else [1] * n
    groups = int(_scalar(p.get("groups"), 1))
    kernel = list(w.shape[2:])
    pads = _conv_pads(str(p.get("pad_type", "valid")), p.get("pad"), kernel, strides, dilations, x.shape[2:])
    x = np.pad(x, [(0, 0), (0, 0), *pads])
    b, c_in = x.shape[:2]
    c_out = w.shape[0]
    # Sliding windows over the dilated kernel extent, then strided: (B, C, *out, *kernel)
    extent = [(k - 1) * dl + 1 for k, dl in zip(kernel, dilations)]
    win = np.lib.stride_tricks.sliding_window_view(x, extent, axis=tuple(range(2, 2 + n)))
    win = win[
        (
            slice(None),
            slice(None),
            *[slice(None, None, s) for s in strides],
            *[slice(None, None, dl) for dl in dilations],
        )
    ]
    out_sizes = win.shape[2 : 2 + n]
    cg, og = c_in // groups, c_out // groups
    outs = []
    for g in range(groups):
        wg = w[g * og : (g + 1) * og].reshape(og, -1)  # (og, cg * prod(k))
        xg = win[:, g * cg : (g + 1) * cg]  # (B, cg, *out, *k)
        xg = np.moveaxis(xg, 1, 1 + n)  # (B, *out, cg, *k)
        cols = xg.reshape(b, int(np.prod(out_sizes)), -1)
        outs.append(np.matmul(cols, wg.T))  # (B, P, og)
    y = np.concatenate(outs, axis=-1) if groups > 1 else outs[0]
    y = np.moveaxis(y, -1, 1).reshape(b, c_out, *out_sizes)
    if p.get("bias") is not None:
        y = y + _f(p["bias"]).reshape(1, c_out, *([1] * n))
    return y


def _scale_shift(y, p, shape):
    """The normalisations' optional affine part: y * gamma + beta, both broadcast to `shape`."""
    if p.get("gamma") is not None:
        y = y * _f(p["gamma"]).reshape(shape)
    if p.get("beta") is not None:
        y = y + _f(p["beta"]).reshape(shape)
    return y


def _layer_norm(p, d):
    x = _f(p["x"])
    axes = tuple(_axis(a, x.ndim) for a in _ints(p["axes"])) if p.get("axes") is not None else tuple(range(x.ndim))
    eps = np.float32(_scalar(p.get("epsilon"), 1e-5))
    mean = x.mean(axis=axes, keepdims=True)
    var = np.square(x - mean).mean(axis=axes, keepdims=True)
    y = (x - mean) / np.sqrt(var + eps)
    shape = [x.shape[i] if i in axes else 1 for i in range(x.ndim)]
    return _scale_shift(y, p, shape)


def _instance_norm(p, d):
    x = _f(p["x"])
    axes = tuple(range(2, x.ndim))
    eps = np.float32(_scalar(p.get("epsilon"), 1e-5))
    mean = x.mean(axis=axes, keepdims=True)
    y = (x - mean) / np.sqrt(np.square(x - mean).mean(axis=axes, keepdims=True) + eps)
    shape = [1, x.shape[1]] + [1] * (x.ndim - 2)
    return _scale_shift(y, p, shape)


def _batch_norm(p, d):  # per-channel statistics given as constants (axis 1)
    x = _f(p["x"])
    shape = [1, x.shape[1]] + [1] * (x.ndim - 2)
    eps = np.float32(_scalar(p.get("epsilon"), 1e-5))
    y = (x - _f(p["mean"]).reshape(shape)) / np.sqrt(_f(p["variance"]).reshape(shape) + eps)
    return _scale_shift(y, p, shape)


def _reshape(p, d):
    x = np.asarray(p["x"])
    shape = _ints(p["shape"])
    if 0 in shape:  # iOS17: a 0 copies the input dim aligned from the right
        out = list(shape)
        for i in range(len(shape)):
            j = x.ndim - (len(shape) - i)
            if shape[i] == 0:
                out[i] = x.shape[j] if 0 <= j < x.ndim else 1
        shape = out
    return x.reshape(shape)


def _expand_dims(p, d):
    x = np.asarray(p["x"])
    rank = x.ndim + len(_ints(p["axes"]))
    return np.expand_dims(x, tuple(sorted(_axis(a, rank) for a in _ints(p["axes"]))))


def _squeeze(p, d):
    x = np.asarray(p["x"])
    if p.get("axes") is None:
        return np.squeeze(x)
    return np.squeeze(x, tuple(_axis(a, x.ndim) for a in _ints(p["axes"])))


def _concat(p, d):
    values = p["values"] if isinstance(p["values"], list) else [p["values"]]
    axis = _axis(int(_scalar(p["axis"])), np.asarray(values[0]).ndim)
    if _scalar(p.get("interleave"), False):
        stacked = np.stack(values, axis=axis + 1)
        shape = list(np.asarray(values[0]).shape)
        shape[axis] *= len(values)
        return stacked.reshape(shape)
    return np.concatenate(values, axis=axis)


def _stack(p, d):
    values = p["values"] if isinstance(p["values"], list) else [p["values"]]
    return np.stack(values, axis=_axis(int(_scalar(p["axis"])), np.asarray(values[0]).ndim + 1))


def _split(p, d):
    x = np.asarray(p["x"])
    axis = _axis(int(_scalar(p["axis"])), x.ndim)
    if p.get("split_sizes") is not None:
        bounds = np.cumsum(_ints(p["split_sizes"]))[:-1]
    else:
        bounds = int(_scalar(p["num_splits"]))
    return tuple(np.split(x, bounds, axis=axis))


def _slice_index(p, r: int) -> tuple:
    begin, end = _ints(p["begin"]), _ints(p["end"])
    stride = _ints(p["stride"]) if p.get("stride") is not None else [1] * r
    bm = [bool(v) for v in np.asarray(p["begin_mask"]).reshape(-1)] if p.get("begin_mask") is not None else [False] * r
    em = [bool(v) for v in np.asarray(p["end_mask"]).reshape(-1)] if p.get("end_mask") is not None else [False] * r
    sm = (
        [bool(v) for v in np.asarray(p["squeeze_mask"]).reshape(-1)]
        if p.get("squeeze_mask") is not None
        else [False] * r
    )
    index = []
    for i in range(r):
        if sm[i]:
            index.append(begin[i])
            continue
        b = None if bm[i] else begin[i]
        e = None if em[i] else end[i]
        index.append(slice(b, e, stride[i]))
    return tuple(index)


def _slice_by_index(p, d):
    x = np.asarray(p["x"])
    return x[_slice_index(p, x.ndim)]


def _slice_update(p, d):  # iOS18: x[begin:end:stride, ...] = update, on a copy
    x = _f(p["x"]).copy()
    update = _f(p["update"])
    index = _slice_index(p, x.ndim)
    x[index] = update.reshape(x[index].shape)
    return x


def _slice_by_size(p, d):
    x = np.asarray(p["x"])
    begin, size = _ints(p["begin"]), _ints(p["size"])
    return x[tuple(slice(b, None if s == -1 else b + s) for b, s in zip(begin, size))]


def _positive(indices: np.ndarray, dim: int) -> np.ndarray:
    indices = np.asarray(indices).astype(np.int64)
    return np.where(indices < 0, indices + dim, indices)


def _gather(p, d):
    x = np.asarray(p["x"])
    axis = _axis(int(_scalar(p.get("axis"), 0)), x.ndim)
    batch_dims = int(_scalar(p.get("batch_dims"), 0))
    idx = _positive(p["indices"], x.shape[axis])
    if batch_dims == 0:
        return np.take(x, idx, axis=axis)
    lead = x.shape[:batch_dims]
    xs = x.reshape(-1, *x.shape[batch_dims:])
    ids = idx.reshape(-1, *idx.shape[batch_dims:])
    out = np.stack([np.take(a, i, axis=axis - batch_dims) for a, i in zip(xs, ids)])
    return out.reshape(*lead, *out.shape[1:])


def _gather_nd(p, d):
    x = np.asarray(p["x"])
    idx = np.asarray(p["indices"]).astype(np.int64)
    batch_dims = int(_scalar(p.get("batch_dims"), 0))

    def one(a, i):
        k = i.shape[-1]
        i = np.where(i < 0, i + np.array(a.shape[:k]), i)
        return a[tuple(np.moveaxis(i, -1, 0))]

    if batch_dims == 0:
        return one(x, idx)
    lead = x.shape[:batch_dims]
    xs = x.reshape(-1, *x.shape[batch_dims:])
    ids = idx.reshape(-1, *idx.shape[batch_dims:])
    out = np.stack([one(a, i) for a, i in zip(xs, ids)])
    return out.reshape(*lead, *out.shape[1:])


def _gather_along_axis(p, d):
    x = np.asarray(p["x"])
    axis = _axis(int(_scalar(p.get("axis"), 0)), x.ndim)
    return np.take_along_axis(x, _positive(p["indices"], x.shape[axis]), axis=axis)


_SCATTER_MODES = {
    "add": np.add,
    "sub": np.subtract,
    "mul": np.multiply,
    "div": np.divide,
    "max": np.maximum,
    "min": np.minimum,
}


def _scatter(p, d):
    data = _f(p["data"]).copy()
    axis = _axis(int(_scalar(p.get("axis"), 0)), data.ndim)
    idx = _positive(p["indices"], data.shape[axis])
    updates = _f(p["updates"])
    mode = str(p.get("mode", "update"))
    index = (slice(None),) * axis + (idx,)
    if mode == "update":
        data[index] = updates
    elif mode in _SCATTER_MODES:
        _SCATTER_MODES[mode].at(data, index, updates)
    else:
        raise UserError(f"scatter mode {mode!r} is not implemented by the reference executor")
    return data


def _scatter_along_axis(p, d):
    data = _f(p["data"]).copy()
    axis = _axis(int(_scalar(p.get("axis"), 0)), data.ndim)
    idx = _positive(p["indices"], data.shape[axis])
    mode = str(p.get("mode", "update"))
    if mode != "update":
        raise UserError(f"scatter_along_axis mode {mode!r} is not implemented by the reference executor")
    np.put_along_axis(data, idx, _f(p["updates"]), axis=axis)
    return data


def _pad(p, d):
    x = _f(p["x"])
    pad = _ints(p["pad"])
    n = len(pad) // 2
    widths = [(0, 0)] * (x.ndim - n) + [(pad[2 * i], pad[2 * i + 1]) for i in range(n)]
    mode = str(p.get("mode", "constant"))
    if mode == "constant":
        return np.pad(x, widths, constant_values=_scalar(p.get("constant_val"), 0.0))
    if mode == "reflect":
        return np.pad(x, widths, mode="reflect")
    if mode == "replicate":
        return np.pad(x, widths, mode="edge")
    raise UserError(f"pad mode {mode!r} is not implemented by the reference executor")


def _upsample_nearest(p, d):
    x = np.asarray(p["x"])
    out_h, out_w = d[0][1][-2:]
    sh = float(_scalar(p.get("scale_factor_height"), 1))
    sw = float(_scalar(p.get("scale_factor_width"), 1))
    rows = np.minimum(np.floor(np.arange(out_h) / sh).astype(np.int64), x.shape[-2] - 1)
    cols = np.minimum(np.floor(np.arange(out_w) / sw).astype(np.int64), x.shape[-1] - 1)
    return x[..., rows, :][..., cols]


def _fill_like(p, d):
    return np.full(np.asarray(p["ref_tensor"]).shape, _scalar(p.get("value"), 0.0), dtype=DTYPES[d[0][0]][0])


def _fill(p, d):
    return np.full(_ints(p["shape"]), _scalar(p.get("value"), 0.0), dtype=DTYPES[d[0][0]][0])


def _cast(p, d):
    x = np.asarray(p["x"])
    target = DTYPE_STRINGS.get(str(p["dtype"]))
    if target is None:
        raise UserError(f"cast to {p['dtype']!r} is not implemented by the reference executor")
    if np.issubdtype(target, np.integer) and np.issubdtype(x.dtype, np.floating):
        x = np.trunc(x)
    return x.astype(target)


def _sdpa(p, d):
    """iOS18 scaled_dot_product_attention: softmax(Q K^T / sqrt(d) + mask) V (a bool mask: True = keep)."""
    q, k, v = _f(p["query"]), _f(p["key"]), _f(p["value"])
    scores = np.matmul(q, np.swapaxes(k, -1, -2)) / np.float32(math.sqrt(q.shape[-1]))
    mask = p.get("attn_mask")
    if mask is not None:
        mask = np.asarray(mask)
        scores = np.where(mask, scores, -np.inf) if mask.dtype == np.bool_ else scores + _f(mask)
    return np.matmul(_softmax(scores, -1), v)


def _broadcast_param(param: np.ndarray, data_shape, axis) -> np.ndarray:
    """Scale / zero point of (de)quantize: a scalar or a vector along `axis`."""
    param = np.asarray(param)
    if param.ndim == 0 or axis is None:
        return param
    shape = [1] * len(data_shape)
    shape[_axis(int(axis), len(data_shape))] = param.size
    return param.reshape(shape)


def _quantize(p, d):
    x = np.asarray(p["input"])
    shape = x.shape
    scale = _f(_broadcast_param(p["scale"], shape, _scalar(p.get("axis"))))
    # The quotient is rounded to the input's dtype (fp16 in fp16 programs) before rounding to an integer, then
    # rounded half to even: exactly coremltools' quantize_by_scale_and_zp.
    q = np.around((_f(x) / scale).astype(x.dtype)).astype(np.float32)
    if p.get("zero_point") is not None:
        q = q + _broadcast_param(p["zero_point"], shape, _scalar(p.get("axis"))).astype(np.float32)
    target = DTYPE_STRINGS[str(p["output_dtype"])]
    info = np.iinfo(target)
    return np.clip(q, info.min, info.max).astype(target)


def _dequantize_values(data, scale, zero_point, axis) -> np.ndarray:
    out = np.asarray(data).astype(np.float32)
    if zero_point is not None:
        out = out - _broadcast_param(zero_point, out.shape, axis).astype(np.float32)
    return out * _broadcast_param(scale, out.shape, axis).astype(np.float32)


def _dequantize(p, d):
    return _dequantize_values(p["input"], p["scale"], p.get("zero_point"), _scalar(p.get("axis")))


def _constexpr_affine_dequantize(p, d):  # iOS16
    return _dequantize_values(p["quantized_data"], p["scale"], p.get("zero_point"), _scalar(p.get("axis"), 0))


def _repeat_blocks(param: np.ndarray, shape) -> np.ndarray:
    for axis, (n, m) in enumerate(zip(shape, param.shape)):
        if n != m:
            param = np.repeat(param, n // m, axis=axis)
    return param


def _constexpr_blockwise_shift_scale(p, d):  # iOS18
    data = np.asarray(p["data"]).astype(np.float32)
    scale = np.asarray(p["scale"])
    if p.get("offset") is not None:
        data = data - _repeat_blocks(np.asarray(p["offset"]).astype(np.float32), data.shape)
    return _repeat_blocks(scale.astype(np.float32), data.shape) * data


def _constexpr_lut_to_dense(p, d):
    lut, indices = np.asarray(p["lut"]), np.asarray(p["indices"])
    if "shape" in p:  # iOS16: a flat LUT, indices packed into uint8, the output shape given
        shape = _ints(p["shape"])
        nbits = int(round(math.log2(lut.size)))
        flat = unpack_bits(indices.astype(np.uint8), nbits, int(np.prod(shape)), False)
        return lut[flat.astype(np.int64)].reshape(shape)
    # iOS18: indices with the output's shape, lut (*blocks, 2^nbits, vector_size)
    vector_axis = p.get("vector_axis")
    vector_size = lut.shape[-1]
    if vector_size > 1:
        axis = _axis(int(_scalar(vector_axis)), indices.ndim)
        indices = np.swapaxes(indices, -1, axis)
        lut = np.swapaxes(lut, -3, axis)
    palettes = lut.shape[-2]
    table = lut.reshape(*lut.shape[:-2], palettes * vector_size)
    table = _repeat_blocks(table, (*indices.shape, palettes * vector_size))
    table = table.reshape(-1, palettes, vector_size)
    out = table[np.arange(table.shape[0]), indices.reshape(-1).astype(np.int64)]
    out = out.reshape(*indices.shape[:-1], indices.shape[-1] * vector_size)
    return np.swapaxes(out, -1, axis) if vector_size > 1 else out.reshape(indices.shape)


def _constexpr_cast(p, d):
    return np.asarray(p["source_val"]).astype(DTYPE_STRINGS[str(p["output_dtype"])])


def _clip(p, d):
    return np.clip(_f(p["x"]), _scalar(p["alpha"]), _scalar(p["beta"]))


def _band(lo, hi):
    return lambda p, d: np.clip(_f(p["x"]), lo, hi)


OPS: dict[str, Callable] = {
    "const": lambda p, d: p["val"],
    "identity": lambda p, d: np.asarray(p["x"]),
    "cast": _cast,
    # elementwise binary (numpy broadcasting = MIL broadcasting)
    "add": _binary(np.add),
    "sub": _binary(np.subtract),
    "mul": _binary(np.multiply),
    "real_div": _binary(np.divide),
    "floor_div": _binary(np.floor_divide),
    "mod": _binary(np.mod),
    "pow": _binary(np.power),
    "maximum": _binary(np.maximum),
    "minimum": _binary(np.minimum),
    "equal": _binary(np.equal),
    "not_equal": _binary(np.not_equal),
    "greater": _binary(np.greater),
    "greater_equal": _binary(np.greater_equal),
    "less": _binary(np.less),
    "less_equal": _binary(np.less_equal),
    "logical_and": _binary(np.logical_and),
    "logical_or": _binary(np.logical_or),
    "logical_xor": _binary(np.logical_xor),
    "logical_not": _unary(np.logical_not),
    # elementwise unary
    "abs": _unary(np.abs),
    "ceil": _unary(np.ceil),
    "floor": _unary(np.floor),
    "round": _unary(np.round),
    "sign": _unary(np.sign),
    "exp": _unary(np.exp),
    "exp2": _unary(np.exp2),
    "log": _unary(np.log),
    "sqrt": _unary(np.sqrt),
    "square": _unary(np.square),
    "sin": _unary(np.sin),
    "cos": _unary(np.cos),
    "tan": _unary(np.tan),
    "tanh": _unary(np.tanh),
    "erf": _unary(_erf),
    "rsqrt": lambda p, d: 1.0 / np.sqrt(_f(p["x"]) + np.float32(_scalar(p.get("epsilon"), 1e-12))),
    "inverse": lambda p, d: 1.0 / (_f(p["x"]) + np.float32(_scalar(p.get("epsilon"), 1e-4))),
    "clip": _clip,
    # activations
    "relu": _unary(lambda x: np.maximum(x, 0)),
    "relu6": _band(0, 6),
    "sigmoid": _unary(lambda x: 1.0 / (1.0 + np.exp(-x))),
    "silu": _unary(lambda x: x / (1.0 + np.exp(-x))),
    "gelu": _gelu,
    "leaky_relu": lambda p, d: (lambda x, a: np.where(x >= 0, x, a * x))(
        _f(p["x"]), np.float32(_scalar(p.get("alpha"), 0.01))
    ),
    "softplus": _unary(lambda x: np.logaddexp(0, x)),
    "softmax": lambda p, d: _softmax(_f(p["x"]), int(_scalar(p.get("axis"), -1))),
    # linear algebra
    "linear": _linear,
    "matmul": _matmul,
    "conv": _conv,
    "scaled_dot_product_attention": _sdpa,
    # normalisation
    "layer_norm": _layer_norm,
    "instance_norm": _instance_norm,
    "batch_norm": _batch_norm,
    # reductions
    "reduce_mean": _reduce(np.mean),
    "reduce_sum": _reduce(np.sum),
    "reduce_max": _reduce(np.max),
    "reduce_min": _reduce(np.min),
    "reduce_prod": _reduce(np.prod),
    "reduce_sum_square": _reduce(lambda x, **k: np.sum(np.square(x), **k)),
    "reduce_l2_norm": _reduce(lambda x, **k: np.sqrt(np.sum(np.square(x), **k))),
    "reduce_log_sum_exp": _reduce(lambda x, **k: np.log(np.sum(np.exp(x), **k))),
    "reduce_argmax": _arg_reduce(np.argmax),
    "reduce_argmin": _arg_reduce(np.argmin),
    # shapes and data movement
    "reshape": _reshape,
    "transpose": lambda p, d: np.transpose(np.asarray(p["x"]), _ints(p["perm"])),
    "expand_dims": _expand_dims,
    "squeeze": _squeeze,
    "concat": _concat,
    "stack": _stack,
    "split": _split,
    "slice_by_index": _slice_by_index,
    "slice_by_size": _slice_by_size,
    "slice_update": _slice_update,
    "tile": lambda p, d: np.tile(np.asarray(p["x"]), _ints(p["reps"])),
    "pad": _pad,
    "upsample_nearest_neighbor": _upsample_nearest,
    "gather": _gather,
    "gather_nd": _gather_nd,
    "gather_along_axis": _gather_along_axis,
    "scatter": _scatter,
    "scatter_along_axis": _scatter_along_axis,
    "select": lambda p, d: np.where(np.asarray(p["cond"]).astype(bool), _f(p["a"]), _f(p["b"])),
    "fill": _fill,
    "fill_like": _fill_like,
    "shape": lambda p, d: np.array(np.asarray(p["x"]).shape, dtype=np.int32),
    # quantisation and compressed weights
    "quantize": _quantize,
    "dequantize": _dequantize,
    "constexpr_affine_dequantize": _constexpr_affine_dequantize,
    "constexpr_blockwise_shift_scale": _constexpr_blockwise_shift_scale,
    "constexpr_lut_to_dense": _constexpr_lut_to_dense,
    "constexpr_cast": _constexpr_cast,
}
