"""The decoding checks: greedy generation token by token, and incremental decoding (a prefill and
then one cached step per token) against the full forward, position by position."""

from __future__ import annotations

import numpy as np

from refopt.testing import reference as R
from refopt.testing.adapter import NotSupported, capabilities_of
from refopt.testing.checks.base import FAIL, PASS, CheckResult, ensure_loaded, figures, ratio
from refopt.testing.tolerances import compare, error_figures, noise_bound, plus_reference_error, tolerance


def check_generation(adapter, case, n_new: int = 6) -> CheckResult:
    """Greedy decoding of a few prompts.  Each new token must be the arg-max of refopt's float64
    logits *given the port's own prefix* (one forward over every prompt and its continuation), so
    a step whose two best logits are within the logits tolerance (a near-tie, either token right)
    does not end the comparison: the steps after it are judged on the port's choice.  A bfloat16
    or float16 port: the arg-max of refopt's logits in that dtype (KerasHub's rounding)."""
    ensure_loaded(adapter, case)
    n_new = min(n_new, case.config.max_sequence_length - 1)
    prompts = case.prompts(n_new)
    if not prompts or n_new < 1:
        raise NotSupported("the model's max_sequence_length leaves no room to generate")
    V = case.config.vocabulary_size
    outs = []
    for k, prompt in enumerate(prompts):
        got = [int(t) for t in adapter.greedy(list(prompt), n_new)]
        if len(got) != n_new:
            return CheckResult("generation", "", FAIL, "", f"prompt {k}: {len(got)} new tokens, expected {n_new}")
        bad = [t for t in got if not 0 <= t < V]
        if bad:
            return CheckResult("generation", "", FAIL, "", f"prompt {k}: token id {bad[0]} outside the "
                               f"vocabulary (size {V})")
        outs.append(got)
    width = max(len(p) + n_new for p in prompts)
    ids = np.full((len(prompts), width), case.config.pad_token_id, np.int64)
    mask = np.zeros(ids.shape, bool)
    for k, (prompt, got) in enumerate(zip(prompts, outs)):
        ids[k, :len(prompt) + n_new] = prompt + got
        mask[k, :len(prompt) + n_new] = True
    logits = R.run_forward(case.params, case.config, ids, mask)["logits"]           # [P, W, V]
    peak = float(np.max(np.abs(logits[mask])))
    dtype, depth, error = adapter.dtype, case.config.num_layers, None
    if dtype in R.HALF and isinstance(case.params, dict):
        # a half-precision port: the arg-max of refopt's logits in its dtype (KerasHub's rounding),
        # the bound as the logits check's against that reference (its own error measured here)
        half = R.run_forward_half(case.params, case.config, ids, mask, dtype)["logits"]
        error = error_figures(half[mask], logits[mask], peak)
        logits, peak, depth = half, max(peak, float(np.max(np.abs(half[mask])))), 0
    calibrated = plus_reference_error(tolerance(dtype, depth), error).scaled * peak

    def bound(gap):
        # the calibrated bound, raised by the rounding noise only when a gap needs it
        if gap <= calibrated:
            return calibrated
        noise = case.noise(dtype)["logits"]
        noise = noise if error is None else error.worst(noise)
        return plus_reference_error(noise_bound(tolerance(dtype, depth), noise), error).scaled * peak
    excused, compared = [], 0
    for k, (prompt, got) in enumerate(zip(prompts, outs)):
        for t in range(n_new):
            compared += 1
            row = logits[k, len(prompt) + t - 1]
            want = int(np.argmax(row))
            if got[t] == want:
                continue
            gap = float(row[want] - row[got[t]])
            where = f"prompt {k} {prompt}, new token {t} (after {got[:t]}): expected {want}, got {got[t]}"
            allowed = bound(gap)
            if gap <= allowed:
                excused.append(f"{where} (a near-tie: logit gap {gap:.2g} <= {allowed:.2g})")
                continue
            return CheckResult("generation", "", FAIL, f"{compared} tokens compared",
                               f"{where}: logit {row[got[t]]:.6g} vs {row[want]:.6g}, gap {gap:.3g} > "
                               f"tolerance {allowed:.3g}",
                               {"prompt": prompt, "got": got, "step": t, "expected": want})
    detail = "; ".join(excused) if excused else (
        f"every token the arg-max of refopt's {'float64' if error is None else dtype} logits")
    return CheckResult("generation", "", PASS, f"{len(prompts)} prompts x {n_new} tokens, "
                       f"{compared} compared", detail)


def check_incremental(adapter, case, left: bool = False) -> CheckResult:
    """Logits from a prefill of the first half of the batch and one cached step per later token
    (:meth:`refopt.testing.Adapter.incremental_logits`), compared position by position with
    refopt's full forward; fails at the first position out of tolerance."""
    if left and "left_padding" not in capabilities_of(adapter):
        raise NotSupported(f"{adapter.name} handles right padding only (supports_left_padding is False)")
    ids, mask = case.batch(left)
    S = ids.shape[1]
    if S < 2:
        raise NotSupported("the batch is one token long: nothing to decode step by step")
    ensure_loaded(adapter, case)
    prefill = max(1, S // 2)
    logits = np.asarray(adapter.incremental_logits(ids, mask, prefill))
    ref = case.reference(left, adapter.dtype)
    expected = ref.acts["logits"]
    if logits.shape != expected.shape:
        return CheckResult("incremental", "", FAIL, f"shape {list(logits.shape)}",
                           f"logits have shape {list(logits.shape)}, expected {list(expected.shape)}")
    L, dtype = case.config.num_layers, adapter.dtype
    noise = lambda: case.noise(dtype, left)["logits"]              # noqa: E731  (computed once, if needed)
    scale = ref.scales["logits"]
    real = mask.astype(bool)
    error = ref.error_of("logits")
    whole = compare("logits", logits[real], expected[real], dtype, L, scale=scale, noise=noise,
                    reference_error=error)
    side = "left" if left else "right"
    text = f"prefill {prefill} + {S - prefill} steps, {side} padding: {figures(whole)}"
    steps = []
    for s in range(S):
        rows = real[:, s]
        if not rows.any():
            continue
        c = compare(f"position {s}", logits[rows, s], expected[rows, s], dtype, L, scale=scale, noise=noise,
                    reference_error=error)
        steps.append(c)
        if not c.passed:
            stage = f"the prefill (positions 0..{prefill - 1})" if s < prefill else f"cached step {s - prefill + 1}"
            return CheckResult("incremental", "", FAIL, text,
                               f"first divergence at position {s}, {stage}: {c.describe()}",
                               {"first_divergence": f"position {s}", "prefill": prefill})
    return CheckResult("incremental", "", PASS if whole.passed else FAIL, text,
                       "every position within tolerance of the full forward" if whole.passed
                       else whole.describe(), {"ratio": ratio([whole] + steps)})
