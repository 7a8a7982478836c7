"""The base ``Sampler``: KerasHub's protocol and decoding loop, with reproducible randomness.

Protocol (KerasHub's)::

    sampler(next, prompt, cache=None, index=0, mask=None, stop_token_ids=None,
            hidden_states=None, model=None) -> token ids [B, T]

``next(prompt, cache, index) -> (logits [B, V], hidden_states [B, E], cache)`` gives the model's
distribution for position ``index`` (it feeds the token at ``index - 1``).  The loop starts at
``index`` (the shortest prompt's length), writes one token per step and stops at ``T =
prompt.shape[1]`` or, with ``stop_token_ids``, once every row has produced a stop token at a
position that was not part of its prompt.  Where ``mask`` is True the prompt's own token is kept
(rows with longer prompts keep their prompt).  Each step:

    logits -> logits processors (repetition penalty, n-gram ban, ...)
           -> compute_probabilities(logits)   softmax(logits / temperature)
           -> get_next_token(probabilities)

Subclasses override ``get_next_token(probabilities)`` (as in KerasHub) or, to be usable as the
``base_sampler`` of speculative decoding, ``next_token_distribution(probabilities)``: the
distribution a token is drawn from (zero outside the sampler's support).  The base
``get_next_token`` draws from that distribution with :func:`refopt.philox.choose` and a Philox
uniform keyed by ``(the row's seed, index)``, so a choice depends only on those and on the
probabilities.

Ops: the selection steps (top-k mask, top-p cut, the draw) run on the ops namespace of the model
being decoded (``model.backbone.ops``, passed to the loop with ``model``), so a model pinned to a
backend samples on it; outside a loop, on the current backend (:func:`refopt.backend.ops`).

Seeds, per request (as vLLM's): every row has its own seed, and a row's tokens depend only on its
prompt, its seed and the model -- not on its index in the batch or on the other rows.  The seed of
a loop is ``seed=`` given to the loop (``generate(..., seed=...)``), else the sampler's ``seed``: an
integer gives every row that seed (the same prompt twice in a batch gives the same text twice); a
list gives one seed per row; None draws a fresh seed per row from ``os.urandom``.

Differences from KerasHub, on purpose:

* A seeded sampler gives the same output every call (KerasHub's seed generator advances between
  calls), and the same text for the same prompt in any row of any batch.  Without a seed, each
  call draws fresh seeds and leaves them in ``sampler.last_seed`` (an integer when every row had
  the same seed, else the list of row seeds); ``generate(..., seed=sampler.last_seed)`` or
  ``Sampler(seed=sampler.last_seed)`` reproduces that call.
* Probabilities are float32 as KerasHub's, except that float64 logits (the oracle's dtype) keep
  float64.
* ``temperature <= 0`` raises :class:`refopt.errors.SamplerError`.
* Beyond KerasHub (as transformers offers them): ``repetition_penalty``, ``no_repeat_ngram_size``
  and a ``logits_processors`` list, applied to the logits before the temperature.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from refopt import backend
from refopt import philox
from refopt.errors import SamplerError
from refopt.ops.sampling import descending_order, top_k_mask  # noqa: F401  (re-exported)



def loop_state(prompt, mask, index, stop_token_ids):
    """The decoding loop's state: a copy of ``prompt [B, T]`` (the ids it fills in), the prompt's
    ``mask [B, T]`` (bool; positions that keep their token), ``index`` (int), ``stop`` (the stop
    ids as an array, or None), ``generated [B, T]`` (positions past each row's prompt) and
    ``finished [B]`` (rows that produced a stop token)."""
    prompt = np.array(prompt, copy=True)                                       # [B, T]
    B, T = prompt.shape
    mask = np.zeros(prompt.shape, bool) if mask is None else np.asarray(mask, bool)
    stop = None if stop_token_ids is None else np.asarray(list(stop_token_ids), prompt.dtype)
    generated = np.arange(T)[None, :] >= mask.sum(axis=-1)[:, None]            # [B, T] past the prompt
    return prompt, mask, int(index), stop, generated, np.zeros(B, bool)


def commit(prompt, index, token, mask, generated, stop, finished):
    """Write the chosen ``token [B]`` at ``index`` (prompt positions keep their own token), mark
    the rows it finishes (``finished`` in place); returns the tokens written."""
    token = np.where(mask[:, index], prompt[:, index], token)                  # keep prompt tokens
    if stop is not None:
        finished |= generated[:, index] & ~finished & np.isin(token, stop)
    prompt[:, index] = token
    return token

class SamplerSpec(NamedTuple):
    """How a sampler describes its rule to a device loop (:meth:`Sampler.device_spec`): ``kind``
    (``"greedy"``, ``"random"``, ``"top_k"``, ``"top_p"``, ``"min_p"``) and its parameters
    (``temperature``, and ``k`` / ``p`` / ``min_p`` as the kind needs)."""

    kind: str
    params: dict


class Step(NamedTuple):
    """Positions ``start .. stop`` of every row became final: ``token_ids [B, stop - start]`` and,
    when asked for, their log-probabilities ``log_probs [B, stop - start]`` (else None)."""

    start: int
    stop: int
    token_ids: np.ndarray
    log_probs: np.ndarray | None


# ---------------------------------------------------------------------------------- validation
def check_positive_int(value, name: str, owner: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise SamplerError(f"{owner}: {name}={value!r}; expected an integer >= 1")
    return int(value)


def check_float(value, name: str, owner: str, low: float, high: float, low_open: bool,
                high_open: bool = False) -> float:
    ok = isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool)
    if ok:
        v = float(value)
        ok = math.isfinite(v) and (v > low if low_open else v >= low) and (
            v < high if high_open else v <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise SamplerError(f"{owner}: {name}={value!r}; expected a number in {interval}")
    return float(value)


# ---------------------------------------------------------------------------------- array helpers
def softmax(x):
    # x [..., V] -> probabilities [..., V]; -inf entries get probability 0
    m = np.max(x, axis=-1, keepdims=True)
    e = np.exp(x - m)
    return e / e.sum(axis=-1, keepdims=True)


def log_softmax(x):
    # x [..., V] -> log-probabilities [..., V] (float64)
    x = np.asarray(x, np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def top_k_indices(x, k: int):
    # x [B, N] -> indices [B, k] of the k largest, largest first; ties: lower index first
    # (what jax.lax.top_k returns, the backend KerasHub's fixtures were made with)
    return descending_order(x)[:, :k]


def one_hot_argmax(p):
    # p [B, V] -> float64 [B, V] with a 1 at each row's first maximum
    out = np.zeros(p.shape, np.float64)
    out[np.arange(p.shape[0]), np.argmax(p, axis=-1)] = 1.0
    return out


def normalize(w):
    # non-negative weights [B, V] -> rows summing to one (float64)
    w = np.asarray(w, np.float64)
    return w / w.sum(axis=-1, keepdims=True)


# ---------------------------------------------------------------------------------- the sampler
class Sampler:
    """Base class of every sampler (KerasHub's ``keras_hub.samplers.Sampler``).

    Args:
        temperature: float > 0, default 1.0; the logits are divided by it before the softmax.
        repetition_penalty: optional float > 0 (transformers' ``repetition_penalty``).
        no_repeat_ngram_size: optional int >= 1 (transformers' ``no_repeat_ngram_size``).
        logits_processors: optional list of callables ``(logits [B, V], token_ids [B, T], index)
            -> logits``, applied after the two above.
    """

    #: True for samplers whose choice uses random numbers (they take a ``seed``).
    stochastic = False

    def __init__(self, temperature=1.0, repetition_penalty=None, no_repeat_ngram_size=None,
                 logits_processors=None):
        from refopt.samplers.logits_processors import NoRepeatNGramProcessor, RepetitionPenaltyProcessor

        owner = type(self).__name__
        self.temperature = check_float(temperature, "temperature", owner, 0.0, math.inf, True, True)
        self.repetition_penalty = None
        self.no_repeat_ngram_size = None
        processors = []
        if repetition_penalty is not None:
            processors.append(RepetitionPenaltyProcessor(repetition_penalty))
            self.repetition_penalty = processors[-1].penalty
        if no_repeat_ngram_size is not None:
            processors.append(NoRepeatNGramProcessor(no_repeat_ngram_size))
            self.no_repeat_ngram_size = processors[-1].ngram_size
        if logits_processors is not None:
            if not isinstance(logits_processors, (list, tuple)) or not all(
                    callable(p) for p in logits_processors):
                raise SamplerError(f"{owner}: logits_processors must be a list of callables "
                                   "(logits, token_ids, index) -> logits")
            processors.extend(logits_processors)
        self.logits_processors = processors
        self.seed = None
        self.last_seed = None
        self._seeds = None           # uint64 [B]: each row's seed during a loop
        self._ops = None             # the ops namespace of the model being decoded
        self._index = 0

    # ------------------------------------------------------------------ per-step pieces
    def process_logits(self, logits, token_ids, index):
        """Apply the logits processors; ``token_ids [B, T]`` holds the sequence, of which positions
        ``< index`` are the context."""
        for processor in self.logits_processors:
            logits = processor(logits, token_ids, index)
        return logits

    def compute_probabilities(self, logits):
        """``softmax(logits / temperature)`` over the last axis, in float32 (float64 logits stay
        float64)."""
        logits = np.asarray(logits)
        dtype = np.float64 if logits.dtype == np.float64 else np.float32
        return softmax(logits.astype(dtype, copy=False) / dtype(self.temperature))

    def next_token_distribution(self, probabilities):
        """The distribution ``[B, V]`` (float64, zero outside the support) the next token is drawn
        from.  Subclasses that sample override it."""
        raise NotImplementedError(
            f"{type(self).__name__} does not define next_token_distribution(); it cannot be drawn "
            "from directly (nor serve as a speculative base_sampler)")

    def device_spec(self) -> SamplerSpec | None:
        """The rule as a :class:`SamplerSpec` for a device loop, or None when it has no device form
        (this base class, subclasses that change a rule, samplers with logits processors)."""
        return None

    def _spec(self, cls, kind, **params) -> SamplerSpec | None:
        # the spec of ``cls``'s rule, for exactly that class (a subclass may change the rule)
        if type(self) is not cls or self.logits_processors:
            return None
        return SamplerSpec(kind, {"temperature": self.temperature, **params})

    def get_next_token(self, probabilities):
        """The next token ``[B]`` for ``probabilities [B, V]``: a draw from
        :meth:`next_token_distribution` with the uniform of ``(row's seed, index)``."""
        probabilities = np.asarray(probabilities)
        weights = self.next_token_distribution(probabilities)
        return self.ops.choose(weights, self.uniforms(probabilities.shape[0]))

    @property
    def ops(self):
        """The ops namespace the selection steps run on: the decoded model's during a loop, else
        the current backend's."""
        return self._ops if self._ops is not None else backend.ops()

    # ------------------------------------------------------------------ randomness
    def begin(self, batch: int, model=None, seed=None):
        """Start one generation of ``batch`` rows: run on ``model``'s ops and fix each row's seed
        (``seed``, else the sampler's ``seed``; see the module docstring).  Returns the row seeds
        (uint64 ``[batch]``), or None for a sampler that makes no random choice."""
        self._ops = model_ops(model)
        self._seeds = None
        if self.stochastic:
            self._seeds = philox.row_seeds(self.seed if seed is None else seed, batch)
            first = int(self._seeds[0])
            self.last_seed = first if (self._seeds == self._seeds[0]).all() else [int(s) for s in self._seeds]
        return self._seeds

    def uniforms(self, batch: int, index: int | None = None, stream: int = philox.STREAM_TOKEN):
        """Philox uniforms ``[batch]``, one per row's seed, at ``index`` (default: the position
        the loop is deciding)."""
        if self._seeds is None or len(self._seeds) != batch:                  # outside a loop
            self._seeds = philox.row_seeds(self.seed, batch)
            self.last_seed = int(self._seeds[0]) if (self._seeds == self._seeds[0]).all() else [
                int(s) for s in self._seeds]
        return self.ops.uniform(self._seeds, self._index if index is None else index, stream)

    # ------------------------------------------------------------------ the loop
    def __call__(self, next, prompt, cache=None, index=0, mask=None, stop_token_ids=None,
                 hidden_states=None, model=None, **kwargs):
        """Run the decoding loop to the end; returns the token ids ``[B, T]`` (KerasHub's call)."""
        return run_to_end(self.steps(next, prompt, cache=cache, index=index, mask=mask,
                                     stop_token_ids=stop_token_ids, hidden_states=hidden_states,
                                     model=model, **kwargs))

    def steps(self, next, prompt, cache=None, index=0, mask=None, stop_token_ids=None,
              hidden_states=None, model=None, log_probs=False, seed=None):
        """The decoding loop as a generator: yields a :class:`Step` per position decided and returns
        the final token ids ``[B, T]`` (``StopIteration.value``).  ``seed``: this loop's seed(s),
        overriding the sampler's (an integer, or one per row)."""
        prompt, mask, index, stop, generated, finished = loop_state(prompt, mask, index, stop_token_ids)
        B, T = prompt.shape
        self.begin(B, model=model, seed=seed)
        while index < T and not (stop is not None and finished.all()):
            logits, _, cache = next(prompt, cache, index)                       # [B, V]
            logits = self.process_logits(logits, prompt, index)
            probabilities = self.compute_probabilities(logits)
            self._index = index
            token = np.asarray(self.get_next_token(probabilities)).astype(prompt.dtype)  # [B]
            token = commit(prompt, index, token, mask, generated, stop, finished)
            lp = None
            if log_probs:
                lp = self.token_log_probs(logits, token)[:, None]
            yield Step(index, index + 1, token[:, None], lp)
            index += 1
        return prompt

    def token_log_probs(self, logits, token):
        """log softmax(logits / temperature) at ``token`` (float64): the log-probability of each
        chosen token under the processed, temperature-scaled distribution (before truncation)."""
        lsm = log_softmax(np.asarray(logits, np.float64) / self.temperature)   # [B, V]
        return lsm[np.arange(lsm.shape[0]), token]

    def check_model(self, model) -> None:
        """Called by ``generate`` before decoding; samplers with requirements on the model (the
        speculative sampler's draft) check them here."""

    # ------------------------------------------------------------------ serialization
    def get_config(self) -> dict:
        config = {"temperature": self.temperature}
        if self.repetition_penalty is not None:
            config["repetition_penalty"] = self.repetition_penalty
        if self.no_repeat_ngram_size is not None:
            config["no_repeat_ngram_size"] = self.no_repeat_ngram_size
        return config

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


def map_cache(fn, cache):
    """``fn`` applied to every array of a cache, the structure kept (KerasHub's
    ``tree.map_structure``): dicts, lists and tuples nest, ``None`` stays ``None``.  Samplers that
    repeat or reorder rows (beam, contrastive) go through this, so any cache a ``next`` function
    keeps -- refopt's KV cache, a ``[B, T]`` array, a dict of per-layer arrays -- travels with its
    rows."""
    if cache is None:
        return None
    if isinstance(cache, dict):
        return type(cache)((key, map_cache(fn, value)) for key, value in cache.items())
    if isinstance(cache, (list, tuple)):
        return type(cache)(map_cache(fn, value) for value in cache)
    return fn(np.asarray(cache))


def cache_nbytes(cache) -> int:
    """The bytes of every array of a cache structure (see :func:`map_cache`)."""
    total = []
    map_cache(lambda x: total.append(x.nbytes), cache)
    return int(sum(total))


def is_kv_cache(cache, model) -> bool:
    """Whether ``cache`` is ``model``'s own KV cache ``[B, L, 2, T, H, K]`` (see
    :func:`refopt.model.new_cache`): the one layout whose sequence axis (3) a sampler may slice to
    copy only the positions filled so far."""
    cfg = getattr(getattr(model, "backbone", None), "config", None)
    return (cfg is not None and isinstance(cache, np.ndarray) and cache.ndim == 6
            and cache.shape[1:3] == (cfg.num_layers, 2)
            and cache.shape[4:] == (cfg.num_heads, cfg.head_dim))


def model_ops(model):
    """The ops namespace ``model`` runs on (``model.backbone.ops``); the current backend's when
    there is no model."""
    backbone = getattr(model, "backbone", None)
    ops = getattr(backbone, "ops", None)
    return ops if ops is not None else backend.ops()


def run_to_end(steps):
    """Exhaust a :meth:`Sampler.steps` generator and return its final token ids."""
    while True:
        try:
            steps.send(None)
        except StopIteration as done:
            return done.value


def stop_mask(token_ids, stop, mask, index):
    # token_ids [B, T], stop [S], mask [B, T] (prompt) -> [B] True where a stop token sits at a
    # non-prompt position before `index`
    T = token_ids.shape[1]
    search = ~mask & (np.arange(T)[None, :] < index)
    return (np.isin(token_ids, stop) & search).any(axis=-1)
