"""Mutants of the samplers."""

from __future__ import annotations

import numpy as np

from refopt.philox import choose
from refopt.testing.adapter import RefoptAdapter
from refopt.testing.mutants.base import _Mutant
from refopt.testing.sampler_reference import sampler_distribution, tempered_probabilities


def _sorted(q, k=None):
    # q [B, V] -> order [B, n] (largest first, ties by lower id), sorted values [B, n], n = k or V
    order = np.argsort(-q, axis=-1, kind="stable")[:, :k]
    return order, np.take_along_axis(q, order, axis=-1)


def _scatter(shape, order, values):
    out = np.zeros(shape)
    np.put_along_axis(out, order, values, axis=-1)
    return out


class _SamplerMutant(_Mutant):
    """Samplers as refopt's, except for ``top_p`` (and, in one mutant, the temperature)."""

    def top_p(self, q, p, k):
        raise NotImplementedError

    def tempered(self, probabilities, temperature):
        return tempered_probabilities(np.asarray(probabilities, np.float64), temperature)

    def sample(self, spec, probabilities, uniforms):
        if spec.name != "top_p":
            return super().sample(spec, probabilities, uniforms)
        q = self.tempered(probabilities, spec.temperature)
        return choose(self.top_p(q, spec.p, spec.k), uniforms)


class TopPOneTooMany(_SamplerMutant):
    bug = "top-p keeps one token more than the smallest prefix whose mass exceeds p"

    def top_p(self, q, p, k):
        order, s = _sorted(q, k)
        before = np.cumsum(s, axis=-1) - s
        keep = before <= p
        n = keep.sum(axis=-1, keepdims=True)                                   # tokens kept
        keep = np.arange(s.shape[-1])[None, :] <= n                            # ... and one more
        return _scatter(q.shape, order, np.where(keep, s, 0.0))


class TopPTieStrict(_SamplerMutant):
    bug = ("top-p keeps a token only if the mass before it is < p, so at an exact tie (the mass "
           "before it == p) it drops the token KerasHub's rule keeps")

    def top_p(self, q, p, k):
        order, s = _sorted(q, k)
        keep = (np.cumsum(s, axis=-1) - s) < p
        keep[:, 0] = True
        return _scatter(q.shape, order, np.where(keep, s, 0.0))


class TopPZeroNaN(_SamplerMutant):
    bug = ("top-p keeps tokens whose preceding mass is < p without always keeping the first: "
           "top_p=0 masks every token, and the draw divides 0 by 0 (NaN) instead of taking the arg-max")

    def top_p(self, q, p, k):
        order, s = _sorted(q, k)
        keep = (np.cumsum(s, axis=-1) - s) < p
        w = _scatter(q.shape, order, np.where(keep, s, 0.0))
        with np.errstate(invalid="ignore"):
            return w / w.sum(axis=-1, keepdims=True)                           # 0/0 when nothing kept


class TopKThenTopPMasksAll(_SamplerMutant):
    bug = ("after the top-k cut, top-p removes tokens whose ascending cumulative mass is <= 1 - p "
           "without renormalising first and without keeping the most probable token: when the k "
           "survivors hold less than 1 - p, every token is masked")

    def top_p(self, q, p, k):
        order, s = _sorted(q, k)                                               # largest first
        ascending = np.cumsum(s[:, ::-1], axis=-1)[:, ::-1]                    # mass at or below each
        keep = ascending > 1.0 - p
        w = _scatter(q.shape, order, np.where(keep, s, 0.0))
        with np.errstate(invalid="ignore"):
            return w / w.sum(axis=-1, keepdims=True)


class TemperatureAfterTopK(_SamplerMutant):
    bug = ("temperature applied after the top-k / top-p cut: the nucleus is chosen on the "
           "untempered distribution")

    def sample(self, spec, probabilities, uniforms):
        if spec.name != "top_p" or spec.temperature == 1.0:
            return RefoptAdapter.sample(self, spec, probabilities, uniforms)
        q = np.asarray(probabilities, np.float64)
        kept = sampler_distribution(spec._replace(temperature=1.0), q, "keras_hub")
        return choose(self.tempered(kept, spec.temperature), uniforms)


class SamplerRowsOutOfOrder(_Mutant):
    bug = ("each row drawn with another row's uniform (the draws taken in reverse batch order): "
           "the choice depends on the row's place in the batch")

    def sample(self, spec, probabilities, uniforms):
        return super().sample(spec, probabilities, np.asarray(uniforms)[::-1].copy())


class ChooseOnTheStep(_Mutant):
    bug = ("the draw takes the first token whose partial sum reaches u * total (``>=``) instead of "
           "exceeding it: at u = 0 a leading token of weight 0 -- one the filter removed -- and at a "
           "draw exactly on a step the token before it")

    def sample(self, spec, probabilities, uniforms):
        w = sampler_distribution(spec, probabilities, "keras_hub", backend=self.backend)
        c = np.cumsum(w, axis=-1)
        t = np.asarray(uniforms, np.float64) * c[:, -1]
        return np.minimum((c < t[:, None]).sum(axis=-1), w.shape[-1] - 1).astype(np.int64)
