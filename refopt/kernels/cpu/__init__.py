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
    accuracy, attention_backward, attention_mask, descending_order, dropout_backward, dropout_forward, dropout_mask,
    lm_head_backward, linear_backward, log_softmax, merge_heads, relu_backward, relu_forward, softmax,
    softmax_backward, split_heads)
from refopt.kernels.cpu.attention import attention_forward  # noqa: F401
from refopt.kernels.cpu.embedding import embedding_backward, embedding_forward  # noqa: F401
from refopt.kernels.cpu.layernorm import layernorm_backward, layernorm_forward  # noqa: F401
from refopt.kernels.cpu.loss import cross_entropy_backward, cross_entropy_forward  # noqa: F401
from refopt.kernels.cpu.matmul import matmul_rows
from refopt.kernels.cpu.sampling import (  # noqa: F401
    choose, min_p_distribution, top_k_mask, top_p_distribution, uniform)

NAME = "numba"


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
