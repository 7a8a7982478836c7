"""``MODEL_CARD.md`` of a preset trained by :func:`refopt.recipe.train`: one Markdown
template (:data:`TEMPLATE`, ``string.Template`` placeholders) filled from the run's report."""

from __future__ import annotations

from pathlib import Path
from string import Template

GENERIC_SUMMARY = ("It continues text in the style of its training file and knows nothing else; "
                   "it is meant for demonstrations, tests and teaching.")
GENERIC_LIMITS = ("A model of this size trained on one file imitates the surface of its text "
                  "without sense and reproduces fragments of it.")
#: nanoGPT's character-level baby GPT on tinyshakespeare (first 90% / last 10%), nats per character
NANOGPT_SHAKESPEARE_CHAR = 1.4697

TEMPLATE = Template("""# $name: a small OPT trained by refopt

A $parameters-parameter OPT causal language model and its byte-level BPE tokenizer,
both trained from scratch by refopt (its hand-written forward and backward passes and AdamW, on the
`$backend` backend) on `$text`. The directory is a KerasHub preset:
`keras_hub.models.OPTCausalLM.from_preset` loads it, as does `refopt.models.OPTCausalLM.from_preset`.
$summary

## Architecture
KerasHub's `OPTBackbone` layout: pre-LayerNorm decoder with a final LayerNorm, learned absolute
positions, ReLU MLP, biases everywhere, LM head tied to the token embedding, no projection.

| setting | value |
| --- | --- |
| vocabulary | $vocabulary tokens (byte-level BPE, $merges merges; `<s>` 0, `<pad>` 1, `</s>` 2, `<unk>` 3) |
| layers / heads / hidden / MLP | $num_layers / $num_heads / $hidden_dim / $intermediate_dim |
| max_sequence_length | $max_sequence_length |
| parameters | $parameters ($weights_dtype on disk) |
| size on disk | $size_mb MB |

## Data
`$text`: $text_characters characters. The first $train_share ($train_characters characters,
$train_tokens tokens) trains the tokenizer$data_split; the last $validation_share
($validation_characters characters, $validation_tokens tokens) is held out for validation only.

## Training
`$command`

* windows of $sequence_length target tokens, each input starting with `</s>`; a random start
  offset and a reshuffle every epoch; batch $batch_size windows ($tokens_per_step tokens per step)
* AdamW (beta_1 $beta_1, beta_2 $beta_2, weight decay $weight_decay on matrices and
  embeddings, none on biases and LayerNorm), global-norm clipping at $global_clipnorm, learning
  rate $learning_rate after a linear warm-up of $warmup steps, cosine decay to
  ${final_ratio}x of it; dropout $dropout; seed $seed
* $steps steps, $tokens_seen tokens ($passes passes over the training tokens), each step through
  `OPTCausalLM.fit`
* training time $train_seconds s ($train_minutes min; the tokenizer $tokenizer_seconds s) on
  $machine, `$backend` backend$kernels, refopt $refopt_version, $date$notes

| epoch | steps | train loss | validation loss | seconds |
| --- | ---: | ---: | ---: | ---: |
$curve

$kept$calibration

## Validation
Cross-entropy in nats per token, the mean over all $validation_tokens validation tokens, with
the same tokenizer. The model predicts each token from the preceding tokens of its
$sequence_length-token window (the window starts with `</s>`); the bigrams condition on the
same previous token (`</s>` at window starts, a context unseen in training, where they fall back
to the unigram or to uniform). The n-gram counts come from the training tokens only.

| model | loss (nats/token) | perplexity |
| --- | ---: | ---: |
$table

Per character (total nats over the held-out text divided by its $validation_characters characters,
so that any tokenizer compares): **$nats_per_char nats per character** for this model, against
$bigram_per_char for the Witten-Bell bigram and $nanogpt for nanoGPT's character-level Shakespeare
model (its published figure on the same split).$sliding

## Use
$usage

## Limits
$limits
""")


def size_mb(directory) -> float:
    return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file()) / 1e6


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
    per_char = report["validation_tokens"] / report["validation_characters"]
    if usage is None:
        usage = (f"```bash\nrefopt generate --preset {name} \"Some text\"\n```\n```python\n"
                 f"import refopt\nlm = refopt.models.OPTCausalLM.from_preset(\"{name}\")\n"
                 f"print(lm.generate(\"Some text\", max_length=64))\n```")
    return TEMPLATE.substitute(
        name=name, summary=summary, limits=limits, usage=usage, backend=report["backend"],
        text=report["text"], parameters=f"{report['parameters']:,}",
        vocabulary=f"{report['vocabulary_size']:,}", merges=f"{report['merges']:,}",
        num_layers=r["num_layers"], num_heads=r["num_heads"], hidden_dim=r["hidden_dim"],
        intermediate_dim=r["intermediate_dim"], max_sequence_length=_context(report),
        weights_dtype=report.get("weights_dtype", "float32"), size_mb=f"{size_mb(directory):.1f}",
        text_characters=f"{report['text_characters']:,}",
        train_share=f"{1 - r['validation_fraction']:.0%}",
        train_characters=f"{report['train_characters']:,}", train_tokens=f"{report['train_tokens']:,}",
        validation_share=f"{r['validation_fraction']:.0%}",
        validation_characters=f"{report['validation_characters']:,}",
        validation_tokens=f"{report['validation_tokens']:,}", command=report["command"] or "refopt train",
        sequence_length=r["sequence_length"], batch_size=r["batch_size"],
        tokens_per_step=f"{r['batch_size'] * r['sequence_length']:,}", beta_1=r["beta_1"],
        beta_2=r["beta_2"], weight_decay=r["weight_decay"], global_clipnorm=r["global_clipnorm"],
        learning_rate=f"{r['learning_rate']:g}", warmup=report["warmup_steps"],
        final_ratio=f"{r['final_learning_rate_ratio']:g}", dropout=r["dropout"], seed=r["seed"],
        steps=f"{report['steps']:,}", tokens_seen=f"{report['tokens_seen']:,}",
        passes=f"{report['tokens_seen'] / report.get('fit_tokens', report['train_tokens']):.1f}",
        train_seconds=f"{report['train_seconds']:,.0f}",
        train_minutes=f"{report['train_seconds'] / 60:.1f}",
        tokenizer_seconds=f"{report['tokenizer_seconds']:.1f}", machine=report["machine"],
        refopt_version=report["refopt_version"], date=report["date"],
        curve="\n".join(f"| {h['epoch']} | {h['steps']} | {h['train_loss']:.4f} | {_val(h)} | "
                        f"{h['elapsed_s']:.0f} |" for h in report["history"]),
        table="\n".join(f"| {n} | {m['loss']:.4f} | {m['perplexity']:.2f} |" for n, m in rows),
        nats_per_char=f"{report['validation']['loss'] * per_char:.4f}",
        bigram_per_char=f"{base['bigram_witten_bell']['loss'] * per_char:.4f}",
        nanogpt=f"{NANOGPT_SHAKESPEARE_CHAR}", kept=_kept(report), data_split=_data_split(report),
        calibration=_calibration(report), sliding=_sliding(report),
        kernels=_kernel_variants(report),
        notes=f"\n* {report['notes']}" if report.get("notes") else "")


def _data_split(report) -> str:
    if not report.get("calibration_tokens"):
        return " and the model"
    share = report["recipe"]["calibration_fraction"]
    return (f"; the model trains on its last {1 - share:.0%} ({report['fit_characters']:,} "
            f"characters, {report['fit_tokens']:,} tokens), and its first {share:.0%} "
            f"({report['calibration_characters']:,} characters, {report['calibration_tokens']:,} "
            "tokens) only fits the temperature")


def _kernel_variants(report) -> str:
    k = report.get("kernels")
    if not k:
        return ""
    return (f" (kernel variants: GEMM {k['gemm']}, flash attention forward {k['flash_forward']}, "
            f"backward {k['flash_backward']})")


def _context(report) -> str:
    # the shipped max_sequence_length: the training window (refopt.recipe.shipped_model)
    shipped = report["max_sequence_length"]
    table = report["recipe"]["max_sequence_length"]
    if shipped == table:
        return f"{shipped}"
    return (f"{shipped} (the training window; the position table was initialised with {table} "
            f"rows; the {table - shipped} past the window, never trained, are not shipped)")


def _calibration(report) -> str:
    v = report["validation"]
    if "temperature" not in v:
        return ""
    return ("\n\n**Temperature.** After every epoch each candidate's logits are divided by the "
            "temperature that minimises its cross-entropy on the calibration part (the start of the "
            "training text, never trained on), and the candidate is validated so; the validation "
            "losses above are those. The shipped parameters' temperature is "
            f"{v['temperature']:.4f}, folded into them (the final LayerNorm's gamma and beta divided "
            "by it, which divides every logit by it: the preset stays a plain OPT, and KerasHub "
            "computes the same logits). As trained, before the temperature, the same parameters "
            f"score {v['uncalibrated_loss']:.4f} nats per token "
            f"({v['uncalibrated_nats_per_character']:.4f} per character).")


def _sliding(report) -> str:
    s = report["validation"].get("sliding")
    if not s:
        return ""
    S = report["recipe"]["sequence_length"]
    return (f"\n\nIn overlapping windows -- each window of {S} tokens moved by {s['stride']}, each "
            f"token scored once, from at least {S - s['stride']} tokens of context (the first window "
            "aside), as transformers' perplexity guide measures a model of fixed length -- the same "
            f"model scores {s['loss']:.4f} nats per token: **{s['nats_per_character']:.4f} nats per "
            "character**. `refopt_training.json` keeps each window's nats "
            "(`validation.sliding.window_nats`, the windows of `refopt.recipe.sliding_windows`).")


def _val(h) -> str:
    # the trained parameters' validation loss, and the averaged parameters' (average_decay) beside it
    if "val_loss_average" in h:
        return f"{h['val_loss']:.4f} (averaged {h['val_loss_average']:.4f})"
    return f"{h['val_loss']:.4f}"


def _kept(report) -> str:
    epochs, kept = len(report["history"]), report.get("kept_epoch", len(report["history"]))
    decay = report["recipe"].get("average_decay") or 0
    averaged = ""
    if decay:
        averaged = (f" The recipe averages the parameters over epochs (after each epoch, "
                    f"average = {decay:g} x average + {1 - decay:g} x parameters; the "
                    "averaged figures are in brackets).")
    which = ("the averaged parameters" if report.get("kept_weights") == "average" else "the parameters")
    if not report["recipe"].get("keep_best"):
        return f"The preset holds {which} after the last epoch ({epochs}).{averaged}"
    return (f"The preset holds {which} of epoch {kept} of {epochs}, the lowest validation loss "
            "(as nanoGPT keeps its best checkpoint on the same split: the held-out text chose the "
            f"epoch, so the figure below is that of the selected epoch).{averaged}")
