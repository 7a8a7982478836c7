"""The adapter protocol: what a backend implements so refopt's oracle can check it.

Subclass :class:`Adapter` and override what your backend can do.  Only :meth:`Adapter.load` and
:meth:`Adapter.logits` are required; every other method raises :class:`NotSupported` by default,
and the oracle reports the checks that need it as *skipped*, with the reason, never as passed.

Arrays are NumPy arrays.  Weights use refopt's names and layout (:mod:`refopt.model`): linear
weights ``[out, in]`` (``y = x @ W.T + b``, PyTorch's layout), ``embed_positions`` row ``p`` for
position ``p`` (no offset: transformers' two spare rows are not there), LayerNorm ``gamma``/``beta``.
:func:`refopt.io.huggingface.to_state_dict` and :func:`refopt.io.keras_h5.to_keras` translate them.

Conventions every method follows:

* ``token_ids [B, S]`` int64, ``padding_mask [B, S]`` bool, True on real tokens.  Right padding
  unless the adapter sets ``supports_left_padding`` (then the oracle also sends left-padded rows,
  whose positions count from each row's first real token, as transformers computes them).  The
  length ``S`` is the batch's, at most the config's ``max_sequence_length``; rows shorter than ``S``
  are padded (the oracle never sends a row without a real token).
* Only real positions are compared; what a port puts at padding positions is its own business.
* Prompt ids (:meth:`Adapter.encode`) start with ``</s>`` (id 2), as OPT's published tokenizer
  and KerasHub's ``OPTCausalLMPreprocessor.generate_preprocess`` make them.
* A sampler step (:meth:`Adapter.sample`) receives the model's probabilities and one uniform number
  in ``[0, 1)`` per row; the port applies its temperature and filters (top-k, top-p) and picks the
  token with the common selection rule :func:`refopt.philox.choose` (inverse CDF over token ids),
  so the choice depends only on the filtering, which is what is being checked.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np

from refopt.config import OPTConfig
from refopt.errors import ConfigError


class NotSupported(Exception):
    """Raised by an adapter method the backend does not implement, or for inputs (a config) it
    does not handle; the message says why."""


#: what an adapter may support; each check needs some of them (``refopt.testing.checks``)
CAPABILITIES = ("logits", "left_padding", "activations", "gradients", "incremental", "generation",
                "tokenizer", "samplers")

# the method whose override implies each capability (adapters that do not declare ``capabilities``)
_IMPLIED_BY = {"activations": "activations", "gradients": "loss_and_gradients",
               "incremental": "incremental_logits", "generation": "greedy", "tokenizer": "encode",
               "samplers": "sample"}


def capabilities_of(adapter) -> frozenset:
    """The capabilities an adapter declares (``capabilities``), or, when it declares none, those
    implied by the methods it overrides (``logits`` always; ``left_padding`` from
    ``supports_left_padding``)."""
    declared = getattr(adapter, "capabilities", None)
    if declared is not None:
        caps = frozenset(declared)
        unknown = caps - set(CAPABILITIES)
        if unknown:
            raise ConfigError(f"{type(adapter).__name__}.capabilities: unknown {sorted(unknown)}; "
                              f"expected some of {list(CAPABILITIES)}")
        return caps | ({"left_padding"} if getattr(adapter, "supports_left_padding", False) else set())
    caps = {"logits"}
    if getattr(adapter, "supports_left_padding", False):
        caps.add("left_padding")
    for cap, method in _IMPLIED_BY.items():
        if getattr(type(adapter), method, None) is not getattr(Adapter, method):
            caps.add(cap)
    return frozenset(caps)


class SamplerSpec(NamedTuple):
    """One sampler configuration: ``name`` is ``"greedy"``, ``"random"``, ``"top_k"`` or ``"top_p"``
    (KerasHub's names; ``top_p`` with ``k`` set is KerasHub's ``TopPSampler(p, k)`` and
    transformers' ``top_k`` + ``top_p``)."""

    name: str
    k: int | None = None
    p: float | None = None
    temperature: float = 1.0

    def describe(self) -> str:
        args = []
        if self.k is not None:
            args.append(f"k={self.k}")
        if self.p is not None:
            args.append(f"p={self.p:g}")
        if self.temperature != 1.0:
            args.append(f"T={self.temperature:g}")
        return f"{self.name}({', '.join(args)})"


class Adapter:
    """Base class of backend adapters (see the module docstring for the conventions).

    Attributes a subclass may set:

    =========================  ===================================================================
    ``name``                   shown in reports
    ``dtype``                  the compute dtype of the port's forward and backward (``"float32"``,
                               ``"float64"``, ``"bfloat16"``, ``"float16"``): it picks the tolerance
    ``supports_left_padding``  whether :meth:`logits` handles left-padded rows
    ``sampler_convention``     ``"keras_hub"`` (refopt's and KerasHub's rules) or ``"transformers"``
                               (``TemperatureLogitsWarper``, ``TopKLogitsWarper``,
                               ``TopPLogitsWarper``): the two differ only at exact ties (see
                               :func:`refopt.testing.sampler_reference.sampler_distribution`)
    ``config_family``          ``"opt"`` (every OPT variant: post-LN, projections, no biases, ...)
                               or ``"keras_hub"`` (what KerasHub's OPTBackbone can build): the
                               random configs the suite draws for this adapter
    ``capabilities``           what the port supports, some of :data:`CAPABILITIES` (``logits``,
                               ``left_padding``, ``activations``, ``gradients``, ``incremental``,
                               ``generation``, ``tokenizer``, ``samplers``); the checks that need
                               anything else are not run and are listed once in the report.  Left
                               as None, it is read off the methods the subclass overrides
    =========================  ===================================================================
    """

    name = "adapter"
    dtype = "float32"
    supports_left_padding = False
    sampler_convention = "keras_hub"
    config_family = "opt"
    capabilities: frozenset | None = None

    config: OPTConfig | None = None

    # ------------------------------------------------------------------ the model
    def load(self, config: OPTConfig, params: dict[str, np.ndarray]) -> None:
        """Build the port's model for ``config`` with refopt's ``params`` (float64 arrays; cast them
        to your dtype).  Required."""
        raise NotImplementedError(f"{type(self).__name__}.load(config, params) is required")

    def load_preset(self, path) -> None:
        """Load a checkpoint directory with the port's own loader (optional: otherwise the oracle
        reads it with refopt and calls :meth:`load`).  Set ``self.config`` to its config."""
        raise NotSupported(f"{self.name} has no preset loader of its own")

    def logits(self, token_ids: np.ndarray, padding_mask: np.ndarray) -> np.ndarray:
        """Logits ``[B, S, V]``.  Required."""
        raise NotImplementedError(f"{type(self).__name__}.logits(token_ids, padding_mask) is required")

    def activations(self, token_ids, padding_mask, names: list[str]) -> dict[str, np.ndarray]:
        """The named intermediates (:func:`refopt.testing.reference.activation_names`) the port can
        produce, each ``[B, S, width]``; names it cannot produce are left out."""
        raise NotSupported(f"{self.name} does not expose intermediate activations")

    def loss_and_gradients(self, token_ids, padding_mask) -> tuple[float, Mapping[str, np.ndarray]]:
        """The loss ``sum(sw * CE) / sum(sw)`` (:func:`refopt.testing.reference.loss_targets`) and
        its gradient for every parameter, keyed by refopt's names with refopt's shapes (the tied
        head's share inside ``embed_tokens``): a dict, or for a large model a mapping that reads
        each gradient on lookup, such as a :class:`refopt.testing.spill.GradientSpill` filled as
        the backward produces them (then the port never holds all its gradients at once)."""
        raise NotSupported(f"{self.name} does not compute gradients")

    def incremental_logits(self, token_ids, padding_mask, prefill: int) -> np.ndarray:
        """Logits ``[B, S, V]`` computed the way generation computes them: one call on the first
        ``prefill`` columns (filling the port's KV cache), then one cached step per later column,
        fed that column's token (``padding_mask`` covers the whole batch; on a left-padded batch
        the prefill holds the padding)."""
        raise NotSupported(f"{self.name} does not decode incrementally")

    def greedy(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        """The ``max_new_tokens`` ids greedy decoding appends to one prompt (no stop token)."""
        raise NotSupported(f"{self.name} does not generate")

    # ------------------------------------------------------------------ the tokenizer
    def load_tokenizer(self, vocabulary_path, merges_path) -> None:
        """Build the port's tokenizer from a ``vocab.json`` and a ``merges.txt``."""
        raise NotSupported(f"{self.name} has no tokenizer")

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Prompt ids of each text: ``</s>`` then the byte-level BPE ids; special tokens written in
        the text (``<pad>``, ``</s>``) map to their ids."""
        raise NotSupported(f"{self.name} has no tokenizer")

    def decode(self, ids: list[list[int]]) -> list[str]:
        """Text of each id list, ``<pad>`` and ``</s>`` left out, bytes that are not UTF-8 (ids cut
        inside a character) written as U+FFFD, one per maximal invalid subsequence (Python's
        ``errors="replace"``: transformers' and KerasHub's decoding).  The checks
        never decode ``<s>`` or ``<unk>``, which no text encodes to and the peers treat differently."""
        raise NotSupported(f"{self.name} has no tokenizer")

    # ------------------------------------------------------------------ the samplers
    def sample(self, spec: SamplerSpec, probabilities: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
        """Token ids ``[B]`` for ``probabilities [B, V]`` (the model's softmax, before temperature)
        and ``uniforms [B]`` in ``[0, 1)``: the port's filtering, then :func:`refopt.philox.choose`
        -- the first token whose partial sum of the weights exceeds ``u`` times their total, so
        never a token of weight 0, even at ``u = 0`` (greedy ignores the uniforms)."""
        raise NotSupported(f"{self.name} has no samplers")

    def close(self) -> None:
        """Release resources (subprocesses, devices)."""

    def __repr__(self):
        return f"<{type(self).__name__} {self.name} ({self.dtype})>"


# ---------------------------------------------------------------------------------- refopt itself
class RefoptAdapter(Adapter):
    """refopt as a port: its own model on one backend (``"numpy"``, ``"numba"``, ``"cuda"``) and
    dtype.  ``RefoptAdapter("numpy", "float64")`` is the oracle's reference; the others check
    refopt's compiled backends against it."""

    supports_left_padding = True
    capabilities = frozenset(CAPABILITIES)

    def __init__(self, backend: str = "numpy", dtype: str = "float32"):
        from refopt import backend as _backend
        from refopt import dtype_policies

        if dtype not in ("float32", "float64", "bfloat16", "float16"):
            raise ConfigError(f"RefoptAdapter: dtype={dtype!r}; refopt computes in float32 or float64, "
                              "or emulates bfloat16 or float16 (its dtype policies)")
        self.backend = backend
        self.dtype = dtype
        self.name = f"refopt[{backend}, {dtype}]"
        # a half-precision dtype is refopt's dtype policy of that name: weights rounded to it, each op
        # computed in float32 and rounded where KerasHub rounds (refopt.dtype_policies; the oracle's
        # models have dropout 0, so attention takes KerasHub's fused path)
        self._policy = dtype_policies.get(dtype)
        self._ops = dtype_policies.ops_for(self._policy, _backend.ops(backend), fused_attention=True)
        self._array_dtype = self._policy.array_dtype
        self.params = None
        self.tokenizer = None

    # model
    def load(self, config, params):
        self.config = dataclasses.replace(config, dtype=self.dtype, dropout=0.0)
        self.params = {k: self._policy.round_variable(np.asarray(v, dtype=self._array_dtype))
                       for k, v in params.items()}

    def load_preset(self, path):
        # refopt's own loader (KerasHub or transformers layout); float32 weights stay memory-mapped
        from refopt.models import OPTBackbone

        backbone = OPTBackbone.from_preset(path, dtype=self.dtype, backend=self.backend)
        self.load(backbone.config, backbone.params)

    def _decoder(self, token_ids, padding_mask, tape):
        # token_ids [B, S], padding_mask [B, S] -> hidden [B, S, E] (tape filled when given)
        from refopt import model as _model

        ids = np.asarray(token_ids, np.int64)
        mask = np.asarray(padding_mask).astype(bool)
        return _model.forward(self.params, self.config, ids, mask, tape=tape, ops=self._ops)

    def _head(self, hidden):
        # hidden [B, S, E] -> logits [B, S, V]: the LM head, tied to the token embedding
        return self._ops.lm_head_forward(hidden, self.params["embed_tokens"])

    def _forward(self, token_ids, padding_mask, tape=None):
        return self._head(self._decoder(token_ids, padding_mask, tape))

    def logits(self, token_ids, padding_mask):
        return self._forward(token_ids, padding_mask)

    def activations(self, token_ids, padding_mask, names):
        # the tape's keys are the oracle's names (refopt.testing.reference.activation_names)
        tape: dict = {}
        tape["logits"] = self._forward(token_ids, padding_mask, tape)
        return {n: tape[n] for n in names if n in tape}

    def loss_and_gradients(self, token_ids, padding_mask):
        from refopt.testing.reference import loss_targets
        from refopt.training.gradients import loss_and_gradients

        y, sw = loss_targets(token_ids, padding_mask, self.config.pad_token_id)
        x = {"token_ids": np.asarray(token_ids, np.int64), "padding_mask": np.asarray(padding_mask, bool)}
        return loss_and_gradients(self.params, self.config, x, y, sw, ops=self._ops)

    def incremental_logits(self, token_ids, padding_mask, prefill):
        # refopt's forward with its KV cache: a prefill, then one token per call
        from refopt import model as _model

        ids = np.asarray(token_ids, np.int64)
        mask = np.asarray(padding_mask).astype(bool)
        B, S = ids.shape
        cache = _model.new_cache(self.config, B, S, self._array_dtype)
        steps = [(0, prefill)] + [(s, s + 1) for s in range(prefill, S)]
        out = [self._head(_model.forward(self.params, self.config, ids[:, a:b], mask, cache=cache,
                                         cache_index=a, ops=self._ops)) for a, b in steps]
        return np.concatenate(out, axis=1)

    def greedy(self, prompt_ids, max_new_tokens):
        from refopt.models import OPTBackbone, OPTCausalLM

        backbone = OPTBackbone.from_opt_config(self.config, self.params)
        backbone.backend = self.backend
        lm = OPTCausalLM(backbone)
        lm.compile(sampler="greedy")
        n = len(prompt_ids)
        ids = np.zeros((1, n + max_new_tokens), np.int64)
        ids[0, :n] = prompt_ids
        mask = np.zeros(ids.shape, bool)
        mask[0, :n] = True
        out = lm.generate({"token_ids": ids, "padding_mask": mask}, stop_token_ids=None)
        return [int(t) for t in out["token_ids"][0, n:]]

    # tokenizer
    def load_tokenizer(self, vocabulary_path, merges_path):
        from refopt.models import OPTTokenizer

        self.tokenizer = OPTTokenizer(vocabulary=str(vocabulary_path), merges=str(merges_path))

    def _tok(self):
        if self.tokenizer is None:
            raise NotSupported("no tokenizer loaded")
        return self.tokenizer

    def encode(self, texts):
        tok = self._tok()
        return [[tok.start_token_id] + [int(i) for i in ids] for ids in tok(list(texts))]

    def _left_out(self) -> set:
        # the ids decode leaves out: the special tokens, <s> and <unk>
        tok = self._tok()
        return set(tok.special_token_ids) | {tok.token_to_id(t) for t in ("<s>", "<unk>")
                                             if t in tok.vocabulary}

    def decode(self, ids):
        tok, special = self._tok(), self._left_out()
        return [tok.detokenize([int(i) for i in row if int(i) not in special]) for row in ids]

    # samplers
    def sample(self, spec, probabilities, uniforms):
        from refopt.philox import choose
        from refopt.testing.sampler_reference import sampler_distribution

        weights = sampler_distribution(spec, probabilities, "keras_hub", backend=self.backend)
        return choose(weights, uniforms)


class Unavailable(Adapter):
    """Stands in for an adapter that cannot be built here (its library is not installed): every
    check it would take part in is reported as skipped, with ``reason``."""

    capabilities = frozenset()

    def __init__(self, name: str, reason: str):
        self.name, self.reason = name, reason

    def _skip(self, *args, **kwargs):
        raise NotSupported(self.reason)

    load = load_preset = logits = activations = loss_and_gradients = greedy = incremental_logits = _skip
    load_tokenizer = encode = decode = sample = _skip


# ---------------------------------------------------------------------------------- by name
BUILTIN = {
    "transformers": "refopt.testing.adapters.transformers:TransformersAdapter",
    "ctranslate2": "refopt.testing.adapters.ctranslate2:CTranslate2Adapter",
    "keras-hub": "refopt.testing.adapters.keras_hub:KerasHubAdapter",
    "keras_hub": "refopt.testing.adapters.keras_hub:KerasHubAdapter",
}


def load_adapter(spec) -> Adapter:
    """An adapter from a command-line spec: ``"transformers"``, ``"keras-hub"``, ``"ctranslate2"``, ``"refopt"``
    (``"refopt:numba"``, ``"refopt:numpy:float64"``), ``"package.module:Class"`` (a class or a
    factory called with no arguments), or an :class:`Adapter` instance (returned as is)."""
    if isinstance(spec, Adapter):
        return spec
    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"adapter {spec!r}: expected 'transformers', 'keras-hub', 'refopt[:backend]' "
                          "or 'module:Class'")
    if spec == "refopt" or spec.startswith("refopt:"):
        parts = spec.split(":")[1:]
        return RefoptAdapter(*(parts or ["numba" if _has_numba() else "numpy"]))
    target = BUILTIN.get(spec, spec)
    if ":" not in target:
        raise ConfigError(f"adapter {spec!r}: expected 'transformers', 'keras-hub', 'ctranslate2', "
                          "'refopt[:backend]' or 'module:Class' (a colon between the module and the class)")
    module_name, _, attr = target.partition(":")
    module = _import(spec, module_name)
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"adapter {spec!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    adapter = obj() if callable(obj) and not isinstance(obj, Adapter) else obj
    if not isinstance(adapter, Adapter):
        raise ConfigError(f"adapter {spec!r}: {attr} gave a {type(adapter).__name__}, not a "
                          "refopt.testing.Adapter")
    return adapter


def load_adapter_as(spec, dtype: str | None = None) -> Adapter:
    """:func:`load_adapter`, held to ``dtype`` (``refopt conform --dtype``, ``pytest
    --refopt-dtype``): the built-in transformers and refopt adapters compute in it (refopt's
    ``bfloat16`` / ``float16`` are its dtype policies); any other adapter computes as it does and
    is judged as a port in ``dtype`` (half precision: against refopt's reference in that dtype)."""
    if dtype is None:
        return load_adapter(spec)
    if dtype not in ("float32", "float64", "bfloat16", "float16"):
        raise ConfigError(f"dtype {dtype!r}: expected float32, float64, bfloat16 or float16")
    if spec == "transformers":
        from refopt.testing.adapters.transformers import TransformersAdapter

        return TransformersAdapter(dtype=dtype)
    if spec in ("refopt", "refopt:numpy", "refopt:numba", "refopt:cuda"):
        return load_adapter(f"{spec if ':' in spec else 'refopt:numpy'}:{dtype}")
    adapter = load_adapter(spec)
    adapter.dtype = dtype
    return adapter


def _import(spec: str, module_name: str):
    """Import the adapter's module; a module that is not on ``sys.path`` is looked for in the
    current directory too (``refopt conform --against my_port.oracle:MyAdapter`` run from the
    project that holds ``my_port/``, as ``python -m`` would find it)."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        top = module_name.split(".")[0]
        cwd = os.getcwd()
        if e.name != top and not module_name.startswith(f"{e.name}."):
            raise ConfigError(f"adapter {spec!r}: importing {module_name!r} failed: {e}") from None
        if cwd in sys.path or not (Path(cwd, top).is_dir() or Path(cwd, top + ".py").is_file()):
            raise ConfigError(f"adapter {spec!r}: cannot import {module_name!r} ({e}); it is neither "
                              f"installed nor in the current directory {cwd} (or add its folder to "
                              "PYTHONPATH)") from None
    sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise ConfigError(f"adapter {spec!r}: cannot import {module_name!r} from {cwd} ({e})") from None


def _has_numba() -> bool:
    return importlib.util.find_spec("numba") is not None
