"""Half-precision ports through the oracle: a bfloat16 (float16) port is held to refopt's reference
computed in that dtype as KerasHub computes it (refopt.dtype_policies), with that dtype's tolerance;
correct ports pass (refopt's own policy models, transformers in torch_dtype=bfloat16 under the
peers extra), broken ones fail located (tests/test_oracle_mutants.py), and a half-precision port
declaring float32 is told so."""

import math

import numpy as np
import pytest
from hypothesis import given, settings

from refopt.cli import main
from refopt.dtype_policies import round_to
from refopt.testing import checks as C
from refopt.testing import strategies as rst
from refopt.testing.adapter import RefoptAdapter
from refopt.testing.cases import random_case, stress_specs
from refopt.testing.tolerances import Figures, Tolerance, compare, noise_bound, plus_reference_error, tolerance

HALF = ["bfloat16", "float16"]


def _model_results(adapter, case, groups=None):
    return [c.run() for c in C.model_checks(adapter, case) if groups is None or c.group in groups]


@pytest.mark.parametrize("dtype", HALF)
def test_the_half_reference_is_keras_hubs_rounding_with_its_own_error(dtype):
    case = random_case(3)
    ref, exact = case.reference(dtype=dtype), case.reference()
    real = case.padding_mask
    for name, values in ref.acts.items():
        # every value is one of the dtype's, and its error against float64 is measured, not assumed
        assert np.array_equal(round_to(values[real], dtype), values[real]), name
        assert 0 < ref.error[name].scaled < 1, name
        assert ref.scales[name].scale >= exact.scales[name].scale
    # refopt's own policy model is that reference exactly
    port = RefoptAdapter("numpy", dtype)
    port.load(case.config, case.params)
    assert np.array_equal(port.logits(case.token_ids, real)[real], ref.acts["logits"][real])


def test_the_reference_error_is_added_by_the_triangle_inequality():
    tol = Tolerance(0.01, 1e-4)
    err = Figures(0.5, 2.0, 0.02, 4e-4)
    widened = plus_reference_error(tol, err)
    assert widened.scaled == pytest.approx(0.03)
    assert math.sqrt(widened.nmse) == pytest.approx(0.01 + 0.02)
    assert plus_reference_error(tol, None) == tol
    # against a half-precision reference the bound is the depth-0 one, raised by 8 x the noise --
    # the reference's own error counting as one more noise sample -- plus that error: within it
    # passes, past it fails, whatever the depth
    ref = np.linspace(-1, 1, 64)
    bound = plus_reference_error(noise_bound(tolerance("bfloat16", 0), err), err).scaled
    assert bound == pytest.approx(8 * 0.02 + 0.02)
    c = compare("x", ref * (1 + 0.9 * bound), ref, "bfloat16", 3, reference_error=err)
    assert c.passed and c.reference_error == err and "half-precision reference" in c.describe()
    assert not compare("x", ref * (1 + 1.1 * bound), ref, "bfloat16", 3, reference_error=err).passed


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("stress", ["stress-outliers", "stress-scores", "stress-post"])
def test_refopt_policy_ports_pass_the_stress_cases(dtype, stress):
    case = stress_specs()[stress].build(stress)
    for result in _model_results(RefoptAdapter("numpy", dtype), case):
        assert result.status == C.PASS, (result.name, result.detail)


@settings(max_examples=8, deadline=None)
@given(case=rst.model_cases(min_length=2, stress=0.5))
def test_refopt_policy_ports_pass_drawn_models(case):
    for dtype in HALF:
        for result in _model_results(RefoptAdapter("numpy", dtype), case):
            assert result.status == C.PASS, (dtype, result.name, result.detail)


@pytest.mark.parametrize("dtype", HALF)
def test_a_half_port_declaring_float32_is_told_so(dtype):
    class Undeclared(RefoptAdapter):
        def __init__(self):
            super().__init__("numpy", dtype)
            self.dtype = "float32"          # computes in the half dtype, says float32

    result = C.check_logits(Undeclared(), random_case(1))
    assert result.status == C.FAIL
    assert result.data["undeclared_dtype"] == dtype
    assert f"the port computes in {dtype}" in result.detail and f"--dtype {dtype}" in result.detail
    # a float32 port's failure says nothing of the kind
    from refopt.testing.mutants import LayerNormEpsilon

    other = C.check_logits(LayerNormEpsilon(), random_case(1))
    assert other.status == C.FAIL and "undeclared_dtype" not in other.data


def test_conform_dtype_flag(capsys):
    code = main(["conform", "--against", "refopt:numpy", "--dtype", "bfloat16", "--case", "stress-scores",
                 "--no-samplers"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "bfloat16" in out and "stress-scores/logits" in out and " 0 failed" in out
    # any adapter is held to the dtype given: the bfloat16 mutant, declared float32 by --dtype, fails
    # with the message that names its dtype
    code = main(["conform", "--against", "refopt.testing.mutants:Float16DeclaredBfloat16", "--dtype",
                 "float32", "--case", "random-1", "--no-samplers"])
    out = capsys.readouterr().out
    assert code == 1 and "the port computes in float16" in out


@pytest.fixture(scope="module")
def transformers_bf16():
    pytest.importorskip("torch", reason="needs torch (pip install -e '.[peers]')")
    pytest.importorskip("transformers", reason="needs transformers (pip install -e '.[peers]')")
    from refopt.testing.adapters.transformers import TransformersAdapter

    return TransformersAdapter("bfloat16")


@pytest.mark.parametrize("case_id", ["stress-outliers", "stress-scores", "random-0", "random-7", "random-45"])
def test_transformers_in_bfloat16_passes(transformers_bf16, case_id):
    # transformers rounds at other places than KerasHub (one rounding for the dense product and its
    # bias, the scaled query, float32 softmax in bfloat16 storage): a correct port all the same
    case = stress_specs()[case_id].build(case_id) if case_id.startswith("stress") else random_case(int(case_id[7:]))
    for result in _model_results(transformers_bf16, case):
        assert result.status == C.PASS, (result.name, result.detail)
