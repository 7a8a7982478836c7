"""The Numba CPU backend: the ops namespace of :mod:`refopt.ops` with compiled kernels swapped in.

Every name here has the signature of the NumPy op of the same name.  Ops without a kernel of their
own (the backwards of linear maps and attention, which are BLAS products) are the NumPy ones.
Kernels: decode-sized and quantised matrix products with fused bias/ReLU epilogues
(:mod:`.matmul`), fused-softmax attention (:mod:`.attention`), LayerNorm forward and backward
(:mod:`.layernorm`), softmax cross-entropy forward and backward (:mod:`.loss`), embedding gather and
scatter-add (:mod:`.embedding`), and the samplers' selection steps (:mod:`.sampling`).
"""

import numpy as np

from refopt.ops import (  # noqa: F401  (NumPy ops reused as they are)
    accuracy, add, attention_backward, attention_mask, descending_order, dropout_backward, dropout_forward, dropout_mask,
    lm_head_backward, linear_backward, linear_backward_input, log_softmax, lora_backward, lora_forward,
    lora_merge, merge_heads, relu_backward, relu_forward, softmax, softmax_backward, split_heads)
import functools

from refopt.kernels.cpu import attention as _attention, embedding as _embedding, layernorm as _layernorm
from refopt.kernels.cpu import loss as _loss
from refopt.kernels.cpu._threads import beside_blas
from refopt.kernels.cpu.embedding import embedding_forward  # noqa: F401
from refopt.kernels.cpu.matmul import matmul_rows
from refopt.kernels.cpu.sampling import (  # noqa: F401
    choose, min_p_distribution, top_k_mask, top_p_distribution, uniform)

NAME = "numba"


def _rows_of(a):
    return a.size // max(a.shape[-1], 1)


def _beside_blas(fn, rows):
    # ``fn`` on one thread when its input is prefill- or training-sized and OpenBLAS's workers
    # may be spinning (see :mod:`refopt.kernels.cpu._threads`)
    @functools.wraps(fn)
    def run(*args):
        with beside_blas(rows(*args)):
            return fn(*args)
    return run


layernorm_forward = _beside_blas(_layernorm.layernorm_forward, lambda x, *_: _rows_of(x))
layernorm_backward = _beside_blas(_layernorm.layernorm_backward, lambda d_y, *_: _rows_of(d_y))
cross_entropy_forward = _beside_blas(_loss.cross_entropy_forward, lambda logits, *_: _rows_of(logits))
cross_entropy_backward = _beside_blas(_loss.cross_entropy_backward, lambda d_ce, probs, *_: _rows_of(probs))
attention_forward = _beside_blas(_attention.attention_forward, lambda q, *_: q.shape[0] * q.shape[2])
embedding_backward = _beside_blas(_embedding.embedding_backward, lambda d_out, *_: _rows_of(d_out))


def _linear(x, w, b, relu):
    I = x.shape[-1]
    y = matmul_rows(x.reshape(-1, I), w, b, relu)                          # [N, O]
    return y.reshape(x.shape[:-1] + (y.shape[-1],))


def linear_forward(x, w, b=None):
    # x [..., I], w [O, I] (float or QuantizedMatrix), b [O] | None -> [..., O]
    return _linear(x, w, b, False)


def linear_relu_forward(x, w, b=None):
    # relu(x @ w.T + b) with the bias and ReLU fused into the product's epilogue
    return _linear(x, w, b, True)


def lm_head_forward(x, table):
    # x [B, S, E], table [V, E] (float or QuantizedMatrix) -> logits [B, S, V]
    E = x.shape[-1]
    y = matmul_rows(x.reshape(-1, E), table)
    return y.reshape(x.shape[:-1] + (y.shape[-1],))
