"""The conformance checks, and the suite that runs them against an adapter.

Checks, in the order they run (each one a row of ``refopt conform``'s table and one pytest item of
the plugin):

per model (a preset, or a random config):
    ``logits``               right-padded batch, real positions only
    ``logits.left_padding``  left-padded batch (adapters with ``supports_left_padding``)
    ``activations``          every named intermediate, forward order; fails at the first that
                             exceeds its tolerance (the divergence locator)
    ``gradients``            the loss, then every parameter's gradient in backward order
    ``generation``           greedy decoding of a few prompts, token by token
tokenizer (when a ``vocab.json`` / ``merges.txt`` pair is available):
    ``tokenizer.prompt_start``    exactly one leading ``</s>`` in each prompt
    ``tokenizer.special_tokens``  ``<pad>`` / ``</s>`` written in a text map to their ids
    ``tokenizer.encode``          every id of every text
    ``tokenizer.decode``          text of the reference ids
samplers (one sampler step on given probabilities and uniform draws):
    ``samplers.greedy``, ``samplers.random``, ``samplers.top_k``, ``samplers.top_k_tie``,
    ``samplers.top_p``, ``samplers.top_k_top_p``, ``samplers.top_p_zero``, ``samplers.top_p_tie``,
    ``samplers.temperature``

Model checks compare against refopt's float64 result with the tolerance of the adapter's dtype and
the tensor's depth (:mod:`refopt.testing.tolerances`), with the float64 tie-break.  Token-valued
checks (tokenizer, samplers, generation) are exact, except where the reference itself sits on a
knife edge: a greedy step whose two best logits are within the logits tolerance, or a sampler row
whose filtering decision is within 1e-6 of its threshold (random cases only; the tie cases are
built exactly and always judged).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import traceback
import zlib
from pathlib import Path
from typing import Callable

import numpy as np

from refopt.config import OPTConfig
from refopt.testing import reference as R
from refopt.testing.adapter import Adapter, NotSupported, RefoptAdapter, SamplerSpec
from refopt.testing.locator import compare_activations, compare_gradients
from refopt.testing.tolerances import SAFETY, compare, tolerance

PASS, FAIL, SKIP = "pass", "FAIL", "skip"
_SERIALS = itertools.count()


@dataclasses.dataclass
class CheckResult:
    """One row of the report."""

    group: str        # logits | activations | gradients | generation | tokenizer | samplers
    name: str         # unique, e.g. "opt-tiny-preln/logits", "samplers.top_p"
    status: str       # PASS | FAIL | SKIP
    figures: str = ""
    detail: str = ""  # the located divergence, the first mismatch, or why it was skipped
    data: dict = dataclasses.field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return self.status == FAIL

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class Check:
    """A named, runnable check: ``run()`` never raises -- an exception from the adapter is a
    failure naming it, :class:`NotSupported` a skip with its reason."""

    def __init__(self, group: str, name: str, fn: Callable[[], CheckResult]):
        self.group, self.name, self._fn = group, name, fn

    def run(self) -> CheckResult:
        try:
            result = self._fn()
        except NotSupported as e:
            return CheckResult(self.group, self.name, SKIP, detail=f"skipped: {e}")
        except Exception as e:  # the adapter under test raised: that is the finding
            tb = traceback.extract_tb(e.__traceback__)[-1]
            return CheckResult(self.group, self.name, FAIL,
                               detail=f"raised {type(e).__name__}: {e} (at {Path(tb.filename).name}:{tb.lineno})")
        result.group, result.name = self.group, self.name
        return result

    def __repr__(self):
        return f"<Check {self.name}>"


def _fmt(f) -> str:
    return (f"max|Δ| {f.max_abs:.2g}  max rel {f.max_rel:.2g}  scaled {f.scaled:.2g}  "
            f"NMSE {f.nmse:.2g}")


def _figures(c) -> str:
    return f"{_fmt(c.figures)}  (tol {c.tolerance.scaled:.2g} / {c.tolerance.nmse:.2g})"


# ---------------------------------------------------------------------------------- model cases
class ModelCase:
    """A model and its inputs: the oracle's float64 parameters, a right-padded batch (and its
    left-padded twin), the preset directory it came from (None for random configs).

    Reference results are computed on first use and kept."""

    def __init__(self, name: str, config: OPTConfig, params: dict, token_ids, padding_mask,
                 left_token_ids=None, left_padding_mask=None, preset=None):
        self.name = name
        self.config = dataclasses.replace(config, dtype="float64", dropout=0.0)
        self.params = {k: np.asarray(v, np.float64) for k, v in params.items()}
        self.token_ids = np.asarray(token_ids, np.int64)
        self.padding_mask = np.asarray(padding_mask, bool)
        self.left_token_ids = None if left_token_ids is None else np.asarray(left_token_ids, np.int64)
        self.left_padding_mask = None if left_padding_mask is None else np.asarray(left_padding_mask, bool)
        self.preset = preset
        self._cache: dict = {}
        self._serial = next(_SERIALS)

    @property
    def key(self):
        # unique for the process's lifetime (an id() may be reused once a case is collected)
        return (self.name, self._serial)

    def cached(self, key, fn):
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    def reference_adapter(self) -> RefoptAdapter:
        def make():
            ref = RefoptAdapter("numpy", "float64")
            ref.load(self.config, self.params)
            return ref
        return self.cached("adapter", make)

    def activations(self, mask, dtype="float64"):
        left = mask is self.left_padding_mask
        ids = self.left_token_ids if left else self.token_ids
        return self.cached(("act", left, dtype), lambda: R.run_forward_as(
            self.params, self.config, ids, mask, dtype))

    def gradient_batch(self, dtype: str):
        """``(token_ids, attempt)`` for the gradient checks of a port computing in ``dtype``: the
        right-padded batch, or the first redraw of its real tokens (same padding) on which every
        fc1 pre-activation is farther from ReLU's kink (relative to its scale) than ``dtype``'s
        measured rounding envelope, the tolerance without its safety factor
        (:func:`refopt.testing.reference.relu_kink_distance`).  Nearer, a correct port may round it
        to the other side, and the gradient row of that unit changes by a whole token's share.
        After 32 draws the one farthest from a kink is used."""
        def find():
            margin = tolerance(dtype, self.config.num_layers).scaled / SAFETY[dtype]
            rng = np.random.default_rng(zlib.crc32(self.name.encode()))
            pool = np.array([i for i in range(self.config.vocabulary_size) if i != self.config.pad_token_id])
            ids, best = self.token_ids, None
            for attempt in range(32):
                if attempt:
                    fresh = pool[rng.integers(0, len(pool), self.token_ids.shape)]
                    ids = np.where(self.padding_mask, fresh, self.config.pad_token_id)
                distance = float(R.relu_kink_distance(self.params, self.config, ids,
                                                      self.padding_mask).min(initial=np.inf))
                if distance >= margin:
                    return ids, attempt
                if best is None or distance > best[0]:
                    best = (distance, ids, attempt)
            return best[1], best[2]
        return self.cached(("gradient_batch", dtype), find)

    def gradients(self, dtype="float64", token_ids=None):
        ids = self.token_ids if token_ids is None else token_ids
        return self.cached(("grad", dtype, ids.tobytes()), lambda: R.run_gradients_as(
            self.params, self.config, ids, self.padding_mask, dtype))

    def prompts(self, n_new: int = 6, max_prompt: int = 5) -> list[list[int]]:
        out = []
        for row, mask in zip(self.token_ids, self.padding_mask):
            real = [int(t) for t, m in zip(row, mask) if m][:max_prompt]
            if real and len(real) + n_new <= self.config.max_sequence_length:
                out.append(real)
        return out


def make_inputs(cfg: OPTConfig, rng: np.random.Generator, batch: int = 3, seq: int = 11):
    """A right-padded batch (row 0 full, the others shorter), its left-padded twin (same tokens,
    padding moved to the front), with the pad id only at padding positions (transformers' embedding
    gives the pad row no gradient, so a pad id among real tokens would make the two libraries'
    correct gradients differ)."""
    S = min(seq, cfg.max_sequence_length)
    lengths = rng.integers(max(1, S // 2), S + 1, batch)
    lengths[0] = S
    pool = np.array([i for i in range(cfg.vocabulary_size) if i != cfg.pad_token_id] or [0])
    ids = pool[rng.integers(0, len(pool), (batch, S))]
    cols = np.arange(S)
    right = cols[None, :] < lengths[:, None]
    ids_right = np.where(right, ids, cfg.pad_token_id)
    left = cols[None, :] >= (S - lengths)[:, None]
    # the left-padded batch has the same tokens, shifted right
    ids_left = np.full_like(ids_right, cfg.pad_token_id)
    for b, n in enumerate(lengths):
        ids_left[b, S - n:] = ids_right[b, :n]
    return ids_right, right, ids_left, left


def case_from_preset(path, name: str | None = None, seed: int = 0, batch: int = 3,
                     seq: int = 11) -> ModelCase:
    """A case for a preset directory (KerasHub or transformers layout), weights read by refopt."""
    from refopt.models import OPTBackbone

    path = Path(path)
    backbone = OPTBackbone.from_preset(path, dtype="float64", backend="numpy")
    cfg = backbone.config
    rng = np.random.default_rng(seed)
    ids, right, ids_left, left = make_inputs(cfg, rng, batch, seq)
    return ModelCase(name or path.name, cfg, backbone.params, ids, right, ids_left, left, preset=path)


class StreamingCase(ModelCase):
    """A checkpoint too large to hold in float64: the reference activations come from
    :func:`refopt.testing.streaming_logits` (one decoder layer resident at a time), the adapter
    must load the checkpoint with its own loader, there is no same-dtype tie-break, and the
    gradient and generation checks are skipped (they need the whole model in memory)."""

    def __init__(self, path, name=None, seed: int = 0, batch: int = 2, seq: int = 8):
        from refopt.io import presets

        path = Path(path)
        cfg = presets.read_config(path)
        ids, right, ids_left, left = make_inputs(cfg, np.random.default_rng(seed), batch, seq)
        super().__init__(name or path.name, cfg, {}, ids, right, ids_left, left, preset=path)

    def activations(self, mask, dtype="float64"):
        if dtype != "float64":
            return None
        from refopt.testing.streaming import streaming_logits

        left = mask is self.left_padding_mask
        ids = self.left_token_ids if left else self.token_ids

        def run():
            tape: dict = {}
            streaming_logits(self.preset, ids, mask, tape=tape)
            return tape
        return self.cached(("act", left, dtype), run)

    def gradient_batch(self, dtype):
        raise NotSupported("streaming mode computes the forward pass only (gradients need the whole "
                           "model in memory)")

    gradients = gradient_batch

    def reference_adapter(self):
        raise NotSupported("streaming mode computes the forward pass only (generation needs the "
                           "whole model in memory)")


def random_config(rng: np.random.Generator, family: str = "opt") -> OPTConfig:
    """A small random OPT config covering the architecture's switches (pre/post-LN, projection,
    biases, affine LayerNorms, the final LayerNorm removed), as the hypothesis strategy does;
    ``family="keras_hub"`` keeps to what KerasHub's OPTBackbone builds (pre-LN, biases, affine
    LayerNorms, final LayerNorm, no projection)."""
    heads = int(rng.integers(1, 4))
    hidden = heads * int(rng.integers(-(-4 // heads), 7))          # >= 4 features per LayerNorm
    if family == "keras_hub":
        return OPTConfig(vocabulary_size=int(rng.integers(20, 80)), num_layers=int(rng.integers(1, 4)),
                         num_heads=heads, hidden_dim=hidden, intermediate_dim=int(rng.integers(4, 25)),
                         max_sequence_length=int(rng.integers(12, 24)), dropout=0.0, dtype="float64")
    proj = bool(rng.integers(0, 2))
    return OPTConfig(vocabulary_size=int(rng.integers(20, 80)), num_layers=int(rng.integers(1, 4)),
                     num_heads=heads, hidden_dim=hidden, intermediate_dim=int(rng.integers(4, 25)),
                     max_sequence_length=int(rng.integers(12, 24)), dropout=0.0,
                     do_layer_norm_before=bool(rng.integers(0, 2)),
                     word_embed_proj_dim=int(rng.integers(2, 9)) if proj else None,
                     enable_bias=bool(rng.integers(0, 2)),
                     layer_norm_elementwise_affine=bool(rng.integers(0, 2)),
                     remove_final_layer_norm=bool(rng.integers(0, 4) == 0), dtype="float64")


def random_weights(cfg: OPTConfig, rng: np.random.Generator, std: float | None = None) -> dict:
    """float64 weights: normal(0, std) matrices and embeddings (std drawn in [0.1, 0.5] when not
    given), LayerNorm gains near 1 and biases near 0 but not equal to them, so their handling
    shows."""
    from refopt.model import param_shapes

    std = float(rng.uniform(0.1, 0.5)) if std is None else std
    out = {}
    for name, shape in param_shapes(cfg).items():
        if name.endswith(".gamma"):
            out[name] = 1.0 + 0.3 * rng.standard_normal(shape)
        elif name.endswith((".beta", ".bias")):
            out[name] = 0.3 * rng.standard_normal(shape)
        else:
            out[name] = std * rng.standard_normal(shape)
    return out


def random_case(seed: int, name: str | None = None, family: str = "opt") -> ModelCase:
    """A random config (of ``family``, see :func:`random_config`), random weights and a random
    batch, all from ``seed``."""
    rng = np.random.default_rng(seed)
    cfg = random_config(rng, family)
    params = random_weights(cfg, rng)
    ids, right, ids_left, left = make_inputs(cfg, rng, int(rng.integers(1, 4)),
                                             int(rng.integers(2, cfg.max_sequence_length + 1)))
    return ModelCase(name or f"random-{seed}", cfg, params, ids, right, ids_left, left)


# ---------------------------------------------------------------------------------- loading
def ensure_loaded(adapter: Adapter, case: ModelCase) -> str:
    """Load ``case``'s model into the adapter (once); returns how: "own loader" or "parameters"."""
    if getattr(adapter, "_oracle_case", None) == case.key:
        return adapter._oracle_how
    how = "parameters"
    if isinstance(case, StreamingCase):
        try:
            adapter.load_preset(case.preset)
        except NotSupported as e:
            raise NotSupported(f"streaming mode needs the adapter's own checkpoint loader ({e})") from None
        how = "own loader"
    elif case.preset is not None:
        try:
            adapter.load_preset(case.preset)
            how = "own loader"
        except NotSupported:
            adapter.load(case.config, case.params)
    else:
        adapter.load(case.config, case.params)
    adapter._oracle_case, adapter._oracle_how = case.key, how
    return how


# ---------------------------------------------------------------------------------- model checks
def _locate(adapter, case, mask, ids):
    """The divergence locator on this batch, or None when the adapter has no activations."""
    try:
        acts = adapter.activations(ids, mask, R.activation_names(case.config))
    except NotSupported:
        return None
    ref = case.activations(mask)
    same = case.activations(mask, adapter.dtype) if adapter.dtype != "float64" else None
    return compare_activations(case.config, acts, ref, adapter.dtype, mask, same)


def check_logits(adapter, case: ModelCase, left: bool = False) -> CheckResult:
    how = ensure_loaded(adapter, case)
    if left:
        if not adapter.supports_left_padding:
            raise NotSupported(f"{adapter.name} handles right padding only (supports_left_padding "
                               "is False)")
        mask, ids = case.left_padding_mask, case.left_token_ids
    else:
        mask, ids = case.padding_mask, case.token_ids
    logits = np.asarray(adapter.logits(ids, mask))
    ref = case.activations(mask)["logits"]
    real = mask.astype(bool)
    same = case.activations(mask, adapter.dtype) if adapter.dtype != "float64" else None
    same = None if same is None else same["logits"][real]
    if logits.shape != ref.shape:
        return CheckResult("logits", "", FAIL, f"shape {list(logits.shape)}",
                           f"logits have shape {list(logits.shape)}, expected {list(ref.shape)}")
    c = compare("logits", logits[real], ref[real], adapter.dtype, case.config.num_layers, same)
    detail = f"loaded with {how}"
    data = {"figures": c.figures._asdict(), "tolerance": c.tolerance._asdict(), "tie_break": c.tie_break}
    if not c.passed:
        div = _locate(adapter, case, mask, ids)
        if div is not None and div.first is not None:
            data["first_divergence"] = div.name
            detail = f"{div.describe()} [{detail}]"
        else:
            detail = f"{c.describe()} [{detail}; no intermediates to locate it]"
    elif c.tie_break:
        detail += "; " + c.describe()
    return CheckResult("logits", "", PASS if c.passed else FAIL, _figures(c), detail, data)


def check_activations(adapter, case: ModelCase) -> CheckResult:
    ensure_loaded(adapter, case)
    names = R.activation_names(case.config)
    acts = adapter.activations(case.token_ids, case.padding_mask, names)
    ref = case.activations(case.padding_mask)
    same = case.activations(case.padding_mask, adapter.dtype) if adapter.dtype != "float64" else None
    div = compare_activations(case.config, acts, ref, adapter.dtype, case.padding_mask, same)
    if not div.compared:
        raise NotSupported(f"{adapter.name} produced none of the named intermediates")
    shown = div.first or div.worst
    detail = div.describe()
    if div.missing:
        detail += f"; not produced by the port: {', '.join(div.missing[:6])}" + (
            " ..." if len(div.missing) > 6 else "")
    data = {"first_divergence": div.name, "compared": [c.name for c in div.compared],
            "missing": div.missing,
            "figures": {c.name: c.figures._asdict() for c in div.compared}}
    return CheckResult("activations", "", FAIL if div.first else PASS,
                       f"{len(div.compared)} tensors; {'first' if div.first else 'worst'}: "
                       f"{shown.name}: {_figures(shown)}", detail, data)


def check_gradients(adapter, case: ModelCase) -> CheckResult:
    if not case.padding_mask[:, 1:].any():
        raise NotSupported("the batch has no position with a next token to predict (one token per row)")
    ensure_loaded(adapter, case)
    ids, redraws = case.gradient_batch(adapter.dtype)
    loss, grads = adapter.loss_and_gradients(ids, case.padding_mask)
    loss64, grads64 = case.gradients("float64", ids)
    same_loss, same_grads = (case.gradients(adapter.dtype, ids) if adapter.dtype != "float64" else (None, None))
    cl = compare("loss", np.array([float(loss)]), np.array([loss64]), adapter.dtype,
                 case.config.num_layers, None if same_loss is None else np.array([same_loss]))
    grads = {k: np.asarray(v) for k, v in grads.items()}
    div = compare_gradients(case.config, grads, grads64, adapter.dtype, same_grads)
    worst = div.first or div.worst
    figures = f"loss rel {cl.figures.scaled:.2g} (tol {cl.tolerance.scaled:.2g}); {len(div.compared)} gradients"
    if worst is not None:
        figures += f"; {'first' if div.first else 'worst'}: {worst.name}: {_figures(worst)}"
    failed = (not cl.passed) or div.first is not None or bool(div.missing)
    if not cl.passed:
        detail = f"loss {float(loss)!r}, expected {loss64!r}: {cl.describe()}"
        if div.first is not None:
            detail += f"; gradients: first divergence (backward order): {div.first.describe()}"
    elif div.first is not None:
        detail = f"first divergence (backward order): {div.first.describe()}"
    elif div.missing:
        detail = f"no gradient for {', '.join(div.missing[:6])}"
    else:
        detail = div.describe()
    if redraws:
        detail += (f" (token ids redrawn {redraws} times to keep every ReLU input away from its kink "
                   "by more than the rounding envelope)")
    return CheckResult("gradients", "", FAIL if failed else PASS, figures, detail,
                       {"loss": float(loss), "loss_reference": float(loss64),
                        "first_divergence": div.name, "missing": div.missing})


def check_generation(adapter, case: ModelCase, n_new: int = 6) -> CheckResult:
    ensure_loaded(adapter, case)
    ref = case.reference_adapter()
    prompts = case.prompts(n_new)
    if not prompts:
        raise NotSupported("the model's max_sequence_length leaves no room to generate")
    tol = tolerance(adapter.dtype, case.config.num_layers)
    excused, compared = [], 0
    for k, prompt in enumerate(prompts):
        want = case.cached(("greedy", tuple(prompt), n_new), lambda: ref.greedy(prompt, n_new))
        got = [int(t) for t in adapter.greedy(list(prompt), n_new)]
        if len(got) != n_new:
            return CheckResult("generation", "", FAIL, "", f"prompt {k}: {len(got)} new tokens, expected {n_new}")
        for t in range(n_new):
            compared += 1
            if got[t] == want[t]:
                continue
            prefix = prompt + want[:t]
            logits = ref.logits(np.array([prefix]), np.ones((1, len(prefix)), bool))[0, -1]
            gap = float(logits[want[t]] - logits[got[t]])
            bound = tol.scaled * float(np.max(np.abs(logits)))
            where = f"prompt {k} {prompt}, new token {t}: expected {want[t]}, got {got[t]}"
            if gap <= bound:
                excused.append(f"{where} (a near-tie: logit gap {gap:.2g} <= {bound:.2g}; not compared further)")
                break
            return CheckResult("generation", "", FAIL, f"{compared} tokens compared",
                               f"{where}: logit {logits[got[t]]:.6g} vs {logits[want[t]]:.6g}, "
                               f"gap {gap:.3g} > tolerance {bound:.3g}",
                               {"prompt": prompt, "expected": want, "got": got})
    detail = "; ".join(excused) if excused else "identical to refopt's float64 greedy tokens"
    return CheckResult("generation", "", PASS, f"{len(prompts)} prompts x {n_new} tokens, "
                       f"{compared} compared", detail)


def model_checks(adapter: Adapter, case: ModelCase) -> list[Check]:
    n = case.name
    return [Check("logits", f"{n}/logits", lambda: check_logits(adapter, case)),
            Check("logits", f"{n}/logits.left_padding", lambda: check_logits(adapter, case, left=True)),
            Check("activations", f"{n}/activations", lambda: check_activations(adapter, case)),
            Check("gradients", f"{n}/gradients", lambda: check_gradients(adapter, case)),
            Check("generation", f"{n}/generation", lambda: check_generation(adapter, case))]


# ---------------------------------------------------------------------------------- tokenizer
TEXTS = [
    "Hello world", "The quick brown fox jumped.", "  leading spaces and\ttabs\n\nnewlines ",
    "naïve café — 東京 🚀", "I'm sure it's they'll we've", "123 4567 3.14159", "",
    "Once upon a time", "unbelievable misunderstandings", "hello   world!!!  ", "a\r\nb",
    "Ünïcödé Ελληνικά русский العربية हिन्दी", "    ", "x" * 40, "The the THE tHe",
    "e-mail: someone@example.com, url https://example.org/a?b=c", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 and emoji 👩‍👩‍👧‍👦",
]
SPECIAL_TEXTS = ["<pad> not special", "before</s>after", "</s>", "x <pad><pad> y", "<pad>",
                 "a </s> b <pad> c", "<s> and <unk> are written out"]
_POOL = ("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789     \n\t.,;:!?'\"-()"
         "éèüößñçøåæœ—–…«»€£¥§°±×÷αβγδλμπσωЖжЯя東京日本語中文한국어🚀🙂👍✨")


def random_texts(rng: np.random.Generator, n: int = 24, max_len: int = 40) -> list[str]:
    """Texts drawn from a pool of ASCII, punctuation, accented Latin, Greek, Cyrillic, CJK, Hangul
    and emoji, with words and whitespace runs of random lengths."""
    out = []
    for _ in range(n):
        length = int(rng.integers(0, max_len + 1))
        out.append("".join(_POOL[int(i)] for i in rng.integers(0, len(_POOL), length)))
    return out


class TokenizerCase:
    def __init__(self, vocabulary, merges, texts=None, seed: int = 0):
        self.vocabulary, self.merges = Path(vocabulary), Path(merges)
        self.texts = list(TEXTS if texts is None else texts) + random_texts(np.random.default_rng(seed))
        self.reference = RefoptAdapter("numpy", "float64")
        self.reference.load_tokenizer(self.vocabulary, self.merges)
        self._ids: dict = {}

    @property
    def key(self):
        return (str(self.vocabulary), str(self.merges))

    def ids(self, texts):
        missing = [t for t in texts if t not in self._ids]
        if missing:
            for t, ids in zip(missing, self.reference.encode(missing)):
                self._ids[t] = ids
        return [self._ids[t] for t in texts]

    def special_ids(self):
        tok = self.reference.tokenizer
        return {tok.token_to_id(t) for t in ("<s>", "<pad>", "</s>", "<unk>") if t in tok.vocabulary}


def find_tokenizer_files(path) -> tuple[Path, Path] | None:
    """``(vocab.json, merges.txt)`` of a transformers checkpoint or tokenizer directory, or a
    KerasHub preset (``assets/tokenizer/vocabulary.json``); None when there are none."""
    path = Path(path)
    for vocab, merges in (("vocab.json", "merges.txt"),
                          ("assets/tokenizer/vocabulary.json", "assets/tokenizer/merges.txt")):
        if (path / vocab).exists() and (path / merges).exists():
            return path / vocab, path / merges
    return None


def _ensure_tokenizer(adapter, case: TokenizerCase):
    if getattr(adapter, "_oracle_tokenizer", None) != case.key:
        adapter.load_tokenizer(case.vocabulary, case.merges)
        adapter._oracle_tokenizer = case.key


def _show(tokenizer, ids):
    return "[" + ", ".join(f"{i} {tokenizer.id_to_token(i)!r}" if 0 <= i < tokenizer.vocabulary_size()
                           else str(i) for i in ids) + "]"


def check_prompt_start(adapter, case: TokenizerCase) -> CheckResult:
    _ensure_tokenizer(adapter, case)
    texts = [t for t in case.texts if not t.startswith("</s>")]
    got = adapter.encode(texts)
    want = case.ids(texts)
    start = case.reference.tokenizer.start_token_id

    def leading(ids):
        n = 0
        while n < len(ids) and int(ids[n]) == start:
            n += 1
        return n

    for text, g, w in zip(texts, got, want):
        if leading(g) != leading(w):
            return CheckResult("tokenizer", "", FAIL, f"{len(texts)} texts",
                               f"text {text!r}: {leading(g)} leading </s> (id {start}), expected "
                               f"{leading(w)}: got {list(g)[:4]}..., expected {list(w)[:4]}...")
    return CheckResult("tokenizer", "", PASS, f"{len(texts)} texts, one leading </s> each")


def check_special_tokens(adapter, case: TokenizerCase) -> CheckResult:
    _ensure_tokenizer(adapter, case)
    got = adapter.encode(SPECIAL_TEXTS)
    want = case.ids(SPECIAL_TEXTS)
    special = case.special_ids()
    tok = case.reference.tokenizer
    for text, g, w in zip(SPECIAL_TEXTS, got, want):
        gs = [int(i) for i in g if int(i) in special]
        ws = [int(i) for i in w if int(i) in special]
        if gs != ws:
            return CheckResult("tokenizer", "", FAIL, f"{len(SPECIAL_TEXTS)} texts",
                               f"text {text!r}: special ids {gs}, expected {ws}; the port gave "
                               f"{_show(tok, g)}, expected {_show(tok, w)}")
    return CheckResult("tokenizer", "", PASS, f"{len(SPECIAL_TEXTS)} texts with <pad>, </s>")


def check_encode(adapter, case: TokenizerCase) -> CheckResult:
    _ensure_tokenizer(adapter, case)
    texts = case.texts + SPECIAL_TEXTS
    got = adapter.encode(texts)
    want = case.ids(texts)
    tok = case.reference.tokenizer
    bad = 0
    first = None
    for text, g, w in zip(texts, got, want):
        g = [int(i) for i in g]
        if g != w:
            bad += 1
            if first is None:
                at = next((i for i, (a, b) in enumerate(zip(g, w)) if a != b), min(len(g), len(w)))
                first = (f"text {text!r}: first difference at id {at}: got {_show(tok, g[at:at + 4])}, "
                         f"expected {_show(tok, w[at:at + 4])} (lengths {len(g)} and {len(w)})")
    figures = f"{len(texts)} texts, {sum(len(w) for w in want)} ids, {bad} texts differ"
    return CheckResult("tokenizer", "", FAIL if bad else PASS, figures, first or "")


def check_decode(adapter, case: TokenizerCase) -> CheckResult:
    _ensure_tokenizer(adapter, case)
    texts = case.texts + SPECIAL_TEXTS
    ids = case.ids(texts)
    got = adapter.decode(ids)
    want = case.reference.decode(ids)
    bad = [(t, g, w) for t, g, w in zip(texts, got, want) if g != w]
    detail = f"text {bad[0][0]!r}: decoded {bad[0][1]!r}, expected {bad[0][2]!r}" if bad else ""
    return CheckResult("tokenizer", "", FAIL if bad else PASS,
                       f"{len(texts)} texts, {len(bad)} differ", detail)


def tokenizer_checks(adapter: Adapter, case: TokenizerCase | None, reason: str = "") -> list[Check]:
    def skipped():
        raise NotSupported(reason or "no tokenizer files (vocab.json and merges.txt)")

    names = [("tokenizer.prompt_start", check_prompt_start), ("tokenizer.special_tokens", check_special_tokens),
             ("tokenizer.encode", check_encode), ("tokenizer.decode", check_decode)]
    if case is None:
        return [Check("tokenizer", n, skipped) for n, _ in names]
    return [Check("tokenizer", n, (lambda f=f: f(adapter, case))) for n, f in names]


# ---------------------------------------------------------------------------------- samplers
def _random_probabilities(rng, rows: int = 16, vocab: int = 48):
    # softmax of normal logits with a per-row spread: flat rows and peaked rows
    spread = np.geomspace(0.3, 6.0, rows)[:, None]
    logits = rng.standard_normal((rows, vocab)) * spread
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _dyadic(rows):
    # exact probability rows (powers of two), padded with zeros to one width
    width = max(len(r) for r in rows)
    out = np.zeros((len(rows), width))
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    assert np.all(out.sum(axis=-1) == 1.0)
    return out


def sampler_cases() -> dict[str, list[tuple[SamplerSpec, np.ndarray, bool]]]:
    """check name -> [(spec, probabilities [B, V], exact)]; ``exact`` cases are judged on every row."""
    rng = np.random.default_rng(1234)
    P = _random_probabilities(rng)
    return {
        "samplers.greedy": [(SamplerSpec("greedy"), P, False)],
        "samplers.random": [(SamplerSpec("random"), P, False)],
        "samplers.top_k": [(SamplerSpec("top_k", k=1), P, False), (SamplerSpec("top_k", k=5), P, False)],
        "samplers.top_k_tie": [(SamplerSpec("top_k", k=2), _dyadic([[.25, .25, .25, .125, .125],
                                                                    [.125, .125, .5, .25]]), True),
                               (SamplerSpec("top_k", k=3), _dyadic([[.125, .125, .5, .25]]), True)],
        "samplers.top_p": [(SamplerSpec("top_p", p=0.8), P, False), (SamplerSpec("top_p", p=0.3), P, False)],
        "samplers.top_k_top_p": [(SamplerSpec("top_p", p=0.5, k=4), P, False),
                                 (SamplerSpec("top_p", p=0.9, k=10), P, False)],
        "samplers.top_p_zero": [(SamplerSpec("top_p", p=0.0), P, False)],
        "samplers.top_p_tie": [(SamplerSpec("top_p", p=0.75), _dyadic([[.5, .25, .125, .125]]), True),
                               (SamplerSpec("top_p", p=0.5), _dyadic([[.125, .25, .125, .5]]), True),
                               (SamplerSpec("top_p", p=0.875),
                                _dyadic([[.5, .25, .125, .0625, .0625]]), True)],
        "samplers.temperature": [(SamplerSpec("random", temperature=0.5), P, False),
                                 (SamplerSpec("top_k", k=5, temperature=0.5), P, False),
                                 (SamplerSpec("top_p", p=0.6, k=8, temperature=0.5), P, False),
                                 (SamplerSpec("top_p", p=0.6, temperature=2.0), P, False)],
    }


UNIFORMS_PER_ROW = 64


def _support(weights_row):
    return sorted(int(i) for i in np.flatnonzero(weights_row > 0))


def check_sampler(adapter, cases) -> CheckResult:
    from refopt.random import choose

    grid = (np.arange(UNIFORMS_PER_ROW) + 0.5) / UNIFORMS_PER_ROW
    draws = skipped_rows = 0
    convention = adapter.sampler_convention
    for spec, P, exact in cases:
        W = R.sampler_distribution(spec, P, convention)
        alternatives = [W]
        if exact and convention == "transformers" and spec.name == "top_p":
            # transformers decides an exact tie on rounded log-probabilities: either side is right
            alternatives.append(R.sampler_distribution(spec, P, convention, tie_kept=True))
        rows = np.arange(P.shape[0]) if exact else np.flatnonzero(~R.fragile_rows(spec, P, convention))
        skipped_rows += P.shape[0] - len(rows)
        if len(rows) == 0:
            continue
        rep = np.repeat(rows, UNIFORMS_PER_ROW)
        U = np.tile(grid, len(rows))
        got = np.asarray(adapter.sample(spec, P[rep].copy(), U.copy()))
        draws += len(rep)
        expected = [choose(w[rep], U) for w in alternatives]
        if got.shape != expected[0].shape:
            return CheckResult("samplers", "", FAIL, "", f"{spec.describe()}: returned shape "
                               f"{list(got.shape)}, expected {list(expected[0].shape)}")
        for r in rows:
            at = rep == r
            if any(np.array_equal(got[at], e[at]) for e in expected):
                continue
            i = np.flatnonzero(at & (got != expected[0]))[0]
            port_choices = sorted(set(int(t) for t in got[at]))
            probs = np.array2string(P[r], precision=4, threshold=12, separator=", ")
            return CheckResult(
                "samplers", "", FAIL, f"{draws} draws, {int((got[at] != expected[0][at]).sum())} "
                f"differ in this row",
                f"{spec.describe()} ({convention} rule), probabilities {probs}: "
                f"u={U[i]:.4f} chose {int(got[i])}, expected {int(expected[0][i])}; reference support "
                f"{_support(W[r])}, the port chose among {port_choices} over {UNIFORMS_PER_ROW} draws",
                {"spec": spec._asdict(), "row": int(r), "u": float(U[i]), "got": int(got[i]),
                 "expected": int(expected[0][i])})
    detail = f"{skipped_rows} near-threshold rows left out" if skipped_rows else ""
    return CheckResult("samplers", "", PASS, f"{draws} draws, identical choices", detail)


def sampler_checks(adapter: Adapter) -> list[Check]:
    return [Check("samplers", name, (lambda c=cases: check_sampler(adapter, c)))
            for name, cases in sampler_cases().items()]


# ---------------------------------------------------------------------------------- the suite
@dataclasses.dataclass
class Report:
    adapter: str
    dtype: str
    results: list

    @property
    def failed(self) -> list:
        return [r for r in self.results if r.status == FAIL]

    @property
    def passed(self) -> bool:
        return not self.failed

    def to_json(self) -> str:
        return json.dumps({"adapter": self.adapter, "dtype": self.dtype, "passed": self.passed,
                           "checks": [r.to_dict() for r in self.results]}, indent=1, default=_json_default)

    def table(self, width: int = 110) -> str:
        lines = [f"refopt conform: {self.adapter} ({self.dtype}) against refopt's float64 reference", ""]
        name_w = min(max([len(r.name) for r in self.results] + [5]), 46)
        lines.append(f"{'check':<{name_w}}  {'result':<6}  figures")
        lines.append("-" * min(width, name_w + 80))
        for r in self.results:
            lines.append(f"{r.name:<{name_w}}  {r.status:<6}  {r.figures}")
            if r.status == FAIL and r.detail:
                lines.append(f"{'':<{name_w}}  {'':<6}  -> {r.detail}")
        skipped = [r for r in self.results if r.status == SKIP]
        counts = {s: sum(r.status == s for r in self.results) for s in (PASS, FAIL, SKIP)}
        lines.append("")
        lines.append(f"{counts[PASS]} passed, {counts[FAIL]} failed, {counts[SKIP]} skipped")
        if skipped:
            reasons: dict = {}
            for r in skipped:
                reasons.setdefault(r.detail.removeprefix("skipped: "), []).append(r.name)
            lines.append("skipped:")
            for reason, names in reasons.items():
                shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
                lines.append(f"  {shown}: {reason}")
        return "\n".join(lines)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o) if math.isfinite(o) else str(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def build_suite(adapter: Adapter, cases=(), tokenizer: TokenizerCase | None = None,
                tokenizer_reason: str = "", samplers: bool = True) -> list[Check]:
    """Every check, in report order: per model case, then the tokenizer, then the samplers."""
    checks: list[Check] = []
    for case in cases:
        checks += model_checks(adapter, case)
    checks += tokenizer_checks(adapter, tokenizer, tokenizer_reason)
    if samplers:
        checks += sampler_checks(adapter)
    return checks


def run_conformance(adapter, presets=(), random_configs: int = 0, tokenizer=None, samplers: bool = True,
                    seed: int = 0, progress: Callable[[CheckResult], None] | None = None,
                    streaming: bool = False) -> Report:
    """Run the whole suite.

    ==============  ==============================================================================
    adapter         an :class:`Adapter` or a spec for :func:`refopt.testing.load_adapter`
    presets         preset directories (their models; the first one's tokenizer files are used
                    when ``tokenizer`` is None)
    random_configs  how many random configs (seeds ``seed .. seed+n-1``) to add
    tokenizer       a directory with ``vocab.json`` + ``merges.txt`` (or a KerasHub preset)
    streaming       reference the presets layer by layer (:class:`StreamingCase`), for checkpoints
                    larger than memory
    ==============  ==============================================================================
    """
    from refopt.testing.adapter import load_adapter

    adapter = load_adapter(adapter)
    cases = [StreamingCase(p, seed=seed) if streaming else case_from_preset(p, seed=seed) for p in presets]
    family = getattr(adapter, "config_family", "opt")
    cases += [random_case(seed + i, family=family) for i in range(random_configs)]
    tok_case, reason = None, ""
    sources = [tokenizer] if tokenizer is not None else list(presets)
    for src in sources:
        files = find_tokenizer_files(src)
        if files is not None:
            tok_case = TokenizerCase(*files, seed=seed)
            break
    if tok_case is None:
        reason = (f"no vocab.json/merges.txt in {', '.join(str(s) for s in sources)}" if sources
                  else "no tokenizer files given (pass a preset with vocab.json and merges.txt, or --tokenizer)")
    results = []
    for check in build_suite(adapter, cases, tok_case, reason, samplers):
        result = check.run()
        results.append(result)
        if progress is not None:
            progress(result)
    return Report(adapter.name, adapter.dtype, results)
