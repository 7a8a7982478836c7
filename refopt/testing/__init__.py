"""refopt's conformance oracle: check another OPT implementation against refopt's float64 reference.

A backend author implements an :class:`Adapter` (load weights, return logits; optionally named
activations, gradients, tokenizer and sampler steps) and runs::

    refopt conform --against my_package.my_module:MyAdapter PRESET
    pytest --refopt-backend my_package.my_module:MyAdapter

or from Python::

    from refopt.testing import run_conformance, locate_divergence
    report = run_conformance(MyAdapter(), presets=["path/to/preset"], random_configs=3)
    print(report.table())

What is here:

* :class:`Adapter`, :class:`NotSupported`, :class:`SamplerSpec`, :func:`load_adapter`,
  :class:`RefoptAdapter` (refopt itself on any backend) -- the protocol (:mod:`.adapter`);
  ``TransformersAdapter`` and ``KerasHubAdapter`` (:mod:`.adapters`) for the two established
  implementations, imported only when used;
* :func:`tolerance`, :func:`error_figures`, :func:`compare` -- the tolerance model per dtype and
  depth, and max abs / max rel / NMSE figures with the float64 tie-break (:mod:`.tolerances`);
* :func:`locate_divergence` -- the first named intermediate where two backends part (:mod:`.locator`);
* :func:`run_conformance`, :func:`build_suite`, :class:`Report` -- the suite (:mod:`.checks`);
* :mod:`.strategies` -- hypothesis strategies for configs, weights, masks, prompts and texts;
* :mod:`.mutants` -- deliberately broken adapters that prove the checks catch real bugs;
* :func:`streaming_logits` -- float64 reference logits for checkpoints larger than memory
  (:mod:`.streaming`);
* :mod:`.pytest_plugin` -- ``pytest --refopt-backend module:Adapter``.

See ``docs/ORACLE.md`` for the backend author's guide.
"""

from refopt.testing.adapter import Adapter, NotSupported, RefoptAdapter, SamplerSpec, load_adapter
from refopt.testing.checks import (CheckResult, ModelCase, Report, TokenizerCase, build_suite,
                                   case_from_preset, random_case, run_conformance)
from refopt.testing.locator import Divergence, locate_divergence
from refopt.testing.reference import activation_names, gradient_order, sampler_distribution
from refopt.testing.tolerances import Figures, Tolerance, compare, error_figures, tolerance

__all__ = [
    "Adapter", "NotSupported", "RefoptAdapter", "SamplerSpec", "load_adapter",
    "CheckResult", "ModelCase", "Report", "TokenizerCase", "build_suite", "case_from_preset",
    "random_case", "run_conformance", "Divergence", "locate_divergence", "activation_names",
    "gradient_order", "sampler_distribution", "Figures", "Tolerance", "compare", "error_figures",
    "tolerance", "streaming_logits",
]


def __getattr__(name):
    if name == "streaming_logits":
        from refopt.testing.streaming import streaming_logits

        return streaming_logits
    raise AttributeError(f"module 'refopt.testing' has no attribute {name!r}")
