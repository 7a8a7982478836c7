"""The CUDA backend (``backend="cuda"``): the ops namespace of :mod:`refopt.ops` with ``numba.cuda``
kernels underneath, plus the device-resident decode loop (:mod:`.decode`).

Every name here has the signature of the NumPy op of the same name and takes and returns NumPy
arrays: each call copies its operands to the GPU, runs the kernels and copies the result back.
That keeps :func:`refopt.model.forward` and :func:`refopt.backward.backward` unchanged on this
backend, at the price of the transfers.  Two device-resident paths skip them: ``fit``,
``evaluate`` and ``predict`` run :class:`refopt.training.device.DeviceTrainer` (parameters,
gradients, Adam state and activations on the GPU, the step replayed as a CUDA graph), and
generation with greedy, random, top-k, top-p and min-p sampling runs the persistent decode kernel
(:mod:`.decode`, driven from :mod:`refopt.device_decoding`; its stages :mod:`.decode_stages`, its
products :mod:`.decode_products`): weights, cache and tokens stay on the GPU.

Kernels: tiled matrix products with bias/ReLU/residual/dropout epilogues and split-K (:mod:`.gemm`),
flash attention (:mod:`.attention`) and its flash-style backward (:mod:`.flash_backward`),
LayerNorm, softmax, cross-entropy, embeddings and Adam (:mod:`.rows`), the training step's fused
kernels (:mod:`.fused`), the samplers' selection rules (:mod:`.sampling`).

``attention_forward`` returns the probabilities as a :class:`.attention.LazyProbs`: the flash
kernel never forms them, and they are rebuilt from its row statistics when ``attention_backward``
(or ``np.asarray``) asks for them.
"""

import numpy as np

from refopt.ops import (  # noqa: F401  (NumPy ops reused as they are: reshapes, masks, cheap maps)
    accuracy, add, attention_mask, descending_order, dropout_backward, dropout_forward, dropout_mask,
    linear_backward_input, log_softmax, lora_backward, lora_forward, lora_merge, merge_heads,
    relu_backward, relu_forward, softmax, softmax_backward, split_heads)
from refopt.kernels.cuda import attention as _attn
from refopt.kernels.cuda import gemm as _gemm
from refopt.kernels.cuda import rows as _rows
from refopt.kernels.cuda._common import empty, host, to_device
from refopt.kernels.cuda.sampling import (  # noqa: F401
    choose, min_p_distribution, top_k_mask, top_p_distribution, uniform)

NAME = "cuda"


def _float(w):
    from refopt.quant import QuantizedMatrix

    return w.rows_float32() if isinstance(w, QuantizedMatrix) else np.asarray(w)


def _dtype(*arrays):
    return np.result_type(*[a.dtype for a in arrays if a is not None])


# ----------------------------------------------------------------------------- linear maps
def _linear(x, w, b, relu):
    x, w = np.asarray(x), _float(w)
    dt = _dtype(x, w)
    I = x.shape[-1]
    y = _gemm.gemm(to_device(x.reshape(-1, I), dt), to_device(w, dt), "nt",
                   bias=None if b is None else to_device(b, dt), relu=relu)
    return host(y).reshape(x.shape[:-1] + (w.shape[0],))


def linear_forward(x, w, b=None):
    # x [..., I], w [O, I], b [O] | None -> [..., O]
    return _linear(x, w, b, False)


def linear_relu_forward(x, w, b=None):
    # relu(x @ w.T + b), bias and ReLU in the product's epilogue
    return _linear(x, w, b, True)


def lm_head_forward(x, table):
    # x [B, S, E], table [V, E] -> logits [B, S, V]
    return _linear(x, table, None, False)


def linear_backward(d_y, x, w, has_bias=True):
    # d_y [..., O], x [..., I], w [O, I] -> d_x [..., I], d_w [O, I], d_b [O] | None
    x, w, d_y = np.asarray(x), np.asarray(w), np.asarray(d_y)
    dt = _dtype(d_y, x, w)
    O, I = w.shape
    g = to_device(d_y.reshape(-1, O), dt)
    d_x = _gemm.gemm(g, to_device(w, dt), "nn")                             # [N, I]
    d_w = _gemm.gemm(g, to_device(x.reshape(-1, I), dt), "tn")              # [O, I]
    d_b = host(_rows.sum_rows(g)) if has_bias else None
    return host(d_x).reshape(x.shape[:-1] + (I,)), host(d_w), d_b


def lm_head_backward(d_logits, x, table):
    # d_logits [B, S, V], x [B, S, E], table [V, E] -> d_x [B, S, E], d_table [V, E]
    d_x, d_table, _ = linear_backward(d_logits, x, table, has_bias=False)
    return d_x, d_table


# ----------------------------------------------------------------------------- embeddings
def embedding_forward(table, ids):
    # table [V, E], ids [B, S] -> [B, S, E]
    from refopt.quant import QuantizedMatrix

    ids = np.asarray(ids)
    if isinstance(table, QuantizedMatrix):
        return table[ids]
    table = np.asarray(table)
    out = _rows.gather(to_device(table), to_device(ids.reshape(-1), np.int64))
    return host(out).reshape(ids.shape + (table.shape[1],))


def embedding_backward(d_out, ids, num_rows):
    # d_out [B, S, E], ids [B, S] -> d_table [num_rows, E] (each row summed in token order)
    d_out = np.asarray(d_out)
    E = d_out.shape[-1]
    d_table = to_device(np.zeros((num_rows, E), d_out.dtype))
    _rows.scatter_add(to_device(d_out.reshape(-1, E)), ids, d_table)
    return host(d_table)


# ----------------------------------------------------------------------------- LayerNorm
def layernorm_forward(x, gamma, beta, eps):
    # x [..., D] -> y [..., D]
    x = np.asarray(x)
    D = x.shape[-1]
    dt = x.dtype
    y = _rows.layernorm(to_device(x.reshape(-1, D)), None if gamma is None else to_device(gamma, dt),
                        None if beta is None else to_device(beta, dt), eps)
    return host(y).reshape(x.shape)


def layernorm_backward(d_y, x, gamma, eps):
    # d_y, x [..., D] -> d_x [..., D], d_gamma [D] | None, d_beta [D]
    x = np.asarray(x)
    D = x.shape[-1]
    dt = x.dtype
    d_x, d_gamma, d_beta = _rows.layernorm_backward(
        to_device(np.asarray(d_y).reshape(-1, D), dt), to_device(x.reshape(-1, D)),
        None if gamma is None else to_device(gamma, dt), eps)
    return host(d_x).reshape(x.shape), (None if d_gamma is None else host(d_gamma)), host(d_beta)


# ----------------------------------------------------------------------------- loss
def cross_entropy_forward(logits, targets):
    # logits [B, S, V], targets [B, S] -> ce [B, S], probs [B, S, V]
    logits = np.asarray(logits)
    V = logits.shape[-1]
    ce, probs = _rows.cross_entropy(to_device(logits.reshape(-1, V)),
                                    to_device(np.asarray(targets).reshape(-1), np.int64))
    return host(ce).reshape(logits.shape[:-1]), host(probs).reshape(logits.shape)


def cross_entropy_backward(d_ce, probs, targets):
    # d_ce [B, S], probs [B, S, V], targets [B, S] -> d_logits [B, S, V]
    probs = np.asarray(probs)
    V = probs.shape[-1]
    out = _rows.cross_entropy_backward(to_device(np.asarray(d_ce).reshape(-1), probs.dtype),
                                       to_device(probs.reshape(-1, V)),
                                       to_device(np.asarray(targets).reshape(-1), np.int64))
    return host(out).reshape(probs.shape)


# ----------------------------------------------------------------------------- attention
def attention_forward(q, k, v, mask):
    # q [B, H, S, K] (scaled), k, v [B, H, T, K], mask [B, 1, S, T] -> out [B, H, S, K],
    # probs [B, H, S, T] (a LazyProbs: rebuilt from the flash kernel's row statistics on demand)
    q, k, v = (np.asarray(a) for a in (q, k, v))
    dt = _dtype(q, k, v)
    B, H, S, K = q.shape
    T = k.shape[2]
    qd, kd, vd = (to_device(np.ascontiguousarray(a), dt) for a in (q, k, v))
    md = to_device(np.ascontiguousarray(np.broadcast_to(mask, (B, 1, S, T))[:, 0], dtype=np.uint8))
    out = empty(B * H * S * K, dt)
    m, l = empty(B * H * S, dt), empty(B * H * S, dt)
    _attn.flash_attention(qd.reshape(-1), kd.reshape(-1), vd.reshape(-1), out,
                          (H * S * K, S * K, K), (H * T * K, T * K, K), (H * T * K, T * K, K),
                          (H * S * K, S * K, K), B, H, S, T, K, mask=md, stats=(m, l))
    probs = _attn.LazyProbs(qd, kd, md, m, l, (B, H, S, T), dt)
    return host(out).reshape(B, H, S, K), probs


def attention_backward(d_out, q, k, v, probs, mask):
    # -> d_q [B, H, S, K], d_k, d_v [B, H, T, K] (the reference's products, batched on the GPU)
    q, k, v, d_out = (np.asarray(a) for a in (q, k, v, d_out))
    dt = _dtype(q, k, v, d_out)
    B, H, S, K = q.shape
    T = k.shape[2]
    pd = probs.device() if isinstance(probs, _attn.LazyProbs) else to_device(np.asarray(probs), dt)
    md = to_device(np.ascontiguousarray(np.broadcast_to(mask, (B, 1, S, T))[:, 0], dtype=np.uint8))
    d_q, d_k, d_v = _attn.attention_backward_device(
        *(to_device(np.ascontiguousarray(a), dt) for a in (d_out, q, k, v)), pd, md)
    return host(d_q), host(d_k), host(d_v)


# ----------------------------------------------------------------------------- optimizer
def adam_update(var, grad, m, v, v_hat, decay, beta_1, beta_2, alpha, epsilon):
    """In place, on host arrays: weight decay and the Adam step (``refopt.optimizers.Adam``'s
    arithmetic, operation for operation) run on the GPU, the results copied back."""
    dt = var.dtype
    arrays = [to_device(a.reshape(-1), dt) for a in (var, m, v)]
    vh = None if v_hat is None else to_device(v_hat.reshape(-1), dt)
    _rows.adam_device(arrays[0], to_device(np.asarray(grad).reshape(-1), dt), arrays[1], arrays[2], vh,
                      decay, beta_1, beta_2, alpha, epsilon)
    for dev, h in zip(arrays + ([vh] if vh is not None else []), (var, m, v) + ((v_hat,) if vh is not None else ())):
        h.reshape(-1)[...] = dev.copy_to_host()
