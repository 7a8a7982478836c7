"""CTranslate2 through the oracle's CTranslate2Adapter (needs the `ctranslate2` extra): it conforms on
random configs and the stress cases, with its converter's quirks handled by the adapter, and what
it cannot do is listed once, not failed."""

import numpy as np
import pytest

pytest.importorskip("ctranslate2", reason="needs ctranslate2 (pip install -e '.[ctranslate2]')")
pytest.importorskip("transformers", reason="needs transformers (pip install -e '.[ctranslate2]')")

from conftest import shared_path  # noqa: E402
from refopt.config import OPTConfig  # noqa: E402
from refopt.testing import checks as C  # noqa: E402
from refopt.testing.adapters.ctranslate2 import CTranslate2Adapter  # noqa: E402
from refopt.testing.cases import Magnitudes, make_inputs, random_weights, stress_specs  # noqa: E402
from refopt.testing.modelcase import ModelCase  # noqa: E402


@pytest.fixture(scope="module")
def adapter():
    a = CTranslate2Adapter()
    yield a
    a.close()


def _run(adapter, case):
    suite = C.build_suite(adapter, [case], samplers=False, tokenizer_checks_=False)
    return {c.name.split("/")[1]: c.run() for c in suite}, suite.unsupported


def test_quirks_are_the_adapters_business(adapter):
    # a vocabulary of 45 (the converter pads its list to 48 but not the embedding), LayerNorms
    # without gains (the converter cannot write them), no tokenizer (the converter wants one)
    cfg = OPTConfig(vocabulary_size=45, num_layers=2, num_heads=2, hidden_dim=12, intermediate_dim=20,
                    max_sequence_length=24, dropout=0.0, layer_norm_elementwise_affine=False)
    rng = np.random.default_rng(0)
    case = ModelCase("quirks", cfg, random_weights(cfg, rng, magnitudes=Magnitudes(0.5)), *make_inputs(cfg, rng))
    results, unsupported = _run(adapter, case)
    assert set(results) == {"logits", "logits.left_padding", "generation"}
    assert all(r.status == C.PASS for r in results.values()), {k: r.detail for k, r in results.items()}
    assert set(unsupported) == {"activations", "gradients", "incremental"}


def test_random_configs_and_stress_cases_conform(adapter):
    cases = [C.random_case(s) for s in range(3)] + [spec.build(n) for n, spec in stress_specs().items()]
    for case in cases:
        for name, r in _run(adapter, case)[0].items():
            assert r.status in (C.PASS, C.SKIP), (case.name, name, r.detail)
            if r.status == C.SKIP:      # the one config CTranslate2 has no decoder for
                assert "final LayerNorm" in r.detail and case.config.remove_final_layer_norm


def test_a_checkpoint_goes_through_the_converter_itself(adapter):
    case = C.case_from_preset(shared_path("fixtures", "hf", "opt-tiny-realvocab"))
    r = C.check_logits(adapter, case)
    assert r.status == C.PASS and "loaded with own loader" in r.detail, r.detail


def test_a_config_it_cannot_build_is_one_row(adapter):
    from refopt.testing import run_conformance

    report = run_conformance(adapter, random_configs=0, samplers=False, stress=False,
                             case="v40l1h2d8f16p16.nf-w1-s0.2-i1-b2x8")
    rows = report.table().splitlines()
    assert [x for x in rows if x.startswith("v40l1h2d8f16p16")][0].startswith("v40l1h2d8f16p16.nf-w1-s0.2-i1-b2x8/*")
    assert "NOTHING WAS COMPARED" in report.table()
