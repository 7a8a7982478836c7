"""Measure how rounding error grows with depth: the data behind :mod:`refopt.testing.tolerances`.

    python -m refopt.testing.calibration [--quick] [--json out.json]

For random OPT configs (widths 64 and 256, 1 to 24 layers, pre- and post-LayerNorm, weight scales
0.5, 1 and 2 over sqrt(width), LayerNorm gains and biases perturbed, random right padding; plus
one-layer OPT-350m-style models whose embedding goes through ``project_in``), it runs refopt's
forward and backward in

* float64 against ``np.longdouble`` (x87 extended precision, 64-bit mantissa) -> the float64 row;
* float32 against float64 -> the float32 row;
* "float16" and "bfloat16" against float64: weights rounded to that format and every op's output
  rounded to it (float32 arithmetic inside each op, as mixed-precision kernels accumulate; the
  residual sums stay float32, so real half-precision ports that store the residual stream in half
  precision sit somewhat above this envelope -- the safety factor covers it).

For each dtype and depth it prints the largest ``scaled`` error and ``nmse`` seen over every named
intermediate of that depth and every example, in units of the dtype's unit roundoff ``u``, and the
curve ``u * (a + b * log2(1 + depth))`` (``u * (c + e * log2(1 + depth))`` for ``sqrt(nmse)``) that
bounds them, which is what :data:`refopt.testing.tolerances.MEASURED` holds.  Gradients (depth =
number of layers) and the loss are measured the same way, the gradients fitted apart.

Every batch keeps its ReLU inputs at least :data:`KINK_MARGIN` (relative) away from zero, redrawn
until it does (:func:`clean_batch`): a pre-activation within rounding of the kink may land on either
side, and the gradient of that unit's ``fc1`` row then changes by a whole token's share (errors of
5e-2 relative were measured in float32 before this rule) -- a legitimate difference between two
correct implementations, not rounding growth (the checks resolve it from the port's gradients,
:mod:`refopt.testing.kinks`).  Gradients are measured against their block's largest gradient
(:func:`refopt.testing.reference.gradient_scales`), as the checks judge them.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from refopt.config import OPTConfig
from refopt.model import param_shapes
from refopt.testing import reference as R
from refopt.testing.tolerances import UNIT_ROUNDOFF, error_figures


# ---------------------------------------------------------------------------------- half precision
_ROUNDED_OPS = ("embedding_forward", "linear_forward", "linear_relu_forward", "layernorm_forward",
                "attention_forward", "relu_forward", "lm_head_forward")


def round_to(x, fmt: str):
    """Float arrays rounded to ``fmt`` (``"float16"`` / ``"bfloat16"``), returned as float32."""
    from refopt.io.safetensors_io import bfloat16_to_float32, float32_to_bfloat16

    x = np.asarray(x, np.float32)
    if fmt == "float16":
        return x.astype(np.float16).astype(np.float32)
    return bfloat16_to_float32(float32_to_bfloat16(x))


def emulated_ops(fmt: str):
    """The NumPy ops with every forward op's float outputs rounded to ``fmt`` (float32 arithmetic
    inside each op, half-precision storage between ops): how the calibration runs "refopt in bfloat16"."""
    ops = R.numpy_ops()

    def wrap(fn):
        def rounded(*args, **kwargs):
            out = fn(*args, **kwargs)
            if isinstance(out, tuple):
                return tuple(round_to(o, fmt) for o in out)
            return round_to(out, fmt)
        return rounded

    return R.numpy_ops(**{name: wrap(getattr(ops, name)) for name in _ROUNDED_OPS})


def run_forward_as(params, cfg, token_ids, padding_mask, dtype: str):
    """refopt's named intermediates as a port computing in ``dtype`` would get them: float64 and
    float32 natively, float16 and bfloat16 emulated (:func:`emulated_ops`, weights rounded)."""
    if dtype in ("float64", "float32"):
        return R.run_forward(params, cfg, token_ids, padding_mask, dtype)
    p = {k: round_to(v, dtype) for k, v in params.items()}
    return R.run_forward(p, cfg, token_ids, padding_mask, "float32", ops=emulated_ops(dtype))




def relu_kink_distance(params, cfg: OPTConfig, token_ids, padding_mask) -> np.ndarray:
    """``[num_layers]``: per layer, the smallest relative distance of an fc1 pre-activation (at a
    real position) from ReLU's kink, ``|h| / (|x| @ |W|.T + |b|)`` in float64 (calibration batches
    keep it above :data:`KINK_MARGIN`; the checks resolve kinks instead, :mod:`refopt.testing.kinks`)."""
    from refopt import model as _model

    p = R.cast_params(params, "float64")
    tape: dict = {}
    mask = np.asarray(padding_mask).astype(bool)
    _model.forward(p, cfg, np.asarray(token_ids, np.int64), mask, tape=tape, ops=R.numpy_ops())
    out = np.full(cfg.num_layers, np.inf)
    for i in range(cfg.num_layers):
        x = tape[f"layers.{i}.mlp_input"][mask]                                  # [N, D]
        h = tape[f"layers.{i}.fc1_output"][mask]                                 # [N, F]
        w = np.abs(p[f"layers.{i}.fc1.weight"])                                  # [F, D]
        b = p.get(f"layers.{i}.fc1.bias")
        scale = np.abs(x) @ w.T + (0.0 if b is None else np.abs(b))              # [N, F]
        if h.size:
            out[i] = float(np.min(np.abs(h) / np.maximum(scale, np.finfo(np.float64).tiny)))
    return out


# ---------------------------------------------------------------------------------- measuring

def random_params(cfg: OPTConfig, gain: float, seed: int) -> dict[str, np.ndarray]:
    """float64 parameters: matrices normal(0, gain / sqrt(fan_in)), embeddings normal(0, 1) scaled
    like the matrices' outputs, LayerNorm gains 1 + 0.3 N(0,1), betas and biases 0.3 N(0,1) * gain."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in param_shapes(cfg).items():
        if name.endswith(".gamma"):
            out[name] = 1.0 + 0.3 * rng.standard_normal(shape)
        elif name.endswith((".beta", ".bias")):
            out[name] = 0.3 * gain * rng.standard_normal(shape)
        elif name in ("embed_tokens", "embed_positions"):
            out[name] = gain * rng.standard_normal(shape) / np.sqrt(shape[-1]) * 4.0
        else:
            out[name] = gain * rng.standard_normal(shape) / np.sqrt(shape[-1])
    return out


def _batch(cfg, seed, B=2, S=16):
    rng = np.random.default_rng(seed + 1000)
    ids = rng.integers(3, cfg.vocabulary_size, (B, S))
    lengths = rng.integers(S // 2, S + 1, B)
    lengths[0] = S
    mask = (np.arange(S)[None, :] < lengths[:, None])
    ids = np.where(mask, ids, cfg.pad_token_id)
    return ids, mask


#: calibration batches keep every fc1 pre-activation at least this far (relative to its scale)
#: from ReLU's kink: nearer, float32 rounding may put it on the other side and change a gradient row
#: by a whole token's share (:func:`refopt.testing.reference.relu_kink_distance`)
KINK_MARGIN = 1e-6


def clean_batch(cfg, params, seed, attempts: int = 50):
    """``(ids, mask, attempt)``: the first of :func:`_batch`'s draws (seed, seed + 7919, ...) with no
    ReLU input within :data:`KINK_MARGIN` of zero (the first draw is kept when it is clean)."""
    best = None
    for attempt in range(attempts):
        ids, mask = _batch(cfg, seed + 7919 * attempt)
        distance = float(relu_kink_distance(params, cfg, ids, mask).min(initial=np.inf))
        if distance >= KINK_MARGIN:
            return ids, mask, attempt
        if best is None or distance > best[0]:
            best = (distance, ids, mask, attempt)
    return best[1], best[2], best[3]


def measure_example(cfg, params, ids, mask, dtypes):
    """{dtype: {"act": {depth: (scaled, nmse)}, "grad": (scaled, nmse), "loss": rel}} for one example."""
    real = mask.astype(bool)
    ref64 = R.run_forward(params, cfg, ids, mask, "float64")
    loss64, grads64 = R.run_gradients(params, cfg, ids, mask, "float64")
    results = {"loss64": float(loss64)}
    for dtype in dtypes:
        if dtype == "float64":
            ref = R.run_forward(params, cfg, ids, mask, np.longdouble)
            loss_ref, grads_ref = R.run_gradients(params, cfg, ids, mask, np.longdouble)
            cand, cand_loss, cand_grads = ref64, loss64, grads64
        else:
            ref, loss_ref, grads_ref = ref64, loss64, grads64
            if dtype == "float32":
                p, ops = params, R.numpy_ops()
            else:
                p = {k: round_to(v, dtype) for k, v in params.items()}
                ops = emulated_ops(dtype)
            cand = R.run_forward(p, cfg, ids, mask, "float32", ops=ops)
            cand_loss, cand_grads = R.run_gradients(p, cfg, ids, mask, "float32", ops=ops)
        act = {}
        for name, value in cand.items():
            f = error_figures(value[real], np.asarray(ref[name][real], np.float64))
            d = R.depth_of(name, cfg)
            s, n = act.get(d, (0.0, 0.0))
            act[d] = (max(s, f.scaled), max(n, f.nmse))
        gs, gn = 0.0, 0.0
        scales = R.gradient_scales(grads_ref)
        for name, g in cand_grads.items():
            f = error_figures(g, np.asarray(grads_ref[name], np.float64), scales[name])
            gs, gn = max(gs, f.scaled), max(gn, f.nmse)
        loss_rel = abs(float(cand_loss) - float(loss_ref)) / abs(float(loss_ref))
        results[dtype] = {"act": act, "grad": (gs, gn), "loss": loss_rel}
    return results


def fit_log(points: dict[int, float]) -> tuple[float, float]:
    """(a, b) with ``a + b * log2(1 + d) >= value`` for every (d, value): ``a`` is the value at
    depth 0 (0 when depth 0 was not measured) and ``b`` the smallest slope that then bounds the
    rest."""
    a = points.get(0, 0.0)
    b = max([(v - a) / np.log2(1 + d) for d, v in points.items() if d > 0] + [0.0])
    return float(a), float(b)


def envelope(records, dtype, keep):
    """Per-depth maxima (in units of u) over the records ``keep(record)`` accepts:
    ``{"act": {d: (scaled, rms)}, "grad": {L: (scaled, rms)}, "loss": {L: rel}}``."""
    u = UNIT_ROUNDOFF[dtype]
    e = {"act": {}, "grad": {}, "loss": {}}
    for rec in records:
        if not keep(rec):
            continue
        r = rec["results"][dtype]
        L = rec["layers"]
        for d, (sc, n) in r["act"].items():
            d = int(d)
            old = e["act"].get(d, (0.0, 0.0))
            e["act"][d] = (max(old[0], sc / u), max(old[1], np.sqrt(n) / u))
        old = e["grad"].get(L, (0.0, 0.0))
        e["grad"][L] = (max(old[0], r["grad"][0] / u), max(old[1], np.sqrt(r["grad"][1]) / u))
        e["loss"][L] = max(e["loss"].get(L, 0.0), r["loss"] / u)
    return e


def fits(e):
    """The tolerance model's constants for one envelope (see :data:`tolerances.MEASURED`)."""
    pts_s = {d: v[0] for d, v in e["act"].items()}
    pts_n = {d: v[1] for d, v in e["act"].items()}
    for d, v in e["loss"].items():   # the loss is judged like an activation at depth L
        pts_s[d] = max(pts_s.get(d, 0.0), v)
    return {"activations": fit_log(pts_s) + fit_log(pts_n),
            "gradients": (fit_log({d: v[0] for d, v in e["grad"].items()})
                          + fit_log({d: v[1] for d, v in e["grad"].items()}))}


def print_envelope(dtype, e, title):
    print(f"\n{dtype} (u = {UNIT_ROUNDOFF[dtype]:.3g}), {title}")
    print(f"  {'depth':>5}  {'act scaled/u':>13}  {'act rms/u':>10}  {'grad scaled/u':>14}  "
          f"{'grad rms/u':>11}  {'loss rel/u':>10}")
    for d in sorted(e["act"]):
        g = e["grad"].get(d)
        gs = f"{g[0]:14.1f}  {g[1]:11.1f}" if g else f"{'':>14}  {'':>11}"
        ls = f"{e['loss'][d]:10.2f}" if d in e["loss"] else ""
        print(f"  {d:>5}  {e['act'][d][0]:13.2f}  {e['act'][d][1]:10.2f}  {gs}  {ls}")


def markdown_table(records, dtypes, depths=(0, 1, 2, 4, 8, 16, 24)) -> str:
    """docs/ORACLE.md's table: the largest error at each depth, in units of ``u``, and the fits."""
    head = "| dtype | depth | " + " | ".join(str(d) for d in depths) + " | fitted `(a, b)` / `(c, e)` |"
    lines = [head, "| --- | --- | " + " | ".join("---" for _ in depths) + " | --- |"]
    for dtype in dtypes:
        e = envelope(records, dtype, lambda r: True)
        fit = fits(e)
        rows = [("activations scaled", e["act"], 0, fit["activations"][:2]),
                ("activations rms", e["act"], 1, fit["activations"][2:]),
                ("gradients scaled", e["grad"], 0, fit["gradients"][:2]),
                ("gradients rms", e["grad"], 1, fit["gradients"][2:])]
        for i, (what, points, k, ab) in enumerate(rows):
            cells = [f"{points[d][k]:.{1 if points[d][k] < 100 else 0}f}" if d in points else "-" for d in depths]
            lines.append(f"| {dtype if i == 0 else ''} | {what} | " + " | ".join(cells) +
                         f" | ({ab[0]:.2f}, {ab[1]:.2f}) |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer configs (a smoke run)")
    parser.add_argument("--records", help="write every example's figures here (JSON)")
    parser.add_argument("--from-records", help="re-fit from a --records file instead of measuring")
    parser.add_argument("--dtypes", default="float64,float32,bfloat16,float16")
    parser.add_argument("--markdown", action="store_true", help="print docs/ORACLE.md's table instead")
    args = parser.parse_args(argv)
    dtypes = args.dtypes.split(",")
    if args.from_records:
        with open(args.from_records) as fh:
            records = json.load(fh)
    else:
        records = measure(dtypes, args.quick)
        if args.records:
            with open(args.records, "w") as fh:
                json.dump(records, fh)
    if args.markdown:
        print(markdown_table(records, dtypes))
        return 0
    print("\nLargest error per depth, in units of the dtype's unit roundoff u "
          "(scaled = max|Δ|/max|ref|; rms = sqrt(NMSE)):")
    for dtype in dtypes:
        fitted = envelope(records, dtype, lambda r: True)
        print_envelope(dtype, fitted, f"{len(records)} examples")
        for kind, (a, b, c, f) in fits(fitted).items():
            print(f"  {kind} fit: scaled <= u * ({a:.2f} + {b:.2f} * log2(1 + depth));  "
                  f"sqrt(nmse) <= u * ({c:.2f} + {f:.2f} * log2(1 + depth))")
    return 0


def measure_record(D, H, L, gain, preln, seed, dtypes, proj=None) -> dict:
    """One example: a config (``proj``: a word_embed_proj_dim, OPT-350m style), its weights, a
    kink-free batch, every dtype's figures."""
    cfg = OPTConfig(vocabulary_size=512, num_layers=L, num_heads=H, hidden_dim=D, intermediate_dim=4 * D,
                    max_sequence_length=32, dropout=0.0, do_layer_norm_before=preln,
                    word_embed_proj_dim=proj, dtype="float64")
    params = random_params(cfg, gain, seed + 17 * L)
    ids, mask, attempt = clean_batch(cfg, params, seed)
    res = measure_example(cfg, params, ids, mask, dtypes)
    loss64 = res.pop("loss64")
    for r in res.values():
        r["act"] = {str(d): v for d, v in r["act"].items()}
    return {"width": D, "heads": H, "layers": L, "gain": gain, "preln": preln, "seed": seed,
            "proj": proj, "batch_attempt": attempt, "loss": loss64, "results": res}


def measure(dtypes, quick=False) -> list:
    widths = [(64, 4)] if quick else [(64, 4), (256, 8)]
    depths = [1, 2, 4] if quick else [1, 2, 4, 8, 16, 24]
    gains = [1.0, 2.0] if quick else [0.5, 1.0, 2.0]
    seeds = [0] if quick else [0, 1]
    records = []
    t0 = time.perf_counter()
    for D, H in widths:
        for L in depths:
            for gain in gains:
                for preln in (True, False):
                    for seed in seeds:
                        cfg = OPTConfig(vocabulary_size=512, num_layers=L, num_heads=H, hidden_dim=D,
                                        intermediate_dim=4 * D, max_sequence_length=32, dropout=0.0,
                                        do_layer_norm_before=preln, dtype="float64")
                        records.append(measure_record(D, H, L, gain, preln, seed, dtypes))
            print(f"  width {D} depth {L}: done ({time.perf_counter() - t0:.0f} s)", flush=True)
    # OPT-350m's shape: the embeddings (depth 0) go through project_in, a product the configs
    # above do not have; one-layer post-LN models with a half-width embedding cover it
    for D, H in widths:
        for gain in gains:
            for seed in seeds:
                records.append(measure_record(D, H, 1, gain, False, seed, dtypes, proj=D // 2))
    print(f"  projected embeddings: done ({time.perf_counter() - t0:.0f} s)", flush=True)
    return records


if __name__ == "__main__":
    raise SystemExit(main())
