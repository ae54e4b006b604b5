"""Lossless fp16 storage of an fp32 ONNX graph's weights: half the file, the same numbers.

kapao weights are stored in fp16 (the official checkpoints and `kapao convert` files), so every
weight of an fp32 export whose BatchNorm was *not* folded is exactly representable in fp16. Such an
initializer is stored as fp16 and followed by a `Cast` to float: the graph computes in fp32 on the
identical values, and ONNX Runtime constant-folds the Casts (and then fuses Conv + BatchNorm) when
it opens the session, so inference speed is unchanged. Initializers that fp16 would change (the
decode coefficients, BN folded into the convs, any fp32-trained weight) stay fp32.

Needs the `onnx` package (it writes files); no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

FP16_SUFFIX = "__fp16"


@dataclass(frozen=True)
class CompactStats:
    """What `compact_fp16_initializers` did: float32 initializers stored as fp16 / kept fp32, and
    the bytes of the float32 initializers' data before and after."""

    compacted: int
    kept_fp32: int
    bytes_before: int
    bytes_after: int


def is_fp16_exact(a: np.ndarray) -> bool:
    """True when every value of the float32 array `a` survives a round trip through float16
    (no rounding, no overflow to inf; NaN never counts as exact)."""
    if a.dtype != np.float32:
        return False
    with np.errstate(over="ignore"):  # overflow to inf is the answer "no", not a warning
        return bool(np.array_equal(a.astype(np.float16).astype(np.float32), a))


def compact_fp16_initializers(proto: Any, min_elements: int = 1) -> CompactStats:
    """Rewrite the onnx.ModelProto `proto` in place: each float32 initializer of the main graph with
    at least `min_elements` values, all exactly representable in fp16, becomes an fp16 initializer
    `<name>__fp16` plus a `Cast(to=FLOAT)` node whose output keeps the original name, so every
    consumer (and any subgraph reading it from the outer scope) is untouched. Initializers that are
    also graph inputs (overridable at run time) are left alone. Running it twice changes nothing."""
    from onnx import TensorProto, helper, numpy_helper

    graph = proto.graph
    inputs = {i.name for i in graph.input}
    taken = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output}
    inits, casts = [], []
    compacted = kept = before = after = 0
    for init in graph.initializer:
        if init.data_type != TensorProto.FLOAT or init.name in inputs:
            inits.append(init)
            continue
        a = numpy_helper.to_array(init)
        before += a.nbytes
        if a.size < min_elements or not is_fp16_exact(a):
            inits.append(init)
            kept += 1
            after += a.nbytes
            continue
        name = init.name + FP16_SUFFIX
        while name in taken:
            name += "_"
        taken.add(name)
        half = numpy_helper.from_array(a.astype(np.float16), name)
        inits.append(half)
        casts.append(helper.make_node("Cast", [name], [init.name], to=TensorProto.FLOAT, name=name + "_cast"))
        compacted += 1
        after += a.size * 2
    del graph.initializer[:]
    graph.initializer.extend(inits)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(casts + nodes)  # the Casts first: the graph stays topologically sorted
    return CompactStats(compacted, kept, before, after)


__all__ = ["FP16_SUFFIX", "CompactStats", "compact_fp16_initializers", "is_fp16_exact"]
