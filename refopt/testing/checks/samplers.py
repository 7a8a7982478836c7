"""The sampler checks: one sampler step on given probabilities and uniform draws.

Every row gets its own uniforms (stratified over ``[0, 1)`` with a random offset per row, so every
part of the distribution is reached), and the rows are sent in a random order -- twice, in two
orders -- so a port whose choice depends on a row's place in the batch (one uniform for the whole
batch, uniforms read in another order, rows sorted) is caught, and the report names the batch
position, the row and the draw.  The exact rows (probabilities that are sums of powers of two) also
get the draw ``u = 0``: :func:`refopt.philox.choose` takes the first token whose partial sum
*exceeds* ``u * total``, so never a token of weight 0, where a port comparing with ``>=`` takes the
first token, removed by its filter or not -- a draw stratified uniforms never make and a long
generation eventually does (one in 2^32 with 32-bit uniforms).  Draws on the other steps of the
cumulative weights are not made: a port that computes its weights in float32 or renormalises them
puts a step a rounding to either side, and either choice is right.
"""

from __future__ import annotations

import numpy as np

from refopt.testing.adapter import SamplerSpec
from refopt.testing.checks.base import FAIL, PASS, Check, CheckResult
from refopt.testing.sampler_reference import fragile_rows, sampler_distribution

UNIFORMS_PER_ROW = 64


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


def sampler_cases(seed: int = 1234) -> dict[str, list[tuple[SamplerSpec, np.ndarray, bool]]]:
    """check name -> [(spec, probabilities [B, V], exact)]; ``exact`` cases are judged on every row."""
    P = _random_probabilities(np.random.default_rng(seed))
    return {
        "samplers.greedy": [(SamplerSpec("greedy"), P, False),                 # ties: the lowest id
                            (SamplerSpec("greedy"), _dyadic([[.125, .25, .25, .25, .125],
                                                             [.5, .5]]), True)],
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


def _support(weights_row):
    return sorted(int(i) for i in np.flatnonzero(weights_row > 0))


def draws(rows, rng, per_row: int = UNIFORMS_PER_ROW, zero: bool = False):
    """``(row [N], u [N])``: ``per_row`` stratified uniforms for each of ``rows``, each row with its
    own random offset, and with ``zero`` the draw ``u = 0`` for each row too, in a random order."""
    rows = np.asarray(rows)
    offsets = rng.uniform(0.0, 1.0, (len(rows), 1))
    u = (np.arange(per_row)[None, :] + offsets) / per_row                   # [R, M] in [0, 1)
    if zero:
        u = np.concatenate([u, np.zeros((len(rows), 1))], axis=1)
    which = np.repeat(rows, u.shape[1])
    order = rng.permutation(len(which))
    return which[order], u.reshape(-1)[order]


def check_sampler(adapter, cases, seed: int = 0) -> CheckResult:
    from refopt.philox import choose

    rng = np.random.default_rng(seed)
    total = skipped_rows = 0
    convention = adapter.sampler_convention
    for spec, P, exact in cases:
        W = sampler_distribution(spec, P, convention)
        alternatives = [W]
        if exact and convention == "transformers" and spec.name == "top_p":
            # transformers decides an exact tie on rounded log-probabilities: either side is right
            alternatives.append(sampler_distribution(spec, P, convention, tie_kept=True))
        rows = np.arange(P.shape[0]) if exact else np.flatnonzero(~fragile_rows(spec, P, convention))
        skipped_rows += P.shape[0] - len(rows)
        if len(rows) == 0:
            continue
        for order in range(2):                                  # two random orders of the batch
            which, U = draws(rows, rng, zero=exact)
            got = np.asarray(adapter.sample(spec, P[which].copy(), U.copy()))
            total += len(which)
            expected = [choose(w[which], U) for w in alternatives]
            if got.shape != expected[0].shape:
                return CheckResult("samplers", "", FAIL, "", f"{spec.describe()}: returned shape "
                                   f"{list(got.shape)}, expected {list(expected[0].shape)}")
            ok = np.zeros(len(which), bool)
            for r in rows:                                      # a row is right under one rule
                at = which == r
                for e in expected:
                    if np.array_equal(got[at], e[at]):
                        ok |= at
                        break
            if ok.all():
                continue
            i = int(np.flatnonzero(~ok & (got != expected[0]))[0])
            r = int(which[i])
            at = which == r
            probs = np.array2string(P[r], precision=4, threshold=12, separator=", ")
            return CheckResult(
                "samplers", "", FAIL, f"{total} draws, {int((got != expected[0]).sum())} differ",
                f"{spec.describe()} ({convention} rule), batch position {i} of {len(which)} (row {r}, "
                f"probabilities {probs}): u={U[i]:.4f} chose {int(got[i])}, expected {int(expected[0][i])}; "
                f"reference support {_support(W[r])}, the port chose among "
                f"{sorted(set(int(t) for t in got[at]))} over this row's {int(at.sum())} draws",
                {"spec": spec._asdict(), "row": r, "position": i, "u": float(U[i]), "got": int(got[i]),
                 "expected": int(expected[0][i])})
    detail = f"{skipped_rows} near-threshold rows left out" if skipped_rows else ""
    return CheckResult("samplers", "", PASS, f"{total} draws in shuffled batches, identical choices", detail)


def sampler_checks(adapter, seed: int = 0) -> list[Check]:
    return [Check("samplers", name, (lambda c=cases: check_sampler(adapter, c, seed)), needs=("samplers",))
            for name, cases in sampler_cases().items()]
