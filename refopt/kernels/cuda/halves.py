"""Half-precision weights on the GPU: the decode kernel's matrices stored in two bytes (bfloat16 or
float16 bit patterns in a ``uint16`` buffer) and widened to float32 as they are read; every sum is
float32, so a product reads half the bytes of float32 weights and computes as before.

:func:`make_load` gives the read ``ld(W, i) -> float32`` for a storage kind (:data:`KINDS`):
``"float32"`` reads ``W[i]``; ``"bfloat16"`` puts the 16 bits above 16 zero bits (bfloat16 is the
upper half of a float32, so the widening is exact); ``"float16"`` converts IEEE half to float
(``cvt.f32.f16``, exact).  On the GPU the bit reinterpretations are LLVM intrinsics (a bitcast, a
``fpext half``); under the simulator, NumPy views of the same bits.
"""

from __future__ import annotations

import functools

import numpy as np
from numba import cuda

from refopt.kernels.cuda._common import SIMULATOR

#: How the decode kernel stores its matrices (``"float32"``: in the float32 buffer itself).
KINDS = ("float32", "bfloat16", "float16")

if SIMULATOR:
    def bf16_to_f32(bits):
        """bfloat16 bits (an integer) -> float32."""
        return np.uint32(int(bits) << 16).view(np.float32)

    def f16_to_f32(bits):
        """IEEE half bits (an integer) -> float32."""
        return np.float32(np.uint16(int(bits)).view(np.float16))
else:
    from llvmlite import ir as _ir
    from numba.cuda import types as _types
    from numba.cuda.extending import intrinsic as _intrinsic
    from numba.cuda.typing import signature as _signature

    def _widening(name, doc, widen):
        """An intrinsic ``name(bits) -> float32`` of 16-bit patterns held in any integer at least
        16 bits wide: ``widen(builder, i16 value)`` builds the float."""
        def typer(typingctx, bits):
            if not isinstance(bits, _types.Integer) or bits.bitwidth < 16:
                return None

            def codegen(context, builder, sig, args):
                h = args[0]
                if sig.args[0].bitwidth > 16:
                    h = builder.trunc(h, _ir.IntType(16))
                return widen(builder, h)
            return _signature(_types.float32, bits), codegen
        typer.__name__ = typer.__qualname__ = name
        typer.__doc__ = doc
        return _intrinsic(typer)

    bf16_to_f32 = _widening(
        "bf16_to_f32", "bfloat16 bits -> float32: the bits moved to the top of a word, bitcast.",
        lambda builder, h: builder.bitcast(builder.shl(builder.zext(h, _ir.IntType(32)),
                                                       _ir.Constant(_ir.IntType(32), 16)), _ir.FloatType()))
    f16_to_f32 = _widening(
        "f16_to_f32", "IEEE half bits -> float32 (``fpext half``: ``cvt.f32.f16``).",
        lambda builder, h: builder.fpext(builder.bitcast(h, _ir.HalfType()), _ir.FloatType()))


@functools.lru_cache(maxsize=None)
def make_load(kind: str):
    """``ld(W, i)``: element ``i`` of a weight buffer stored as ``kind`` (:data:`KINDS`), as float32."""
    if kind == "float32":
        @cuda.jit(device=True)
        def ld(W, i):
            return W[i]
    elif kind == "bfloat16":
        @cuda.jit(device=True)
        def ld(W, i):
            return bf16_to_f32(W[i])
    elif kind == "float16":
        @cuda.jit(device=True)
        def ld(W, i):
            return f16_to_f32(W[i])
    else:
        raise ValueError(f"weight storage {kind!r}: expected one of {KINDS}")
    return ld


@cuda.jit
def _widen(W, off, n, out, kind_code):
    i = cuda.grid(1)
    if i < n:
        if kind_code == 1:
            out[i] = bf16_to_f32(W[off + i])
        else:
            out[i] = f16_to_f32(W[off + i])


def widen(W, off: int, n: int, kind: str, out):
    """``out[:n] = W[off:off + n]`` widened to float32 (``W`` a half buffer stored as ``kind``)."""
    if n:
        _widen[(n + 255) // 256, 256](W, off, n, out, 1 if kind == "bfloat16" else 2)
    return out
