"""refopt's conformance oracle: check another OPT implementation against refopt's float64 reference.

A backend author implements an :class:`Adapter` (load weights, return logits; optionally named
activations, gradients, incremental decoding, generation, tokenizer and sampler steps) and runs::

    refopt conform --against my_package.my_module:MyAdapter PRESET
    pytest --refopt-backend my_package.my_module:MyAdapter

or from Python::

    from refopt.testing import run_conformance, locate_divergence
    report = run_conformance(MyAdapter(), presets=["path/to/preset"], random_configs=3)
    print(report.table())

What is here:

* :class:`Adapter`, :class:`NotSupported`, :class:`SamplerSpec`, :func:`load_adapter`, :func:`load_adapter_as`,
  :data:`CAPABILITIES`, :class:`RefoptAdapter` (refopt itself on any backend) -- the protocol
  (:mod:`.adapter`); ``TransformersAdapter``, ``KerasHubAdapter`` and ``CTranslate2Adapter``
  (:mod:`.adapters`) for established implementations, imported only when used;
* :mod:`.cases` -- the one random-config space, stress magnitudes, case ids; :mod:`.modelcase` --
  a model, its batches and its float64 reference;
* :func:`tolerance`, :func:`error_figures`, :func:`compare` -- the tolerance model per dtype and
  depth (:mod:`.tolerances`), raised by the rounding noise of the input (:mod:`.noise`); ReLU kinks
  in gradients resolved from the port's own gradients (:mod:`.kinks`);
* :func:`locate_divergence` -- the first named intermediate where two backends part (:mod:`.locator`);
* :func:`run_conformance`, :func:`build_suite`, :func:`check_case` -- the checks by family
  (:mod:`.checks`) and :class:`Report` (:mod:`.report`);
* :mod:`.strategies` -- hypothesis strategies for configs, cases, weights, masks, prompts and texts;
* :mod:`.mutants` -- deliberately broken adapters that prove the checks catch real bugs;
* :func:`streaming_logits` -- float64 reference logits for checkpoints larger than memory
  (:mod:`.streaming`);
* :mod:`.pytest_plugin` -- ``pytest --refopt-backend module:Adapter``.

See ``docs/ORACLE.md`` for the backend author's guide.
"""

from refopt.testing.adapter import (CAPABILITIES, Adapter, NotSupported, RefoptAdapter, SamplerSpec,
                                    capabilities_of, load_adapter, load_adapter_as)
from refopt.testing.cases import CaseSpec, ConfigSpace, Magnitudes, case_by_id, random_case, stress_specs
from refopt.testing.checks import (CheckResult, Report, TokenizerCase, build_suite, check_case,
                                   run_conformance)
from refopt.testing.locator import Divergence, locate_divergence
from refopt.testing.modelcase import ModelCase, case_from_preset
from refopt.testing.reference import activation_names, gradient_order
from refopt.testing.sampler_reference import sampler_distribution
from refopt.testing.tolerances import Figures, Tolerance, compare, error_figures, tolerance

__all__ = [
    "CAPABILITIES", "Adapter", "NotSupported", "RefoptAdapter", "SamplerSpec", "capabilities_of",
    "load_adapter", "load_adapter_as", "CaseSpec", "ConfigSpace", "Magnitudes", "case_by_id", "random_case",
    "stress_specs", "CheckResult", "ModelCase", "Report", "TokenizerCase", "build_suite", "check_case",
    "case_from_preset", "run_conformance", "Divergence", "locate_divergence", "activation_names",
    "gradient_order", "sampler_distribution", "Figures", "Tolerance", "compare", "error_figures",
    "tolerance", "streaming_logits",
]


def __getattr__(name):
    if name == "streaming_logits":
        from refopt.testing.streaming import streaming_logits

        return streaming_logits
    raise AttributeError(f"module 'refopt.testing' has no attribute {name!r}")
