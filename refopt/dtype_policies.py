"""Dtype policies as KerasHub means them, with its reduced-precision arithmetic emulated.

A policy names two dtypes (Keras's ``DTypePolicy``): the *variable* dtype weights are kept in and the
*compute* dtype activations are computed in.

    policy            variables   compute
    "float32"         float32     float32     (the default)
    "float64"         float64     float64     (refopt's own, for the oracle)
    "bfloat16"        bfloat16    bfloat16
    "float16"         float16     float16
    "mixed_bfloat16"  float32     bfloat16
    "mixed_float16"   float32     float16

Under a half-precision compute dtype, refopt computes each op in float32 (NumPy or Numba) and rounds
its result to the compute dtype exactly where KerasHub's OPT layers round (JAX backend; found by
running KerasHub layer by layer and matching every intermediate bit for bit, see
``benchmarks/dtype_policy_agreement.py``):

* embeddings: the token and position rows (kernels autocast to the compute dtype), their sum;
* Dense / EinsumDense (q, k, v, out, fc1, fc2): the product of the rounded input and the rounded
  kernel, accumulated in float32, rounded; then the bias added and rounded again (two roundings);
  ReLU is exact;
* LayerNorm: computed in float32 from the rounded input with the float32 gamma and beta (Keras
  does not autocast them), the output rounded;
* attention with dropout > 0 (KerasHub's OPT default, Keras's explicit path): the rounded query
  times the rounded scale ``1/sqrt(K)``, rounded; scores ``q . k`` rounded; masked scores set to the
  compute dtype's large negative (-1e9 bfloat16, -3e4 float16); the softmax in the compute dtype
  (``x - max`` rounded, ``exp`` rounded, the sum accumulated in float32 then rounded, and the
  quotient rounded -- XLA divides bfloat16 but multiplies float16 by a rounded reciprocal);
  masked probabilities zeroed; ``p . v`` rounded;
* attention with dropout 0 (``jax.nn.dot_product_attention``): scores ``(q . k) * scale`` and the
  softmax in float32, the probabilities rounded, ``p . v`` rounded;
* residual sums rounded (``ops.add``); the tied LM head ``h . E^T`` rounded.

Arrays inside refopt stay float32 holding values exactly representable in the compute dtype;
the public outputs (``backbone(...)``, ``predict``) are converted to it: ``numpy.float16``, and
bfloat16 as ``ml_dtypes.bfloat16`` when ml_dtypes is installed (float32 otherwise, with the same
values).  The backward pass runs in float32 on the rounded activations (Keras differentiates in the
compute dtype), and variables of a half-precision *variable* dtype are stored as float32 holding
its values (:meth:`DTypePolicy.round_variable`).
"""

from __future__ import annotations

import dataclasses
import functools
from types import SimpleNamespace

import numpy as np

from refopt.errors import ConfigError

_POLICIES = {"float32": ("float32", "float32"), "float64": ("float64", "float64"),
             "bfloat16": ("bfloat16", "bfloat16"), "float16": ("float16", "float16"),
             "mixed_bfloat16": ("float32", "bfloat16"), "mixed_float16": ("float32", "float16")}
NAMES = tuple(_POLICIES)
HALF = ("bfloat16", "float16")


# ---------------------------------------------------------------------------------- rounding
def round_to(x, dtype: str):
    """``x`` as float32 holding the nearest values of ``dtype`` (``"bfloat16"``/``"float16"``,
    round to nearest even; NaN stays NaN, overflow goes to +-inf); float32/float64 unchanged."""
    if dtype == "float16":
        with np.errstate(over="ignore"):
            return np.asarray(x, np.float32).astype(np.float16).astype(np.float32)
    if dtype != "bfloat16":
        return x
    x = np.asarray(x, np.float32)
    bits = np.ascontiguousarray(x).view(np.uint32)
    rounded = ((bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))))
               & np.uint32(0xFFFF0000)).view(np.float32)
    return np.where(np.isnan(x), x, rounded).reshape(x.shape)


def to_public(x, dtype: str):
    """An array of ``dtype`` for callers: float16 natively, bfloat16 as ``ml_dtypes.bfloat16``
    when installed (else the float32 array, whose values are bfloat16's)."""
    if dtype == "float16":
        return np.asarray(x).astype(np.float16)
    if dtype == "bfloat16":
        try:
            import ml_dtypes
        except ImportError:
            return x
        return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16)
    return x


def standardize(dtype) -> str:
    """A dtype's name (``numpy.float16`` -> ``"float16"``, ``ml_dtypes.bfloat16`` -> ``"bfloat16"``)."""
    return np.dtype(dtype).name


# ---------------------------------------------------------------------------------- policies
@dataclasses.dataclass(frozen=True)
class DTypePolicy:
    """Keras's ``DTypePolicy``: ``name``, ``compute_dtype``, ``variable_dtype``."""

    name: str = "float32"

    def __post_init__(self):
        if self.name not in _POLICIES:
            raise ConfigError(f"dtype={self.name!r}: expected a dtype policy, one of {NAMES}")

    @property
    def variable_dtype(self) -> str:
        return _POLICIES[self.name][0]

    @property
    def compute_dtype(self) -> str:
        return _POLICIES[self.name][1]

    @property
    def array_dtype(self) -> str:
        """The NumPy dtype refopt's arrays have under this policy (float64 or float32)."""
        return "float64" if self.name == "float64" else "float32"

    @property
    def reduced(self) -> bool:
        """Whether activations are computed in a half-precision dtype (emulated)."""
        return self.compute_dtype in HALF

    @staticmethod
    def standardize(dtype) -> str:
        return standardize(dtype)

    def round_variable(self, x):
        """``x`` rounded to the variable dtype (stored as float32)."""
        return round_to(x, self.variable_dtype)

    def serialize(self) -> dict:
        return {"module": "keras", "class_name": "DTypePolicy", "config": {"name": self.name},
                "registered_name": None}


def get(value) -> DTypePolicy:
    """A policy from None (``"float32"``), a name, a serialized Keras policy or a policy."""
    if value is None:
        return DTypePolicy("float32")
    if isinstance(value, DTypePolicy):
        return value
    if isinstance(value, dict):
        if value.get("class_name", "DTypePolicy") != "DTypePolicy":
            raise ConfigError(f"dtype: a Keras {value.get('class_name')!r} is not supported; refopt "
                              f"takes a DTypePolicy name, one of {NAMES} (quantised weights: "
                              "from_preset(weights_dtype=...) or backbone.quantize(...))")
        value = (value.get("config") or {}).get("name")
    if isinstance(value, str):
        return DTypePolicy(value)
    raise ConfigError(f"dtype={value!r}: expected a policy name, one of {NAMES}")


# ---------------------------------------------------------------------------------- the ops
def ops_for(policy, base, fused_attention: bool):
    """The ops namespace ``base`` (:mod:`refopt.ops` or a backend's) with ``policy``'s rounding
    (see the module docstring); ``base`` itself for float32/float64.  ``fused_attention``:
    KerasHub's attention path, taken when the model's dropout is 0."""
    policy = get(policy)
    if not policy.reduced:
        return base
    return _rounded_ops(base, policy.compute_dtype, bool(fused_attention))


@functools.lru_cache(maxsize=None)
def _rounded_ops(base, dtype: str, fused_attention: bool):
    R = functools.partial(round_to, dtype=dtype)

    def embedding_forward(table, ids):
        # the rows, autocast to the compute dtype
        return R(base.embedding_forward(table, ids))

    def linear_forward(x, w, b=None):
        # rounded input times rounded kernel, rounded; plus the rounded bias, rounded again
        y = R(base.linear_forward(x, R(np.asarray(w)), None))
        return y if b is None else R(y + R(b))

    def linear_relu_forward(x, w, b=None):
        return np.maximum(linear_forward(x, w, b), 0)

    def layernorm_forward(x, gamma, beta, eps):
        # float32 inside, from the rounded input, float32 gamma and beta; the output rounded
        return R(base.layernorm_forward(x, gamma, beta, eps))

    def lm_head_forward(x, table):
        return R(base.lm_head_forward(x, R(np.asarray(table))))

    def add(x, y):
        return R(x + y)

    def dropout_forward(x, keep):
        return R(base.dropout_forward(x, keep))

    def attention_forward(q, k, v, mask):
        # q [B, H, S, K] arrives scaled by 1/sqrt(K) in float32 (refopt.model); the query KerasHub
        # holds is the rounded, unscaled one, and round(q / scale) gives it back exactly (q was one
        # float32 rounding away from query * scale, far below half a unit of the compute dtype)
        scale = q.shape[-1] ** -0.5
        query = R(q / np.float32(scale))
        if fused_attention:       # jax.nn.dot_product_attention: float32 scores and softmax
            scores = (query @ k.transpose(0, 1, 3, 2)) * np.float32(scale)        # [B, H, S, T]
            scores = np.where(mask, scores, np.float32(-0.7 * np.finfo(np.float32).max))
            e = np.exp(scores - scores.max(axis=-1, keepdims=True))
            probs = R(e / e.sum(axis=-1, keepdims=True))
        else:                     # Keras's explicit path: the softmax in the compute dtype
            scores = R(R(query * R(np.float32(scale))) @ k.transpose(0, 1, 3, 2))  # [B, H, S, T]
            large_negative = R(np.float32(-3e4 if dtype == "float16" else -1e9))
            scores = np.where(mask, scores, large_negative)
            e = R(np.exp(R(scores - scores.max(axis=-1, keepdims=True))))
            total = R(e.sum(axis=-1, keepdims=True, dtype=np.float32))
            probs = R(e * R(np.float32(1) / total)) if dtype == "float16" else R(e / total)
            probs = np.where(mask, probs, np.float32(0))
        return R(probs @ v), probs

    # every op of ``base`` but its compiled decode step and greedy loop (float32 throughout, no
    # rounding)
    names = {name: getattr(base, name) for name in dir(base)
             if not name.startswith("_") and name not in ("decode_step", "decode_greedy")}
    names.update(embedding_forward=embedding_forward, linear_forward=linear_forward,
                 linear_relu_forward=linear_relu_forward, layernorm_forward=layernorm_forward,
                 lm_head_forward=lm_head_forward, add=add, dropout_forward=dropout_forward,
                 attention_forward=attention_forward, NAME=f"{getattr(base, 'NAME', 'numpy')}+{dtype}")
    return SimpleNamespace(**names)
