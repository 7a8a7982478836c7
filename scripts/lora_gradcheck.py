"""LoRA's backward, measured: the figures docs/KERAS_HUB.md quotes.

    python scripts/lora_gradcheck.py [--cases 20] [--seed 0]

For each of Keras's three factorizations (a query/key/value projection ``a [D, H, r]`` with ``b
[r, K]`` shared by the heads, the attention output ``a [H, K, r]`` over the ``H*K`` inputs, a plain
dense ``a [in, r]``) and ``--cases`` random shapes and values in float64:

* finite differences: d/dt of ``sum(c * lora_forward(x + t dx, a + t da, b + t db))`` by the
  five-point stencil (step 1e-4), along a random direction and along the unit vector of each
  input's largest gradient, against ``lora_backward``'s inner product (relative error);
* torch autograd on Keras's own formula (``x @ (a @ b)`` merged into the kernel's shape, written
  independently of refopt's ``(x . a) @ b``): ``max |ours - torch| / max |torch|`` over the three
  gradients.

Then the model: ``--models`` random two-layer float64 OPTs with adapters on KerasHub's default
layers (``b`` random, so ``a`` has a gradient too): every adapter gradient of the cross-entropy
loss against finite differences (the same two directions per adapter).  OPT's MLP is a ReLU: where
a stencil point puts an MLP pre-activation on the other side of zero than the centre (a kink within
``2h``), the loss is not smooth there and the stencil measures nothing; those directions are
counted and left out.  Prints the worst figure of each.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from tests_support import five_point, rel_err  # noqa: E402

from refopt.ops import lora_backward, lora_forward  # noqa: E402


def random_case(kind, rng):
    """(x, a, b) of one factorization with random sizes."""
    n, s, r = rng.integers(1, 4), rng.integers(1, 5), rng.integers(1, 5)
    if kind == "query":
        d, h, k = rng.integers(1, 9), rng.integers(1, 4), rng.integers(1, 5)
        shapes = (n, s, d), (d, h, r), (r, k)
    elif kind == "attention_output":
        h, k, d = rng.integers(1, 4), rng.integers(1, 5), rng.integers(1, 9)
        shapes = (n, s, h * k), (h, k, r), (r, d)
    else:
        i, o = rng.integers(1, 9), rng.integers(1, 9)
        shapes = (n * s, i), (i, r), (r, o)
    return tuple(rng.standard_normal(shape) for shape in shapes)


def finite_difference_error(x, a, b, rng) -> float:
    c = rng.standard_normal(lora_forward(x, a, b).shape)
    grads = lora_backward(c, x, a, b)
    inputs = [x, a, b]
    worst = 0.0
    for i, g in enumerate(grads):
        def f(v, i=i):
            args = list(inputs)
            args[i] = v
            return float((lora_forward(*args) * c).sum())
        largest = np.zeros(g.shape)
        largest[np.unravel_index(np.abs(g).argmax(), g.shape)] = 1.0
        for direction in (rng.standard_normal(g.shape), largest):
            worst = max(worst, rel_err(five_point(f, inputs[i], direction),
                                       float((g * direction).sum())))
    return worst


def torch_error(x, a, b, rng, torch) -> float:
    c = rng.standard_normal(lora_forward(x, a, b).shape)
    tx, ta, tb = (torch.tensor(v, requires_grad=True) for v in (x, a, b))
    delta = tx @ torch.matmul(ta, tb).reshape(x.shape[-1], -1)         # Keras: kernel + a @ b
    (delta * torch.tensor(c)).sum().backward()
    worst = 0.0
    for ours, theirs in zip(lora_backward(c, x, a, b), (tx.grad, ta.grad, tb.grad)):
        theirs = theirs.numpy()
        scale = max(np.abs(theirs).max(), 1e-300)
        worst = max(worst, float(np.abs(ours - theirs).max() / scale))
    return worst


def relu_pattern(params, cfg, batch):
    """The signs of every MLP pre-activation of the forward pass at ``params``."""
    import types

    import refopt.ops as reference
    from refopt.model import forward

    seen = []
    ops = types.SimpleNamespace(**{k: getattr(reference, k) for k in dir(reference) if not k.startswith("_")})

    def linear_relu_forward(x, w, b=None):
        z = reference.linear_forward(x, w, b)
        seen.append(z > 0)
        return np.maximum(z, 0)
    ops.linear_relu_forward = linear_relu_forward
    forward(params, cfg, batch.token_ids, batch.padding_mask, ops=ops)
    return np.concatenate([s.ravel() for s in seen])


def model_error(seed: int, h: float = 1e-4) -> tuple[float, int, int]:
    from refopt.model import init_params
    from refopt.models import OPTBackbone
    from refopt.training.gradients import check_batch, forward_backward

    bb = OPTBackbone(vocabulary_size=37, num_layers=2, num_heads=2, hidden_dim=8, intermediate_dim=12,
                     max_sequence_length=16, dropout=0.0, dtype="float64")
    bb.params = init_params(bb.config, seed=seed, dtype="float64", std=0.3)
    bb.enable_lora(2, seed=seed)
    rng = np.random.default_rng(seed)
    for name in bb.lora_layers:
        bb.params[name + ".lora_b"] = rng.standard_normal(bb.params[name + ".lora_b"].shape)
    ids = rng.integers(3, 37, (3, 7))
    mask = np.ones((3, 7), bool)
    mask[1, 5:] = False
    batch = check_batch(bb.config, {"token_ids": ids, "padding_mask": mask}, rng.integers(3, 37, (3, 7)),
                        mask.astype(float), np.float64)
    trainable = bb.trainable_names()
    grads = forward_backward(bb.params, bb.config, batch, trainable=trainable).grads
    centre = relu_pattern(bb.params, bb.config, batch)
    worst, checked, kinks = 0.0, 0, 0
    for name in sorted(trainable):
        g = grads[name]

        def loss(v, name=name):
            return forward_backward(dict(bb.params, **{name: v}), bb.config, batch, trainable=set()).loss
        largest = np.zeros(g.shape)
        largest[np.unravel_index(np.abs(g).argmax(), g.shape)] = 1.0
        for direction in (rng.standard_normal(g.shape), largest):
            if any(not np.array_equal(centre, relu_pattern(dict(bb.params, **{name: bb.params[name] + t * direction}),
                                                           bb.config, batch))
                   for t in (-2 * h, -h, h, 2 * h)):
                kinks += 1
                continue
            worst = max(worst, rel_err(five_point(loss, bb.params[name], direction, h),
                                       float((g * direction).sum())))
            checked += 1
    return worst, checked, kinks


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", type=int, default=10)
    args = parser.parse_args(argv)
    try:
        import torch
        torch.set_default_dtype(torch.float64)
    except ImportError:
        torch = None
    rng = np.random.default_rng(args.seed)
    print(f"{'factorization':<18} {'cases':>5} {'finite differences':>20} {'torch autograd':>16}")
    for kind in ("query", "attention_output", "dense"):
        fd = td = 0.0
        for _ in range(args.cases):
            x, a, b = random_case(kind, rng)
            fd = max(fd, finite_difference_error(x, a, b, rng))
            if torch is not None:
                td = max(td, torch_error(x, a, b, rng, torch))
        print(f"{kind:<18} {args.cases:>5} {fd:>20.2e} {td if torch else float('nan'):>16.2e}")
    worst = checked = kinks = 0
    for m in range(args.models):
        w, c, k = model_error(args.seed + m)
        worst, checked, kinks = max(worst, w), checked + c, kinks + k
    print(f"model adapters ({args.models} float64 models, 2 layers, rank 2): {checked} directional "
          f"derivatives, worst relative error {worst:.2e} ({kinks} left out: a ReLU kink within "
          "the stencil)")
    if torch is None:
        print("(torch not installed: pip install -e '.[peers]' for the autograd column)")


if __name__ == "__main__":
    main()
