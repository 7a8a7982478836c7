"""The bundled model's recipe, on any UTF-8 text file (``refopt train``, ``scripts/train_bundled.py``).

1. split the text by characters: the first ``1 - validation_fraction`` trains, the rest validates;
2. learn a byte-level BPE vocabulary (``vocab_size`` tokens, OPT's special tokens ``<s> <pad> </s>
   <unk>`` at ids 0-3) from the training part only (:func:`refopt.tokenizers.train_bpe`);
3. cut the training tokens into windows of ``sequence_length`` targets; each window's input is
   ``</s>`` followed by the first ``sequence_length - 1`` of its tokens (so a prompt, which the
   preprocessor starts with ``</s>``, looks like a window start).  Every epoch starts the windows
   at a fresh random offset and shuffles them;
4. train a pre-LayerNorm OPT (KerasHub's ``OPTBackbone`` layout) through ``OPTCausalLM.fit`` (one
   call per epoch: the one training loop, device-resident on the cuda backend) with AdamW
   (decoupled weight decay on the matrices and embeddings, none on biases and LayerNorm
   parameters), global-norm clipping, a linear warm-up then cosine decay of the learning rate, and
   dropout, all seeded;
5. measure the validation cross-entropy (nats per token, mean over every validation token, each
   predicted from the preceding tokens of its window, and nats per character) beside a unigram and
   two bigram baselines estimated on the training tokens, and write a KerasHub preset (tokenizer
   and preprocessor included), ``MODEL_CARD.md`` (:mod:`refopt.training.card`) and
   ``refopt_training.json`` into ``out`` (:mod:`refopt.io.saving`: never a lost file).  The preset's
   ``max_sequence_length`` is ``sequence_length`` (:func:`shipped_model`): ``max_sequence_length``
   sizes the position table the model is initialised with (its draws are part of the seeded
   initialisation), and the rows past the training window, never trained, are not shipped.

**Temperature** (``calibration_fraction`` ``c > 0``).  A small model trained for many passes over a
megabyte of text is overconfident on text it has not seen: the bundled model of session 7 scored
1.4570 nats per character on the held-out text with its logits as trained, and 1.4171 with them
divided by 1.3.  So ``c`` of the *training* characters are kept out of the model's training
(its *first* ``c``, :func:`calibration_split`
says why; the tokenizer and the n-gram baselines still read them) and serve only to fit a temperature ``T``
(:func:`fit_temperature`: the ``T`` minimising the cross-entropy of ``softmax(logits / T)`` there).
It is folded into the parameters (:func:`fold_temperature`: the final LayerNorm's ``gamma`` and
``beta`` divided by ``T``, which divides every logit by ``T``, since the tied head reads that norm's
output), so the preset stays a plain OPT that KerasHub loads with the same logits.  Every epoch's
candidates (trained, averaged) are fitted and validated so; the validation text chooses the epoch as
before, and never the temperature.  The default, 0.05, is the bundled model's recipe: on an H200
(2026-12-02) it fitted T = 1.29 and scored 1.4137 nats per character (1.4740 before the
temperature, with 5% fewer training characters), 1.3976 in overlapping windows.  Holding out the
training text's *end* instead cost more than the temperature gained (:func:`calibration_split`).

With ``evaluation_stride`` ``k > 0`` the shipped parameters are also measured in overlapping windows
(:func:`sliding_windows`, :func:`sliding_nats`: each token predicted from at least
``sequence_length - k`` preceding tokens, as transformers' perplexity guide measures), beside the
figure of the non-overlapping windows; the report keeps each window's nats, so a part of the figure
can be checked without recomputing all of it.

With ``average_decay`` ``d > 0`` the recipe also keeps an exponential moving average of the
parameters taken at the end of every epoch (``avg = theta`` after the first, then
``avg = d * avg + (1 - d) * theta``: Polyak averaging of the last ``~1 / (1 - d)`` epochs), measures
its validation loss beside the trained parameters' and ships the averaged parameters (with
``keep_best``: whichever of the two, at whichever epoch, validated best).  The average lives on the
host: ``fit`` brings the parameters back after every epoch anyway, and the average is evaluated by
a second model (on the cuda backend through its own device copy), so the training state on the
device is never disturbed.

:func:`token_log_probs` and :func:`ensemble_loss` measure an ensemble of presets (the mean of their
probabilities): ``scripts/ensemble_eval.py``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Every setting of a training run (the defaults are the bundled model's: run "l2" of
    ``benchmarks/GPU.md``, session 7, with the temperature of session 10).  A vocabulary of 512 did
    better than 1,024-8,192 on this megabyte of text, and 7 x 256 as well as wider or deeper
    models; dropout 0.35, the averaged parameters and the temperature hold off the overfitting.
    ``seed`` 2 is the seed of five (0-4) whose held-out figure was best in session 7's trials
    (without the temperature) -- a choice made on the held-out text, as ``keep_best`` chooses the
    epoch; seed 0 gave 1.4656 nats per character against 1.4570 there."""

    vocab_size: int = 512
    num_layers: int = 7
    num_heads: int = 4
    hidden_dim: int = 256
    intermediate_dim: int = 1024
    max_sequence_length: int = 512    # the position table initialised (the preset keeps sequence_length)
    sequence_length: int = 256        # targets per training window
    batch_size: int = 32              # windows per optimizer step
    epochs: int = 120
    learning_rate: float = 1e-3       # peak, after the warm-up
    final_learning_rate_ratio: float = 0.1   # cosine decay ends at this fraction of the peak
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta_1: float = 0.9
    beta_2: float = 0.99
    global_clipnorm: float = 1.0
    dropout: float = 0.35
    validation_fraction: float = 0.1
    seed: int = 2
    max_steps: int | None = 4000      # the schedule's length: stop after this many steps
    keep_best: int = 1                # 1: ship the epoch with the lowest validation loss
    average_decay: float = 0.8        # > 0: an EMA of the epochs' parameters, shipped (docstring)
    calibration_fraction: float = 0.05   # > 0: the training text's start fits a temperature only
    evaluation_stride: int = 64       # > 0: also the held-out figure in windows moved by this
                                      # (at most sequence_length)

    def check(self):
        from refopt.errors import ConfigError

        for name in ("vocab_size", "num_layers", "num_heads", "hidden_dim", "intermediate_dim",
                     "max_sequence_length", "sequence_length", "batch_size", "epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r}: expected a positive integer")
        if self.sequence_length > self.max_sequence_length:
            raise ConfigError(f"sequence_length={self.sequence_length} exceeds max_sequence_length="
                              f"{self.max_sequence_length}")
        if self.hidden_dim % self.num_heads:
            raise ConfigError(f"hidden_dim={self.hidden_dim} is not divisible by num_heads="
                              f"{self.num_heads}")
        if not 0 < self.validation_fraction < 1:
            raise ConfigError(f"validation_fraction={self.validation_fraction!r}: expected a number "
                              "strictly between 0 and 1")
        if not 0 <= self.calibration_fraction < 1:
            raise ConfigError(f"calibration_fraction={self.calibration_fraction!r}: expected a "
                              "number in [0, 1)")
        if isinstance(self.evaluation_stride, bool) or not isinstance(self.evaluation_stride, int) \
                or self.evaluation_stride < 0:
            raise ConfigError(f"evaluation_stride={self.evaluation_stride!r}: expected an integer "
                              ">= 0 (0: not measured)")
        if not 0 <= self.average_decay < 1:
            raise ConfigError(f"average_decay={self.average_decay!r}: expected a number in [0, 1)")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps={self.max_steps!r}: expected a positive integer")
        return self


# ----------------------------------------------------------------------------------- data
def read_text(path) -> str:
    """The UTF-8 text of ``path``; a clear :class:`refopt.errors.TrainingError` otherwise."""
    from refopt.errors import TrainingError
    from refopt.tokenizers.trainer import read_training_text

    path = Path(path)
    text = read_training_text(path)          # a regular file (never blocking), UTF-8, bounded
    if not text.strip():
        raise TrainingError(f"{path}: the file is empty")
    return text


def split_text(text: str, validation_fraction: float) -> tuple[str, str]:
    """(train, validation): the first ``1 - validation_fraction`` of the characters, the rest."""
    cut = int(len(text) * (1 - validation_fraction))
    return text[:cut], text[cut:]


def calibration_split(train_text: str, calibration_fraction: float) -> tuple[str, str]:
    """(calibration, fit): the first ``calibration_fraction`` of the training characters, which
    only fit the temperature, and the rest, which trains the model.  The *start*: the end of the
    training text runs on into the play the validation text is taken from, and holding it out
    instead cost the validation figure 11% (3.03 against 2.73 nats per token, H200 trial of
    2026-12-02, ``benchmarks/GPU.md``)."""
    cut = int(len(train_text) * calibration_fraction)
    return train_text[:cut], train_text[cut:]


def training_windows(ids: np.ndarray, sequence_length: int, offset: int, start_id: int):
    """Complete windows of ``ids`` from ``offset``: inputs ``[N, S]`` (``start_id`` then the
    window's first ``S - 1`` tokens) and targets ``[N, S]`` (the window's ``S`` tokens)."""
    S = sequence_length
    n = (len(ids) - offset) // S
    y = ids[offset:offset + n * S].reshape(n, S)                                # [N, S]
    x = np.concatenate([np.full((n, 1), start_id, ids.dtype), y[:, :-1]], axis=1)  # [N, S]
    return x, y


def evaluation_windows(ids: np.ndarray, sequence_length: int, start_id: int, pad_id: int):
    """Windows covering every token of ``ids`` exactly once as a target: inputs ``[N, S]``,
    padding mask, targets and weights (0 on the padding of the last, shorter window)."""
    S = sequence_length
    n = math.ceil(len(ids) / S)
    y = np.full(n * S, pad_id, np.int64)
    y[:len(ids)] = ids
    y = y.reshape(n, S)                                                        # [N, S]
    w = (np.arange(n * S) < len(ids)).reshape(n, S)                            # [N, S]
    x = np.concatenate([np.full((n, 1), start_id, np.int64), y[:, :-1]], axis=1)
    mask = np.concatenate([np.ones((n, 1), bool), w[:, :-1]], axis=1)          # input is real
    return x, mask, y, w


def validation_loss(lm, ids: np.ndarray, sequence_length: int, batch_size: int = 64) -> float:
    """Mean cross-entropy (nats per token) of ``lm`` over every token of ``ids``, in windows of
    ``sequence_length`` each starting from ``</s>`` (evaluation mode): ``lm.evaluate``'s loss,
    ``sum(w * CE) / (windows * sequence_length)`` accumulated in float64, times the positions over
    the tokens (the padding of the last window weighs 0)."""
    cfg = lm.backbone.config
    x, mask, y, w = evaluation_windows(ids, sequence_length, cfg.bos_token_id, cfg.pad_token_id)
    loss, _ = lm.evaluate({"token_ids": x, "padding_mask": mask}, y, sample_weight=w,
                          batch_size=batch_size, verbose=0)
    return loss * x.size / len(ids)


def token_log_probs(lm, ids: np.ndarray, sequence_length: int, batch_size: int = 64) -> np.ndarray:
    """``log p(token)`` ``[len(ids)]`` (float64) of every token of ``ids`` under ``lm``, in the
    windows of :func:`validation_loss` (evaluation mode): ``-token_log_probs(...).mean()`` is
    :func:`validation_loss`'s figure."""
    cfg = lm.backbone.config
    x, mask, y, w = evaluation_windows(ids, sequence_length, cfg.bos_token_id, cfg.pad_token_id)
    return window_log_probs(lm, x, mask, y, batch_size).reshape(-1)[w.reshape(-1)]


def _window_logits(lm, x, mask, batch_size):
    # (rows, logits [b, S, V]) of windows x, batch by batch (evaluation mode)
    for start in range(0, len(x), batch_size):
        part = slice(start, start + batch_size)
        yield part, lm.predict({"token_ids": x[part], "padding_mask": mask[part]},
                               batch_size=batch_size, verbose=0)


def window_log_probs(lm, x, mask, y, batch_size: int = 64) -> np.ndarray:
    """``log p(y[n, s] | x[n, :s + 1])`` ``[N, S]`` (float64) of windows ``x`` (evaluation mode)."""
    out = np.empty(x.shape, np.float64)                                        # [N, S]
    for part, logits in _window_logits(lm, x, mask, batch_size):
        logits = np.asarray(logits, np.float64)                               # [b, S, V]
        top = logits.max(axis=-1, keepdims=True)
        log_z = np.log(np.exp(logits - top).sum(axis=-1)) + top[..., 0]       # [b, S]
        out[part] = np.take_along_axis(logits, y[part][..., None], axis=-1)[..., 0] - log_z
    return out


def ensemble_loss(log_probs) -> float:
    """Nats per token of the ensemble whose probability is the mean of its members': ``log_probs``
    is a sequence of :func:`token_log_probs` arrays over the same tokens (one per model)."""
    lp = np.stack([np.asarray(a, np.float64) for a in log_probs])              # [K, T]
    top = lp.max(axis=0)
    return float(-(np.log(np.exp(lp - top).mean(axis=0)) + top).mean())


def sliding_windows(ids: np.ndarray, sequence_length: int, stride: int, start_id: int,
                    pad_id: int):
    """Overlapping windows in which every token of ``ids`` is a target exactly once: the first
    window as :func:`evaluation_windows`' (its ``S`` tokens all targets), then for each next block
    of ``stride`` tokens a window of the ``S`` tokens ending with it (input ``</s>`` then the first
    ``S - 1`` of them), weighted on the block alone -- each of those targets predicted from at least
    ``S - stride`` preceding tokens.  ``stride == S`` on a multiple of ``S`` tokens gives
    :func:`evaluation_windows`' windows.  Returns inputs ``[N, S]``, padding mask, targets and
    weights, as :func:`evaluation_windows`."""
    S, n = sequence_length, len(ids)
    if n <= S or not 0 < stride <= S:
        if n <= S:
            return evaluation_windows(ids, S, start_id, pad_id)
        raise ValueError(f"stride={stride}: expected 1..{S}")
    ends = np.concatenate([[S], np.arange(S + stride, n + stride, stride).clip(max=n)])  # block ends
    starts = np.concatenate([[0], ends[:-1]])                                  # block starts
    idx = ends[:, None] - S + np.arange(S)[None, :]                            # [N, S] token indices
    y = np.asarray(ids, np.int64)[idx]
    x = np.concatenate([np.full((len(ends), 1), start_id, np.int64), y[:, :-1]], axis=1)
    w = idx >= starts[:, None]
    return x, np.ones(x.shape, bool), y, w


def sliding_nats(lm, ids: np.ndarray, sequence_length: int, stride: int, windows=None,
                 batch_size: int = 64) -> np.ndarray:
    """The nats of each window's targets ``[N]`` (float64) in the windows of
    :func:`sliding_windows` (evaluation mode), or of the windows numbered ``windows`` only: their
    total over all windows divided by ``len(ids)`` is the mean cross-entropy per token."""
    cfg = lm.backbone.config
    x, mask, y, w = sliding_windows(ids, sequence_length, stride, cfg.bos_token_id, cfg.pad_token_id)
    if windows is not None:
        x, mask, y, w = (a[np.asarray(windows, np.int64)] for a in (x, mask, y, w))
    return -(window_log_probs(lm, x, mask, y, batch_size) * w).sum(axis=1)


def fold_temperature(params: dict, temperature: float) -> dict:
    """``params`` whose logits are divided by ``temperature``: the final LayerNorm's ``gamma`` and
    ``beta`` divided by it (the tied head multiplies that norm's output by the token table, so
    every logit is divided by ``temperature``, up to float rounding).  New arrays; ``params`` is
    left as it is."""
    out = dict(params)
    for key in ("final_layer_norm.gamma", "final_layer_norm.beta"):
        out[key] = (np.asarray(params[key], np.float64) / temperature).astype(params[key].dtype)
    return out


def fit_temperature(logits: np.ndarray, targets: np.ndarray, start: float = 1.0) -> float:
    """The temperature ``T`` in ``[1/64, 64]`` minimising the mean cross-entropy of
    ``softmax(logits / T)`` at ``targets`` (``logits [N, V]``).  With ``b = 1 / T`` the loss
    ``mean(logsumexp(b z) - b z_y)`` is convex in ``b`` (its second derivative is the mean variance
    of ``z`` under the softmax), so Newton's method from ``b = 1 / start``, each step limited to a
    factor of 4 and to the interval, and halved while the loss grows, finds the minimum (at an end
    of the interval when the loss keeps falling past it); ``start`` when no other ``b`` improves on
    it (logits that are all equal, say).  At most 40 evaluations of the loss."""
    lo, hi = 1 / 64, 64.0
    z = np.asarray(logits, np.float32)
    z = z - z.max(axis=1, keepdims=True)                                       # [N, V], <= 0
    zy = np.take_along_axis(z, np.asarray(targets, np.int64)[:, None], axis=1)[:, 0].astype(np.float64)
    evaluations = 0

    def stats(b):
        nonlocal evaluations
        evaluations += 1
        e = np.exp(np.float32(b) * z)                                          # [N, V] float32
        total = e.sum(axis=1, dtype=np.float64)
        ez = e * z
        mean = ez.sum(axis=1, dtype=np.float64) / total                        # E_p[z]
        var = (ez * z).sum(axis=1, dtype=np.float64) / total - mean * mean     # Var_p[z]
        return float(np.mean(np.log(total) - b * zy)), float(np.mean(mean - zy)), float(np.mean(var))

    b = min(max(1.0 / start, lo), hi)
    loss, g, h = stats(b)
    while evaluations < 40 and math.isfinite(g) and g != 0:
        if h > 0:
            new = b - g / h
        else:                                      # flat curvature: move by the largest step
            new = b / 4 if g > 0 else 4 * b
        new = min(max(new, b / 4, lo), 4 * b, hi)
        if abs(new - b) <= 1e-5 * b:               # converged (T to 1e-5)
            break
        trial = stats(new)
        # a step that does not lower the loss is halved, unless it is already small: then the
        # loss (summed in float64 from float32 terms) no longer resolves it
        while trial[0] > loss and abs(new - b) > 1e-3 * b and evaluations < 40:
            new = (new + b) / 2
            trial = stats(new)
        if trial[0] > loss:
            break
        b, (loss, g, h) = new, trial
    return 1.0 / b


def calibration_logits(lm, ids: np.ndarray, sequence_length: int, batch_size: int = 64):
    """``(logits [T, V] float32, targets [T])`` of every token of ``ids`` in the windows of
    :func:`validation_loss` (evaluation mode): what :func:`fit_temperature` fits."""
    cfg = lm.backbone.config
    x, mask, y, w = evaluation_windows(ids, sequence_length, cfg.bos_token_id, cfg.pad_token_id)
    rows = [np.asarray(logits, np.float32)[w[part]]
            for part, logits in _window_logits(lm, x, mask, batch_size)]
    return np.concatenate(rows), y[w]


def ngram_baselines(train_ids: np.ndarray, val_ids: np.ndarray, vocab_size: int,
                    sequence_length: int, start_id: int) -> dict:
    """Cross-entropy (nats per token) on ``val_ids`` of n-gram models counted on ``train_ids``.

    * unigram, add-one: ``p(w) = (c(w) + 1) / (N + V)``;
    * bigram, add-one: ``p(w | v) = (c(v, w) + 1) / (c(v) + V)``;
    * bigram, Witten-Bell interpolation with the add-one unigram:
      ``p(w | v) = (c(v, w) + T(v) p(w)) / (c(v) + T(v))``, ``T(v)`` the number of distinct tokens
      seen after ``v``; a context never seen in training falls back to ``p(w)``.

    The bigram's context of each validation token is the token the model sees just before it:
    the previous token, or ``</s>`` at the start of each evaluation window (a context absent from
    the training stream, so there the bigrams give the unigram's or the uniform probability).
    """
    V = vocab_size
    N = len(train_ids)
    uni = (np.bincount(train_ids, minlength=V) + 1.0) / (N + V)                # [V]
    prev, nxt = train_ids[:-1].astype(np.int64), train_ids[1:].astype(np.int64)
    keys, pair_counts = np.unique(prev * V + nxt, return_counts=True)
    ctx_count = np.bincount(prev, minlength=V).astype(np.float64)              # c(v)
    ctx_types = np.bincount(keys // V, minlength=V).astype(np.float64)         # T(v)

    val = val_ids.astype(np.int64)
    context = np.concatenate([[start_id], val[:-1]])
    context[::sequence_length] = start_id                                      # window starts
    pos = np.searchsorted(keys, context * V + val)
    pos = np.minimum(pos, len(keys) - 1)
    c_vw = np.where(keys[pos] == context * V + val, pair_counts[pos], 0).astype(np.float64)
    c_v, t_v, p_w = ctx_count[context], ctx_types[context], uni[val]
    add_one = (c_vw + 1.0) / (c_v + V)
    seen = c_v > 0
    witten_bell = np.where(seen, (c_vw + t_v * p_w) / np.where(seen, c_v + t_v, 1.0), p_w)
    out = {}
    for name, p in (("unigram_add_one", p_w), ("bigram_add_one", add_one),
                    ("bigram_witten_bell", witten_bell)):
        ce = float(-np.log(p).mean())
        out[name] = {"loss": ce, "perplexity": math.exp(ce)}
    return out


# ----------------------------------------------------------------------------------- training
def schedule_for(recipe: Recipe, total: int):
    """The learning-rate schedule: a linear warm-up of ``min(warmup_steps, total // 5)`` steps to
    the peak, then cosine decay to ``final_learning_rate_ratio`` of it at step ``total``."""
    from refopt.training.schedules import CosineDecay

    warmup = min(recipe.warmup_steps, total // 5)
    peak = recipe.learning_rate
    if warmup:
        return warmup, CosineDecay(peak / warmup, decay_steps=max(total - warmup, 1),
                                   alpha=recipe.final_learning_rate_ratio, warmup_target=peak,
                                   warmup_steps=warmup)
    return 0, CosineDecay(peak, decay_steps=total, alpha=recipe.final_learning_rate_ratio)


def train(text_path, out, recipe: Recipe = Recipe(), *, backend=None, command: str | None = None,
          card: dict | None = None, verbose=None, overwrite: bool = False) -> dict:
    """Run ``recipe`` on the UTF-8 file ``text_path``, write the preset to ``out`` and return the
    report (also written as ``refopt_training.json``).  ``card`` holds optional ``summary``,
    ``limits`` and ``usage`` paragraphs for ``MODEL_CARD.md`` (:func:`refopt.training.card.model_card`);
    ``verbose`` is ``fit``'s (default: a progress bar on a terminal, else a line per epoch).
    ``out`` must be missing or empty unless ``overwrite`` (then only its preset files are
    replaced, :mod:`refopt.io.saving`); that is checked before training starts."""
    from refopt import backend as _backend
    from refopt.errors import DestinationError, TrainingError
    from refopt.io import saving
    from refopt.models import OPTBackbone, OPTCausalLM, OPTCausalLMPreprocessor, OPTTokenizer
    from refopt.optimizers import AdamW
    from refopt.tokenizers import train_bpe
    from refopt.training.card import model_card

    recipe.check()
    if not overwrite and os.path.isdir(out) and os.listdir(out):
        raise DestinationError(f"{out} already exists; pass --force (overwrite=True) to replace "
                               "the preset there (other files are kept)")
    saving.check_destination(out, overwrite, "preset")
    started = time.time()
    text = read_text(text_path)
    train_text, val_text = split_text(text, recipe.validation_fraction)
    t0 = time.perf_counter()
    vocabulary, merges = train_bpe([train_text], vocab_size=recipe.vocab_size)
    tokenizer = OPTTokenizer(vocabulary=vocabulary, merges=merges)
    tokenizer_seconds = time.perf_counter() - t0
    train_ids = np.asarray(tokenizer(train_text), np.int64)
    val_ids = np.asarray(tokenizer(val_text), np.int64)
    # the model trains on fit_ids; the calibration part (the training text's start) fits the temperature
    cal_text, fit_text = calibration_split(train_text, recipe.calibration_fraction)
    fit_ids = np.asarray(tokenizer(fit_text), np.int64) if cal_text else train_ids
    cal_ids = np.asarray(tokenizer(cal_text), np.int64) if cal_text else None
    S, B = recipe.sequence_length, recipe.batch_size
    if len(fit_ids) < S + 1:
        raise TrainingError(f"{text_path}: the training part has {len(fit_ids)} tokens, fewer "
                            f"than one window of sequence_length={S}; use a longer text or a "
                            "smaller --sequence-length")
    if len(val_ids) == 0:
        raise TrainingError(f"{text_path}: the validation part is empty; raise "
                            "--validation-fraction or use a longer text")
    if recipe.calibration_fraction and (cal_ids is None or len(cal_ids) == 0):
        raise TrainingError(f"{text_path}: the calibration part is empty; raise "
                            "--calibration-fraction, set it to 0, or use a longer text")

    vocab_rows = len(vocabulary)     # the trainer may stop short of vocab_size on a small text
    backbone = OPTBackbone(vocabulary_size=vocab_rows, num_layers=recipe.num_layers,
                           num_heads=recipe.num_heads, hidden_dim=recipe.hidden_dim,
                           intermediate_dim=recipe.intermediate_dim, dropout=recipe.dropout,
                           max_sequence_length=recipe.max_sequence_length, seed=recipe.seed)
    backbone.backend = backend
    preprocessor = OPTCausalLMPreprocessor(tokenizer, sequence_length=recipe.max_sequence_length)
    lm = OPTCausalLM(backbone, preprocessor=preprocessor)
    cfg = backbone.config
    backend_name = _backend.resolve(backend)

    rng = np.random.default_rng(recipe.seed)
    offsets = [int(o) for o in rng.integers(0, S, size=recipe.epochs)]
    per_epoch = [math.ceil(((len(fit_ids) - o) // S) / B) for o in offsets]
    total = sum(per_epoch) if recipe.max_steps is None else min(sum(per_epoch), recipe.max_steps)
    warmup, schedule = schedule_for(recipe, total)
    optimizer = AdamW(learning_rate=schedule, weight_decay=recipe.weight_decay,
                      beta_1=recipe.beta_1, beta_2=recipe.beta_2,
                      global_clipnorm=recipe.global_clipnorm)
    optimizer.exclude_from_weight_decay(["bias", "gamma", "beta"])
    lm.compile(optimizer=optimizer)
    if verbose is None:
        verbose = 1 if sys.stderr.isatty() else 2

    history = []
    step = 0
    best = None                          # (val, epoch, params, "trained"/"average", temperature)
    d = recipe.average_decay
    average = None                       # the EMA of the epochs' parameters
    eval_lm = _evaluation_model(backbone, backend)           # measures what the training model is not
    temperatures = {"trained": 1.0, "average": 1.0}          # the last fitted: the next fit's start

    def measured(kind, params, model):
        # (validation loss, temperature) of a candidate ``model`` holding ``params``: with a
        # calibration part, the temperature fitted there and the loss of the parameters it is
        # folded into (measured by eval_lm)
        if cal_ids is None:
            return validation_loss(model, val_ids, S), 1.0
        logits, targets = calibration_logits(model, cal_ids, S)
        t = temperatures[kind] = fit_temperature(logits, targets, start=temperatures[kind])
        eval_lm.backbone.set_params(fold_temperature(params, t), source="the calibrated parameters")
        return validation_loss(eval_lm, val_ids, S), t
    t_train = time.perf_counter()
    for epoch, offset in enumerate(offsets):
        if step >= total:
            break
        x, y = training_windows(fit_ids, S, offset, cfg.bos_token_id)
        order = rng.permutation(len(x))[:(total - step) * B]          # this epoch's windows, shuffled
        fit_seed = int(rng.integers(2 ** 63))                           # dropout masks
        if verbose:
            print(f"epoch {epoch + 1}/{recipe.epochs}: {math.ceil(len(order) / B)} steps", flush=True)
        h = lm.fit({"token_ids": x[order], "padding_mask": np.ones((len(order), S), bool)}, y[order],
                   batch_size=B, epochs=1, shuffle=False, verbose=verbose, seed=fit_seed)
        if optimizer.iterations - step != math.ceil(len(order) / B):
            raise TrainingError("the optimizer did not take one step per batch")  # a bug, not input
        step = optimizer.iterations
        # fresh arrays (never updated in place: a device copy is keyed by its arrays' identity)
        trained = {k: np.array(v, copy=True) for k, v in backbone.params.items()}
        val, t = measured("trained", trained, lm)
        elapsed = time.perf_counter() - t_train
        entry = {"epoch": epoch + 1, "steps": step, "train_loss": h.history["loss"][0],
                 "val_loss": val, "elapsed_s": round(elapsed, 1)}
        if cal_ids is not None:
            entry["temperature"] = t
        candidates = [(val, "trained", trained, t)]
        if d:
            average = (trained if average is None
                       else {k: (d * a + (1 - d) * trained[k]).astype(a.dtype) for k, a in average.items()})
            eval_lm.backbone.set_params(average, source="the averaged parameters")
            entry["val_loss_average"], t = measured("average", average, eval_lm)
            if cal_ids is not None:
                entry["temperature_average"] = t
            candidates.append((entry["val_loss_average"], "average", average, t))
        history.append(entry)
        for v, kind, params, t in candidates:
            if recipe.keep_best and (best is None or v < best[0]):
                best = (v, epoch + 1, params, kind, t)
        if verbose:
            averaged = (f", averaged {entry['val_loss_average']:.4f}" if d else "")
            print(f"epoch {epoch + 1}: train loss {h.history['loss'][0]:.4f}, validation loss "
                  f"{val:.4f} (perplexity {math.exp(val):.2f}){averaged}, {elapsed:.0f} s, "
                  f"{step * B * S / elapsed:,.0f} tokens/s", flush=True)
    train_seconds = time.perf_counter() - t_train

    if best is None:                                  # the last epoch's, averaged when averaging
        last = history[-1]
        best = ((last["val_loss_average"], len(history), average, "average",
                 last.get("temperature_average", 1.0)) if d else
                (last["val_loss"], len(history), trained, "trained", last.get("temperature", 1.0)))
    val, kept_epoch, params, kept_weights, temperature = best
    shipped = fold_temperature(params, temperature) if cal_ids is not None else params
    out_lm = shipped_model(lm, shipped, S)               # the positions the windows trained
    validation = {"loss": val, "perplexity": math.exp(val),
                  "nats_per_character": val * len(val_ids) / len(val_text)}
    if cal_ids is not None:
        # the same parameters before the temperature was folded in
        eval_lm.backbone.set_params(params, source="the kept parameters, as trained")
        raw = validation_loss(eval_lm, val_ids, S)
        validation.update(temperature=temperature, uncalibrated_loss=raw,
                          uncalibrated_nats_per_character=raw * len(val_ids) / len(val_text))
    if recipe.evaluation_stride:
        eval_lm.backbone.set_params(shipped, source="the kept parameters")
        stride = min(recipe.evaluation_stride, S)
        nats = sliding_nats(eval_lm, val_ids, S, stride)
        slid = float(nats.sum() / len(val_ids))
        validation["sliding"] = {"stride": stride, "loss": slid, "perplexity": math.exp(slid),
                                 "nats_per_character": slid * len(val_ids) / len(val_text),
                                 "window_nats": [round(float(v), 6) for v in nats]}
    report = {
        "refopt_version": _version(),
        "command": command,
        "text": os.path.basename(str(text_path)),
        "text_characters": len(text),
        "train_characters": len(train_text),
        "validation_characters": len(val_text),
        "train_tokens": int(len(train_ids)),
        "validation_tokens": int(len(val_ids)),
        "fit_characters": len(fit_text),
        "fit_tokens": int(len(fit_ids)),
        "calibration_characters": len(cal_text),
        "calibration_tokens": 0 if cal_ids is None else int(len(cal_ids)),
        "recipe": dataclasses.asdict(recipe),
        "vocabulary_size": vocab_rows,
        "merges": len(merges),
        "max_sequence_length": out_lm.backbone.config.max_sequence_length,
        "parameters": out_lm.backbone.count_params(),
        "backend": backend_name,
        "kernels": _kernels(backend_name),
        "steps": step,
        "warmup_steps": warmup,
        "tokens_seen": step * B * S,
        "tokenizer_seconds": round(tokenizer_seconds, 2),
        "train_seconds": round(train_seconds, 1),
        "wall_seconds": round(time.time() - started, 1),
        "machine": _machine(backend_name),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "history": history,
        "kept_epoch": kept_epoch,
        "kept_weights": kept_weights,
        "validation": validation,
        "baselines": ngram_baselines(train_ids, val_ids, vocab_rows, S, cfg.bos_token_id),
    }
    with saving.PresetSave(out, overwrite=overwrite) as staging:
        out_lm.write_preset_files(staging)
        staging.write_json("refopt_training.json", report)
        staging.write_text("MODEL_CARD.md", model_card(report, staging.directory, Path(out).name,
                                                       **(card or {})))
    return report


def shipped_model(lm, params: dict, sequence_length: int):
    """The causal LM a preset ships: ``params`` (``lm``'s architecture) in a model whose
    ``max_sequence_length`` is the training window, ``sequence_length``, and whose position table
    keeps that many rows.  The rows past the window were initialised and never trained: the
    bundled model's positions 256-511 score 4.28 nats per token on the held-out text, worse than
    its bigram (3.62) and far from positions 0-255 (2.62), so a longer table would only let
    generation and evaluation run into them.  The logits of sequences up to ``sequence_length``
    are the same as ``lm``'s with ``params``."""
    from refopt.models import OPTBackbone, OPTCausalLM, OPTCausalLMPreprocessor

    if sequence_length >= lm.backbone.config.max_sequence_length:
        lm.backbone.set_params(params, source="the kept parameters")
        return lm
    backbone = OPTBackbone.from_config(dict(lm.backbone.get_config(),
                                            max_sequence_length=sequence_length))
    kept = dict(params, embed_positions=np.ascontiguousarray(params["embed_positions"][:sequence_length]))
    backbone.set_params(kept, source="the kept parameters")
    preprocessor = OPTCausalLMPreprocessor(lm.preprocessor.tokenizer, sequence_length=sequence_length)
    return OPTCausalLM(backbone, preprocessor=preprocessor)


def _kernels(backend_name: str) -> dict | None:
    """The CUDA kernel variants a ``cuda`` run used (``REFOPT_GEMM``, ``REFOPT_FLASH``,
    ``REFOPT_FLASH_BWD``: the same results up to float rounding, different speeds and compile
    times); None on the other backends."""
    if backend_name != "cuda":
        return None
    from refopt.kernels.cuda import attention, flash_backward, gemm

    return {"gemm": gemm.VARIANT, "flash_forward": attention.VARIANT,
            "flash_backward": flash_backward.VARIANT}


def _evaluation_model(backbone, backend):
    """A second causal LM of ``backbone``'s architecture (random weights until ``set_params``), on
    the same backend: it measures the averaged parameters without touching the training model."""
    from refopt.models import OPTBackbone, OPTCausalLM

    other = OPTBackbone.from_config(backbone.get_config())
    other.backend = backend
    return OPTCausalLM(other)


def _version():
    from refopt import __version__

    return __version__


def _machine(backend_name: str) -> str:
    cpu = f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}"
    if backend_name == "cuda":
        from numba import cuda

        name = cuda.get_current_device().name
        return f"{name.decode() if isinstance(name, bytes) else name} ({cpu})"
    return cpu
