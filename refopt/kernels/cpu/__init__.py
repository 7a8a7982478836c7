"""The Numba CPU backend: the ops namespace of :mod:`refopt.ops` with compiled kernels swapped in.

Every name here has the signature of the NumPy op of the same name.  Ops without a kernel of their
own (the backwards of linear maps and attention, which are BLAS products) are the NumPy ones.
Kernels: decode-sized and quantised matrix products with fused bias/ReLU epilogues
(:mod:`.matmul`), fused-softmax attention (:mod:`.attention`), LayerNorm forward and backward
(:mod:`.layernorm`), softmax cross-entropy forward and backward (:mod:`.loss`), embedding gather and
scatter-add (:mod:`.embedding`), the samplers' selection steps (:mod:`.sampling`), Adam's update
(:mod:`.optim`) and, beyond the NumPy namespace, ``decode_step``: one whole decode step compiled
(:mod:`.decode`), and ``decode_greedy``: several greedy steps in one compiled call.  Thread
counts: :mod:`._threads`; compiling in the background while the NumPy
ops serve: :func:`warm_up` (:mod:`.warmup`).
"""

import functools

# first, before any kernel is decorated: the cache's stamps cover the whole package (see _cache)
from refopt.kernels.cpu import _cache  # noqa: F401  (installs its locators on import)
import refopt.ops as _reference
from refopt.ops import (  # noqa: F401  (NumPy ops reused as they are)
    accuracy, add, attention_backward, attention_mask, descending_order, dropout_backward, dropout_forward,
    dropout_mask, lm_head_backward, linear_backward, linear_backward_input, log_softmax, lora_backward,
    lora_forward, lora_merge, merge_heads, relu_backward, relu_forward, softmax, softmax_backward,
    split_heads)
from refopt.kernels.cpu import _threads, warmup
from refopt.kernels.cpu import attention as _attention, decode as _decode, embedding as _embedding
from refopt.kernels.cpu import layernorm as _layernorm, loss as _loss, optim as _optim, sampling as _sampling
from refopt.kernels.cpu._threads import beside_blas
from refopt.kernels.cpu.matmul import matmul_rows

NAME = "numba"
_threads.configure()


def _compiled(fn, rows=None, reference=None):
    """The op ``fn``: the NumPy op of its name while a background compilation runs
    (:mod:`.warmup`), and on one thread when its input is prefill- or training-sized and
    OpenBLAS's workers may be spinning (``rows(*args)`` rows; :mod:`._threads`)."""
    stand_in = reference or getattr(_reference, fn.__name__)

    @functools.wraps(fn)
    def op(*args, **kwargs):
        if warmup.busy():
            return stand_in(*args, **kwargs)
        if rows is None:
            return fn(*args, **kwargs)
        with beside_blas(rows(*args)):
            return fn(*args, **kwargs)
    return op


def _rows_of(a):
    return a.size // max(a.shape[-1], 1)


layernorm_forward = _compiled(_layernorm.layernorm_forward, lambda x, *_: _rows_of(x))
layernorm_backward = _compiled(_layernorm.layernorm_backward, lambda d_y, *_: _rows_of(d_y))
cross_entropy_forward = _compiled(_loss.cross_entropy_forward, lambda logits, *_: _rows_of(logits))
cross_entropy_backward = _compiled(_loss.cross_entropy_backward, lambda d_ce, probs, *_: _rows_of(probs))
attention_forward = _compiled(_attention.attention_forward, lambda q, *_: q.shape[0] * q.shape[2])
embedding_forward = _compiled(_embedding.embedding_forward)
embedding_backward = _compiled(_embedding.embedding_backward, lambda d_out, *_: _rows_of(d_out))
adam_update = _compiled(_optim.adam_update)
choose = _compiled(_sampling.choose)
min_p_distribution = _compiled(_sampling.min_p_distribution)
top_k_mask = _compiled(_sampling.top_k_mask)
top_p_distribution = _compiled(_sampling.top_p_distribution)
uniform = _compiled(_sampling.uniform)
decode_step = _compiled(_decode.decode_step, reference=lambda *args, **kwargs: None)
decode_greedy = _compiled(_decode.decode_greedy, reference=lambda *args, **kwargs: None)


def _linear(x, w, b, relu):
    I = x.shape[-1]
    y = matmul_rows(x.reshape(-1, I), w, b, relu)                          # [N, O]
    return y.reshape(x.shape[:-1] + (y.shape[-1],))


@_compiled
def linear_forward(x, w, b=None):
    # x [..., I], w [O, I] (float or QuantizedMatrix), b [O] | None -> [..., O]
    return _linear(x, w, b, False)


@_compiled
def linear_relu_forward(x, w, b=None):
    # relu(x @ w.T + b) with the bias and ReLU fused into the product's epilogue
    return _linear(x, w, b, True)


@_compiled
def lm_head_forward(x, table):
    # x [B, S, E], table [V, E] (float or QuantizedMatrix) -> logits [B, S, V]
    E = x.shape[-1]
    y = matmul_rows(x.reshape(-1, E), table)
    return y.reshape(x.shape[:-1] + (y.shape[-1],))


def warm_up(exercise):
    """Compile (or load from Numba's cache) the kernels ``exercise()`` calls, on a background
    thread, the NumPy ops serving every other thread meanwhile; returns the
    :class:`.warmup.Warmup` (``.running``, ``.wait()``)."""
    return warmup.start(exercise)
