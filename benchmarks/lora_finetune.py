"""A LoRA fine-tune of the bundled model on text it has never seen, measured.

    python benchmarks/lora_finetune.py [--rank 4] [--epochs 3] [--batch 8] [--window 128]
        [--chars 200000] [--learning-rate 1e-3] [--backend numba] [--full]

The bundled model (``OPTCausalLM.from_preset()``: 5.8M parameters, trained on Shakespeare) is
adapted to Python's own documentation: the help topics every CPython ships
(``pydoc_data.topics``, joined in sorted order, the first ``--chars`` characters), 90% to train
on and the last 10% held out.  Token windows of ``--window`` + 1 (the bundled tokenizer); LoRA of
``--rank`` on KerasHub's default layers (each decoder layer's query and value projections), Adam.

Printed: the trainable parameter count against the model's, the loss (nats per token, Keras's
``evaluate``) on the training and held-out windows before and after, the time per epoch (wall and
this process's CPU seconds, which a shared machine's load disturbs less) and tokens per second, that every base weight is bitwise unchanged, and that merging the adapters into
the weights gives the same logits.  ``--full`` trains every weight instead, the same way, for
comparison.  A throwaway model trains one step first, so that compiling the backend's kernels is
not timed.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np


def corpus(chars: int) -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))[:chars]


def windows(ids, window: int):
    n = (len(ids) - 1) // window
    ids = np.asarray(ids[:n * window + 1])
    x = np.stack([ids[i * window:(i + 1) * window] for i in range(n)])
    y = np.stack([ids[i * window + 1:(i + 1) * window + 1] for i in range(n)])
    return {"token_ids": x, "padding_mask": np.ones_like(x, bool)}, y


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--chars", type=int, default=200_000)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--backend", default="numba")
    parser.add_argument("--full", action="store_true", help="train every weight instead (no LoRA)")
    args = parser.parse_args(argv)

    from refopt.models import OPTBackbone, OPTCausalLM
    from refopt.optimizers import Adam

    # warm-up: the backend's kernels compile on a throwaway model, so the epochs time training only
    warm = OPTCausalLM(OPTBackbone(vocabulary_size=64, num_layers=1, num_heads=2, hidden_dim=8,
                                   intermediate_dim=16, max_sequence_length=16))
    warm.backbone.backend = args.backend
    if not args.full:
        warm.backbone.enable_lora(args.rank, seed=0)
    ids = np.ones((2, 16), np.int64)
    warm.fit({"token_ids": ids, "padding_mask": ids.astype(bool)}, ids, verbose=0)
    warm.evaluate({"token_ids": ids, "padding_mask": ids.astype(bool)}, ids, verbose=0)

    lm = OPTCausalLM.from_preset(backend=args.backend)
    text = corpus(args.chars)
    split = int(len(text) * 0.9)
    tokenizer = lm.preprocessor.tokenizer
    train, held = (windows(tokenizer(part), args.window) for part in (text[:split], text[split:]))
    lm.preprocessor = None
    total = lm.backbone.count_params()
    if not args.full:
        lm.backbone.enable_lora(args.rank, seed=0)
    trainable = lm.backbone.trainable_names()
    count = sum(lm.backbone.params[n].size for n in (trainable or lm.backbone.params))
    frozen = {k: v.copy() for k, v in lm.backbone.params.items() if trainable is not None and k not in trainable}
    lm.compile(optimizer=Adam(learning_rate=args.learning_rate))
    tokens = train[1].size
    print(f"bundled model: {total:,} parameters; {'full fine-tune' if args.full else f'LoRA rank {args.rank}'}: "
          f"{count:,} trainable ({100 * count / total:.3f}%); backend {args.backend}")
    print(f"Python's help topics: {len(text):,} characters -> {tokens:,} training tokens "
          f"({train[1].shape[0]} windows of {args.window}), {held[1].size:,} held-out tokens")

    def losses():
        return [lm.evaluate(x, y, batch_size=args.batch, verbose=0)[0] for x, y in (train, held)]

    before = losses()
    print(f"before: train loss {before[0]:.4f}, held-out loss {before[1]:.4f} (nats/token)")
    for epoch in range(args.epochs):
        start, cpu = time.perf_counter(), time.process_time()
        history = lm.fit(train[0], train[1], batch_size=args.batch, epochs=1, verbose=0, seed=epoch)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        after = losses()
        print(f"epoch {epoch + 1}: {seconds:.1f} s wall, {cpu:.1f} s CPU ({tokens / seconds:,.0f} tokens/s), fit loss "
              f"{history.history['loss'][-1]:.4f}; train loss {after[0]:.4f}, held-out loss {after[1]:.4f}")
    if frozen:
        same = all(np.array_equal(lm.backbone.params[k], v) for k, v in frozen.items())
        print(f"base weights bitwise unchanged: {same} ({len(frozen)} tensors)")
        probe = {k: v[:2] for k, v in held[0].items()}
        adapted = lm.predict(probe)
        lm.backbone.merge_lora_weights()
        merged = lm.predict(probe)
        print(f"merged into the weights: max |logit difference| {np.abs(merged - adapted).max():.2e} "
              f"(largest logit {np.abs(adapted).max():.1f})")
    print(f"load: {os.getloadavg()[0]:.1f} (1-minute average), {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
