"""Weighted averages of stored tensor bits in float64, cast back with one round-to-nearest-even.

The sharded averaging reads every input's slice of a tensor as the raw bits
it is stored in (bfloat16 and float16 as their uint16 patterns, float32,
float64) and needs, element by element, ``sum_i weight_i * input_i`` in
float64, rounded once to the stored dtype. As a chain of numpy operations
that is about 25 passes over memory a slice (widen, multiply, add for every
input; a dozen bit operations to round); compiled by numba into one loop it
is one pass, about 6 times faster on one core (0.16 s against 0.9-1.1 s for
five base-size bfloat16 inputs), and the GIL is released while it
runs, so that several threads average at once.

``WeightedSum.average`` does it all for a stack of slices (one row per
input), a block of 2048 elements at a time so that the float64 partial sums
stay in the L1 cache. ``add`` and ``round_into`` are its two halves for
callers that hold a whole float64 sum (inputs decoded one at a time).
Summation order is the inputs' order, each product rounded before it is
added, as numpy and the float64 reference compute it.

Rounding to a 16-bit format works on the float64 bits: adding half an ulp of
the target precision (less one, plus the kept lowest bit: ties go to even)
and truncating rounds once, and a carry runs into the exponent as it should,
up to infinity beyond the format's range. Elements below the format's
smallest normal (its subnormals, where the precision shrinks), and NaN and
infinities, take a second, exact pass. numba caches the compiled code beside
this module (or in its user cache when that is read-only), so only the first
use on a machine compiles (a few seconds per stored dtype).
"""

import functools
import threading

import numba
import numpy as np
import torch
from numba import types
from numba.extending import overload

from caiman_asr_train.export.sharded_averaging import STACK_BYTES, storage_dtype

__all__ = ["WeightedSum", "thread_stack"]

_BLOCK = 2048  # elements summed at a time: their float64 sums (16 KiB) stay in the L1 cache


def _compile(func):
    """``numba.njit`` with numba's on-disk cache, or without it where no cache directory is writable
    (a read-only install and home: numba refuses to cache there, and each process compiles)."""
    try:
        return numba.njit(nogil=True, cache=True)(func)
    except RuntimeError:
        return numba.njit(nogil=True)(func)


_U = np.uint64

# (stored mantissa bits, exponent bias) of the 16-bit formats rounded on the float64 bits
_FORMATS = {torch.bfloat16: (7, 127), torch.float16: (10, 15)}


def _widen(x, table):
    """One stored element as float64 (exact)."""


@overload(_widen, jit_options={"nogil": True})
def _widen_for(x, table):
    if isinstance(x, types.Float):
        return lambda x, table: np.float64(x)
    if isinstance(table, types.NoneType):  # bfloat16: the high half of a float32
        return lambda x, table: np.float64(np.uint32(np.uint32(x) << np.uint32(16)).view(np.float32))
    return lambda x, table: table[x]  # float16: its 65536 values, looked up


def _round_block(total, out, mantissa, bias):
    """``out[:] = total`` rounded once to nearest even in the stored format; whether ``total`` is finite."""


@overload(_round_block, jit_options={"nogil": True})
def _round_block_for(total, out, mantissa, bias):
    if isinstance(out.dtype, types.Float):
        return _cast_floats
    return _round_bits


def _cast_floats(total, out, mantissa, bias):
    finite = True
    for j in range(out.size):
        finite &= np.isfinite(total[j])
        out[j] = total[j]  # LLVM's float64 -> float32 conversion rounds once, to nearest even
    return finite


def _round_bits(total, out, mantissa, bias):
    bits = total.view(np.uint64)
    drop = _U(52 - mantissa)  # float64 mantissa bits the format does not keep
    half = (_U(1) << (drop - _U(1))) - _U(1)
    magnitude = (_U(1) << _U(11 + mantissa)) - _U(1)
    rebias = _U(1023 - bias) << _U(mantissa)
    lowest = _U(1023 - bias + 1)  # float64 exponent field of the format's smallest normal
    highest = _U(1023 + bias)  # and of its largest finite binade
    special = False
    for j in range(out.size):  # no branches: the loop runs on vector registers
        b = bits[j]
        rounded = (b + ((b >> drop) & _U(1)) + half) >> drop
        exponent = (b >> _U(52)) & _U(0x7FF)
        out[j] = np.uint16(((b >> _U(63)) << _U(15)) | (((rounded & magnitude) - rebias) & _U(0x7FFF)))
        special |= (exponent < lowest) | (exponent > highest)
    if not special:
        return True
    finite = True
    infinity = np.uint16((2 * bias + 1) << mantissa)
    scale = 2.0 ** (bias - 1 + mantissa)  # the format's smallest subnormal becomes 1
    for j in range(out.size):
        b = bits[j]
        exponent = np.int64((b >> _U(52)) & _U(0x7FF))
        sign = np.uint16((b >> _U(63)) << _U(15))
        if exponent == 0x7FF:
            finite = False
        elif exponent > 1023 + bias:
            out[j] = sign | infinity
        elif exponent < 1023 - bias + 1:
            # a multiple of the smallest subnormal, rounded to nearest even (exact: the scaling is a power of 2);
            # the largest result, 2**mantissa, is the bits of the smallest normal
            out[j] = sign | np.uint16(np.int64(np.rint(abs(total[j]) * scale)))
    return finite


@_compile
def _add(total, piece, weight, first, table):
    if first:
        for j in range(piece.size):
            total[j] = weight * _widen(piece[j], table)
    else:
        for j in range(piece.size):
            total[j] += weight * _widen(piece[j], table)


@_compile
def _round(total, out, mantissa, bias):
    return _round_block(total, out, mantissa, bias)


@_compile
def _average(stack, weights, table, out, mantissa, bias):
    inputs, n = stack.shape
    sums = np.empty(_BLOCK, np.float64)
    finite = True
    for start in range(0, n, _BLOCK):
        stop = min(n, start + _BLOCK)
        block = sums[: stop - start]
        for i in range(inputs):
            _add(block, stack[i, start:stop], weights[i], i == 0, table)
        finite &= _round_block(block, out[start:stop], mantissa, bias)
    return finite


class WeightedSum:
    """Float64 weighted sums of one floating dtype's stored bits (``storage_dtype``), rounded once."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.storage = storage_dtype(dtype)
        self._format = _FORMATS.get(dtype, (0, 0))
        self._table = _float16_values() if dtype == torch.float16 else None

    def average(self, out: np.ndarray, stack: np.ndarray, weights: np.ndarray) -> bool:
        """``out[:] = round(sum_i weights[i] * stack[i])``; whether every sum is finite.

        ``stack`` is (inputs, n) C-contiguous stored bits, ``weights`` float64, ``out`` n stored bits.
        A sum beyond the format's range rounds to infinity and counts as finite; a NaN or an
        infinity in an input with a non-zero weight does not.
        """
        return bool(_average(stack, weights, self._table, out, *self._format))

    def add(self, total: np.ndarray, piece: np.ndarray, weight: float, first: bool) -> None:
        """``total += weight * piece`` in float64 (``=`` when ``first``)."""
        _add(total, piece, float(weight), bool(first), self._table)

    def round_into(self, out: np.ndarray, total: np.ndarray) -> bool:
        """``out[:] = round(total)`` in ``out``'s stored bits; whether ``total`` is finite."""
        return bool(_round(total, out, *self._format))


@functools.lru_cache(maxsize=1)
def _float16_values() -> np.ndarray:
    """The float64 value of each of the 65536 float16 bit patterns (read-only, shared by every thread)."""
    table = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float64)
    table.flags.writeable = False
    return table


_stacks = threading.local()


def thread_stack(storage: np.dtype, inputs: int, n: int) -> np.ndarray:
    """This thread's reused stack of ``storage`` elements, shaped (``inputs``, ``n``): a slice of
    every input, read into its rows for ``WeightedSum.average``.

    Its buffer holds ``STACK_BYTES``, more only when the caller's stack is larger (DCP's
    ``READ_BYTES``) or one slice is longer (a row of a tensor longer than a slice), so memory is
    the same whatever the number of inputs.
    """
    buffers = _stacks.__dict__.setdefault("by_storage", {})
    buffer = buffers.get(storage)
    if buffer is None or buffer.size < inputs * n:
        buffer = buffers[storage] = np.empty(max(inputs * n, STACK_BYTES // storage.itemsize), storage)
    return buffer[: inputs * n].reshape(inputs, n)
