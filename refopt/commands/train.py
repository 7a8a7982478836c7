"""``refopt train TEXT_FILE``: the bundled model's recipe on any UTF-8 text file.

The recipe (:class:`Recipe`; ``scripts/train_bundled.py`` runs it on tinyshakespeare to make
``data/refopt_shakespeare``):

1. split the text by characters: the first ``1 - validation_fraction`` trains, the rest validates;
2. learn a byte-level BPE vocabulary (``vocab_size`` tokens, OPT's special tokens ``<s> <pad> </s>
   <unk>`` at ids 0-3) from the training part only (:func:`refopt.tokenizers.train_bpe`);
3. cut the training tokens into windows of ``sequence_length`` targets; each window's input is
   ``</s>`` followed by the first ``sequence_length - 1`` of its tokens (so a prompt, which the
   preprocessor starts with ``</s>``, looks like a window start).  Every epoch starts the windows
   at a fresh random offset and shuffles them;
4. train a pre-LayerNorm OPT (KerasHub's ``OPTBackbone`` layout) with AdamW (decoupled weight
   decay on the matrices and embeddings, none on biases and LayerNorm parameters), global-norm
   clipping, a linear warm-up then cosine decay of the learning rate, and dropout, all seeded;
5. measure the validation cross-entropy (nats per token, mean over every validation token, each
   predicted from the preceding tokens of its window) beside a unigram and two bigram baselines
   estimated on the training tokens, and write a KerasHub preset (tokenizer and preprocessor
   included), ``MODEL_CARD.md`` and ``refopt_training.json`` into ``--out``, atomically.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Every setting of a training run (the defaults are the bundled model's)."""

    vocab_size: int = 8192
    num_layers: int = 4
    num_heads: int = 4
    hidden_dim: int = 256
    intermediate_dim: int = 1024
    max_sequence_length: int = 256
    sequence_length: int = 256        # targets per training window
    batch_size: int = 8               # windows per optimizer step
    epochs: int = 4
    learning_rate: float = 1e-3       # peak, after the warm-up
    final_learning_rate_ratio: float = 0.1   # cosine decay ends at this fraction of the peak
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta_1: float = 0.9
    beta_2: float = 0.95
    global_clipnorm: float = 1.0
    dropout: float = 0.1
    validation_fraction: float = 0.1
    seed: int = 0
    max_steps: int | None = None      # stop after this many steps (quick runs)

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
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps={self.max_steps!r}: expected a positive integer")
        return self


# ----------------------------------------------------------------------------------- data
def read_text(path) -> str:
    """The UTF-8 text of ``path``; a clear :class:`refopt.errors.TrainingError` otherwise."""
    from refopt.errors import TrainingError

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TrainingError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise TrainingError(f"{path}: is a directory; expected a UTF-8 text file") from None
    except UnicodeDecodeError as e:
        raise TrainingError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    if not text.strip():
        raise TrainingError(f"{path}: the file is empty")
    return text


def split_text(text: str, validation_fraction: float) -> tuple[str, str]:
    """(train, validation): the first ``1 - validation_fraction`` of the characters, the rest."""
    cut = int(len(text) * (1 - validation_fraction))
    return text[:cut], text[cut:]


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


def validation_loss(lm, ids: np.ndarray, sequence_length: int, batch_size: int = 8) -> float:
    """Mean cross-entropy (nats per token, accumulated in float64) of ``lm`` over every token of
    ``ids``, in windows of ``sequence_length`` each starting from ``</s>`` (no dropout)."""
    cfg = lm.backbone.config
    x, mask, y, w = evaluation_windows(ids, sequence_length, cfg.bos_token_id, cfg.pad_token_id)
    total = 0.0
    for i in range(0, len(x), batch_size):
        logits = lm.predict({"token_ids": x[i:i + batch_size], "padding_mask": mask[i:i + batch_size]})
        logits = logits.astype(np.float64)                                     # [b, S, V]
        top = logits.max(-1, keepdims=True)
        logz = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]              # [b, S]
        picked = np.take_along_axis(logits, y[i:i + batch_size, :, None], -1)[..., 0]
        total += float(((logz - picked) * w[i:i + batch_size]).sum())
    return total / len(ids)


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
class _Progress:
    """A tqdm bar when stderr is a terminal (and tqdm is installed), else a line every
    ``every`` steps."""

    def __init__(self, total, every, stream=sys.stderr):
        self.total, self.every, self.stream = total, every, stream
        self.bar = None
        if stream.isatty():
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, unit="step", file=stream, dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, step, info: dict):
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(info, refresh=False)
        elif step % self.every == 0 or step == self.total:
            fields = " ".join(f"{k} {v}" for k, v in info.items())
            print(f"step {step}/{self.total} {fields}", file=self.stream, flush=True)

    def write(self, line):
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def train(text_path, out, recipe: Recipe = Recipe(), *, backend=None, log_every: int = 50,
          command: str | None = None, card: dict | None = None) -> dict:
    """Run ``recipe`` on the UTF-8 file ``text_path``, write the preset to ``out`` and return the
    report (also written as ``refopt_training.json``).  ``card`` holds optional ``summary``,
    ``limits`` and ``usage`` paragraphs for ``MODEL_CARD.md`` (see :func:`model_card`)."""
    from refopt import backend as _backend
    from refopt.errors import TrainingError
    from refopt.io import presets
    from refopt.models import OPTBackbone, OPTCausalLM, OPTCausalLMPreprocessor, OPTTokenizer
    from refopt.optimizers import AdamW
    from refopt.tokenizers import train_bpe
    from refopt.training.gradients import Batch, forward_backward
    from refopt.training.schedules import CosineDecay

    recipe.check()
    started = time.time()
    text = read_text(text_path)
    train_text, val_text = split_text(text, recipe.validation_fraction)
    t0 = time.perf_counter()
    vocabulary, merges = train_bpe([train_text], vocab_size=recipe.vocab_size)
    tokenizer = OPTTokenizer(vocabulary=vocabulary, merges=merges)
    tokenizer_seconds = time.perf_counter() - t0
    train_ids = np.asarray(tokenizer(train_text), np.int64)
    val_ids = np.asarray(tokenizer(val_text), np.int64)
    S, B = recipe.sequence_length, recipe.batch_size
    if len(train_ids) < S + 1:
        raise TrainingError(f"{text_path}: the training part has {len(train_ids)} tokens, fewer "
                            f"than one window of sequence_length={S}; use a longer text or a "
                            "smaller --sequence-length")
    if len(val_ids) == 0:
        raise TrainingError(f"{text_path}: the validation part is empty; raise "
                            "--validation-fraction or use a longer text")

    vocab_rows = len(vocabulary)     # the trainer may stop short of vocab_size on a small text
    backbone = OPTBackbone(vocabulary_size=vocab_rows, num_layers=recipe.num_layers,
                           num_heads=recipe.num_heads, hidden_dim=recipe.hidden_dim,
                           intermediate_dim=recipe.intermediate_dim, dropout=recipe.dropout,
                           max_sequence_length=recipe.max_sequence_length, seed=recipe.seed)
    backbone.backend = backend
    preprocessor = OPTCausalLMPreprocessor(tokenizer, sequence_length=recipe.max_sequence_length)
    lm = OPTCausalLM(backbone, preprocessor=preprocessor)
    cfg, ops = backbone.config, backbone.ops
    backend_name = _backend.resolve(backend)

    rng = np.random.default_rng(recipe.seed)
    offsets = [int(o) for o in rng.integers(0, S, size=recipe.epochs)]
    per_epoch = [math.ceil(((len(train_ids) - o) // S) / B) for o in offsets]
    total = sum(per_epoch) if recipe.max_steps is None else min(sum(per_epoch), recipe.max_steps)
    warmup = min(recipe.warmup_steps, total // 5)
    peak = recipe.learning_rate
    if warmup:
        schedule = CosineDecay(peak / warmup, decay_steps=max(total - warmup, 1),
                               alpha=recipe.final_learning_rate_ratio, warmup_target=peak,
                               warmup_steps=warmup)
    else:
        schedule = CosineDecay(peak, decay_steps=total, alpha=recipe.final_learning_rate_ratio)
    optimizer = AdamW(learning_rate=schedule, weight_decay=recipe.weight_decay,
                      beta_1=recipe.beta_1, beta_2=recipe.beta_2,
                      global_clipnorm=recipe.global_clipnorm)
    optimizer.exclude_from_weight_decay(["bias", "gamma", "beta"])
    dropout_rng = np.random.default_rng(rng.integers(2 ** 63))

    history = []
    progress = _Progress(total, log_every)
    step = 0
    t_train = time.perf_counter()
    try:
        for epoch, offset in enumerate(offsets):
            if step >= total:
                break
            x, y = training_windows(train_ids, S, offset, cfg.bos_token_id)
            order = rng.permutation(len(x))
            losses = []
            for start in range(0, len(order), B):
                if step >= total:
                    break
                rows = order[start:start + B]
                batch = Batch(x[rows], np.ones((len(rows), S), bool), y[rows],
                              np.ones((len(rows), S), np.float32))
                lr = optimizer.learning_rate
                result = forward_backward(backbone.params, cfg, batch, dropout_rng=dropout_rng,
                                          ops=ops)
                if not math.isfinite(result.loss):
                    raise TrainingError(f"non-finite loss ({result.loss}) at epoch {epoch + 1}, step "
                                        f"{step + 1}; lower --learning-rate")
                optimizer.apply(result.grads, backbone.params, ops=ops)
                losses.append(result.loss)
                step += 1
                elapsed = time.perf_counter() - t_train
                progress.update(step, {"epoch": epoch + 1, "loss": f"{result.loss:.3f}",
                                       "lr": f"{lr:.2e}", "tok/s": f"{step * B * S / elapsed:.0f}"})
            val = validation_loss(lm, val_ids, S)
            history.append({"epoch": epoch + 1, "steps": step, "train_loss": float(np.mean(losses)),
                            "val_loss": val, "elapsed_s": round(time.perf_counter() - t_train, 1)})
            progress.write(f"epoch {epoch + 1}: train loss {np.mean(losses):.4f}, validation loss "
                           f"{val:.4f} (perplexity {math.exp(val):.2f}), "
                           f"{time.perf_counter() - t_train:.0f} s")
    finally:
        progress.close()
    train_seconds = time.perf_counter() - t_train

    val = history[-1]["val_loss"]
    report = {
        "refopt_version": _version(),
        "command": command,
        "text": os.path.basename(str(text_path)),
        "text_characters": len(text),
        "train_characters": len(train_text),
        "validation_characters": len(val_text),
        "train_tokens": int(len(train_ids)),
        "validation_tokens": int(len(val_ids)),
        "recipe": dataclasses.asdict(recipe),
        "vocabulary_size": vocab_rows,
        "merges": len(merges),
        "parameters": backbone.count_params(),
        "backend": backend_name,
        "steps": step,
        "tokens_seen": step * B * S,
        "tokenizer_seconds": round(tokenizer_seconds, 2),
        "train_seconds": round(train_seconds, 1),
        "wall_seconds": round(time.time() - started, 1),
        "machine": _machine(),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "history": history,
        "validation": {"loss": val, "perplexity": math.exp(val)},
        "baselines": ngram_baselines(train_ids, val_ids, vocab_rows, S, cfg.bos_token_id),
    }
    with presets.atomic_directory(out) as tmp:
        lm.save_to_preset(tmp)
        presets.write_json(tmp / "refopt_training.json", report)
        (tmp / "MODEL_CARD.md").write_text(model_card(report, tmp, Path(out).name,
                                                       **(card or {})),
                                           encoding="utf-8")
    return report


def _version():
    from refopt import __version__

    return __version__


def _machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}"


def _size_mb(directory: Path) -> float:
    return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file()) / 1e6


GENERIC_SUMMARY = ("It continues text in the style of its training file and knows nothing else; "
                   "it is meant for demonstrations, tests and teaching.")
GENERIC_LIMITS = ("A model of this size trained on one file imitates the surface of its text "
                  "without sense and reproduces fragments of it.")


def model_card(report: dict, directory, name: str, summary: str = GENERIC_SUMMARY,
               limits: str = GENERIC_LIMITS, usage: str | None = None) -> str:
    """``MODEL_CARD.md`` for a trained preset named ``name`` (``directory`` is measured for its
    size); ``summary``, ``limits`` and ``usage`` (Markdown) describe what it is for."""
    r = report["recipe"]
    base = report["baselines"]
    rows = [("this model", report["validation"]),
            ("bigram, Witten-Bell interpolated with the add-one unigram", base["bigram_witten_bell"]),
            ("bigram, add-one", base["bigram_add_one"]),
            ("unigram, add-one", base["unigram_add_one"])]
    table = "\n".join(f"| {n} | {m['loss']:.4f} | {m['perplexity']:.2f} |" for n, m in rows)
    curve = "\n".join(f"| {h['epoch']} | {h['steps']} | {h['train_loss']:.4f} | {h['val_loss']:.4f} | "
                      f"{h['elapsed_s']:.0f} |" for h in report["history"])
    warmup = min(r["warmup_steps"], report["steps"] // 5)
    if usage is None:
        usage = (f"```bash\nrefopt generate --preset {name} \"Some text\"\n```\n```python\n"
                 f"import refopt\nlm = refopt.models.OPTCausalLM.from_preset(\"{name}\")\n"
                 f"print(lm.generate(\"Some text\", max_length=64))\n```")
    return f"""# {name}: a small OPT trained by refopt

A {report['parameters']:,}-parameter OPT causal language model and its byte-level BPE tokenizer,
both trained from scratch by refopt (its NumPy reference with Numba kernels, its hand-written
backward pass and AdamW) on `{report['text']}`. The directory is a KerasHub preset:
`keras_hub.models.OPTCausalLM.from_preset` loads it, as does `refopt.models.OPTCausalLM.from_preset`.
{summary}

## Architecture
KerasHub's `OPTBackbone` layout: pre-LayerNorm decoder with a final LayerNorm, learned absolute
positions, ReLU MLP, biases everywhere, LM head tied to the token embedding, no projection.

| setting | value |
| --- | --- |
| vocabulary | {report['vocabulary_size']:,} tokens (byte-level BPE, {report['merges']:,} merges; `<s>` 0, `<pad>` 1, `</s>` 2, `<unk>` 3) |
| layers / heads / hidden / MLP | {r['num_layers']} / {r['num_heads']} / {r['hidden_dim']} / {r['intermediate_dim']} |
| max_sequence_length | {r['max_sequence_length']} |
| parameters | {report['parameters']:,} (float32) |
| size on disk | {_size_mb(directory):.1f} MB |

## Data
`{report['text']}`: {report['text_characters']:,} characters. The first {1 - r['validation_fraction']:.0%}
({report['train_characters']:,} characters, {report['train_tokens']:,} tokens) trains the tokenizer
and the model; the last {r['validation_fraction']:.0%} ({report['validation_characters']:,} characters,
{report['validation_tokens']:,} tokens) is held out for validation only.

## Training
`{report['command'] or 'refopt train'}`

* windows of {r['sequence_length']} target tokens, each input starting with `</s>`; a random start
  offset and a reshuffle every epoch; batch {r['batch_size']} windows ({r['batch_size'] * r['sequence_length']:,} tokens per step)
* AdamW (beta_1 {r['beta_1']}, beta_2 {r['beta_2']}, weight decay {r['weight_decay']} on matrices and
  embeddings, none on biases and LayerNorm), global-norm clipping at {r['global_clipnorm']}, learning
  rate {r['learning_rate']:g} after a linear warm-up of {warmup} steps, cosine decay to
  {r['final_learning_rate_ratio']:g}x of it; dropout {r['dropout']}; seed {r['seed']}
* {report['steps']:,} steps, {report['tokens_seen']:,} tokens ({report['tokens_seen'] / report['train_tokens']:.1f} passes over the training tokens)
* training time {report['train_seconds']:,.0f} s ({report['train_seconds'] / 60:.1f} min; the tokenizer
  {report['tokenizer_seconds']:.1f} s) on {report['machine']}, `{report['backend']}` backend,
  refopt {report['refopt_version']}, {report['date']}

| epoch | steps | train loss | validation loss | seconds |
| --- | ---: | ---: | ---: | ---: |
{curve}

## Validation
Cross-entropy in nats per token, the mean over all {report['validation_tokens']:,} validation tokens, with
the same tokenizer. The model predicts each token from the preceding tokens of its
{r['sequence_length']}-token window (the window starts with `</s>`); the bigrams condition on the
same previous token (`</s>` at window starts, a context unseen in training, where they fall back
to the unigram or to uniform). The n-gram counts come from the training tokens only.

| model | loss (nats/token) | perplexity |
| --- | ---: | ---: |
{table}

## Use
{usage}

## Limits
{limits}
"""


# ----------------------------------------------------------------------------------- CLI
def add_parser(subparsers):
    d = Recipe()
    p = subparsers.add_parser(
        "train", help="train a small OPT and its tokenizer on a text file (the bundled recipe)",
        description="Train a byte-level BPE tokenizer and a small OPT on a UTF-8 text file with the "
                    "recipe of the bundled model (first 90%% trains, last 10%% validates), show "
                    "progress, and write a KerasHub preset with a model card at the end.")
    p.add_argument("text_file", help="a UTF-8 text file")
    p.add_argument("--out", default="refopt_model", help="output preset directory (default: %(default)s)")
    p.add_argument("--backend", choices=("auto", "numpy", "numba", "cuda"), default=None,
                   help="compute backend (default: REFOPT_BACKEND or the fastest available)")
    p.add_argument("--log-every", type=int, default=50, metavar="N",
                   help="without a terminal, print a progress line every N steps (default: %(default)s)")
    g = p.add_argument_group("recipe (defaults: the bundled model's)")
    for field in dataclasses.fields(Recipe):
        default = getattr(d, field.name)
        kind = float if isinstance(default, float) else int
        g.add_argument("--" + field.name.replace("_", "-"), type=kind, default=default,
                       metavar=field.name.upper() if field.name != "max_steps" else "N",
                       help=f"(default: {default})")
    p.set_defaults(run=run)
    return p


def run(args) -> int:
    recipe = Recipe(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Recipe)})
    backend = None if args.backend in (None, "auto") else args.backend
    command = "refopt train " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["train"] else None
    report = train(args.text_file, args.out, recipe, backend=backend, log_every=args.log_every,
                   command=command)
    v, b = report["validation"], report["baselines"]
    print(f"wrote {args.out}: {report['parameters']:,} parameters, {report['steps']} steps in "
          f"{report['train_seconds']:.0f} s; validation loss {v['loss']:.4f} nats/token (perplexity "
          f"{v['perplexity']:.2f}; bigram {b['bigram_witten_bell']['perplexity']:.2f}, unigram "
          f"{b['unigram_add_one']['perplexity']:.2f})")
    return 0
