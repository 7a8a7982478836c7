"""``pytest --refopt-backend module:Adapter``: refopt's conformance suite as pytest items.

With the plugin registered (refopt's ``pytest11`` entry point, or ``-p refopt.testing.pytest_plugin``)
and ``--refopt-backend`` given, the session gains one item per conformance check, named like the
rows of ``refopt conform``::

    refopt-conformance::opt-tiny-preln/logits
    refopt-conformance::opt-tiny-preln/activations
    refopt-conformance::tokenizer.encode
    refopt-conformance::samplers.top_p_tie
    refopt-conformance::hypothesis/model

A failing item prints the located divergence (``first divergence: layers.3.attention_output: ...``);
a check the adapter cannot run is a pytest skip with the reason.  Without ``--refopt-backend`` the
plugin does nothing.

Options: ``--refopt-preset DIR`` (repeatable: models to check), ``--refopt-tokenizer DIR``
(``vocab.json`` + ``merges.txt``; default: the first preset that has them), ``--refopt-random-configs
N`` (default 3), ``--refopt-examples N`` (hypothesis examples of the ``hypothesis/model`` item,
default 10; 0 leaves it out), ``--refopt-seed S``, ``--refopt-streaming`` (the presets' reference
computed one decoder layer at a time, for checkpoints larger than memory).

Parallel runs: every item is independent, so ``pytest -n auto`` (pytest-xdist) spreads them over
workers; each worker builds its own adapter and references.  The random configs come from fixed
NumPy seeds and the hypothesis item runs with ``derandomize=True``, so every worker collects the
same items and draws the same examples.
"""

from __future__ import annotations

import pytest

_STATE_KEY = "_refopt_conformance"


def pytest_addoption(parser):
    group = parser.getgroup("refopt", "refopt conformance oracle")
    group.addoption("--refopt-backend", metavar="MODULE:ADAPTER", default=None,
                    help="run refopt's conformance suite against this adapter ('transformers', "
                         "'keras-hub', 'refopt[:backend]' or 'package.module:AdapterClass')")
    group.addoption("--refopt-preset", metavar="DIR", action="append", default=[],
                    help="a preset directory whose model is checked (repeatable)")
    group.addoption("--refopt-tokenizer", metavar="DIR", default=None,
                    help="a directory with vocab.json and merges.txt for the tokenizer checks")
    group.addoption("--refopt-random-configs", metavar="N", type=int, default=3,
                    help="random configs checked besides the presets (default 3)")
    group.addoption("--refopt-examples", metavar="N", type=int, default=10,
                    help="hypothesis examples of the hypothesis/model item (default 10, 0: none)")
    group.addoption("--refopt-seed", metavar="S", type=int, default=0,
                    help="seed of the random configs and inputs (default 0)")
    group.addoption("--refopt-streaming", action="store_true", default=False,
                    help="reference the presets one decoder layer at a time (checkpoints larger than "
                         "memory; the adapter loads them itself; no gradient or generation checks)")


class ConformanceFailure(Exception):
    def __init__(self, result):
        super().__init__(result.detail)
        self.result = result


class ConformanceItem(pytest.Item):
    def __init__(self, *, check, **kwargs):
        super().__init__(**kwargs)
        self.check = check

    def runtest(self):
        result = self.check.run()
        if result.status == "skip":
            pytest.skip(result.detail.removeprefix("skipped: "))
        if result.status == "FAIL":
            raise ConformanceFailure(result)

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, ConformanceFailure):
            r = excinfo.value.result
            return f"{r.name} FAILED\n  figures: {r.figures}\n  {r.detail}"
        return super().repr_failure(excinfo, style)

    def reportinfo(self):
        return "refopt-conformance", None, self.name


class ConformanceCollector(pytest.Collector):
    def collect(self):
        return [ConformanceItem.from_parent(self, name=check.name, check=check)
                for check in _suite(self.config)]


def _suite(config):
    state = getattr(config, _STATE_KEY, None)
    if state is not None:
        return state
    from refopt.testing import checks
    from refopt.testing.adapter import NotSupported, Unavailable, load_adapter

    spec = config.getoption("--refopt-backend")
    try:
        adapter = load_adapter(spec)
    except NotSupported as e:
        adapter = Unavailable(spec, str(e))
    seed = config.getoption("--refopt-seed")
    presets = config.getoption("--refopt-preset")
    streaming = config.getoption("--refopt-streaming")
    cases = [checks.StreamingCase(p, seed=seed) if streaming else checks.case_from_preset(p, seed=seed)
             for p in presets]
    family = getattr(adapter, "config_family", "opt")
    cases += [checks.random_case(seed + i, family=family)
              for i in range(config.getoption("--refopt-random-configs"))]
    tok_case, reason = None, "no tokenizer files: pass --refopt-tokenizer DIR or a preset with vocab.json and merges.txt"
    for src in ([config.getoption("--refopt-tokenizer")] if config.getoption("--refopt-tokenizer") else presets):
        files = checks.find_tokenizer_files(src)
        if files is not None:
            tok_case = checks.TokenizerCase(*files, seed=seed)
            break
    suite = checks.build_suite(adapter, cases, tok_case, reason)
    examples = config.getoption("--refopt-examples")
    if examples > 0:
        suite.append(checks.Check("hypothesis", "hypothesis/model",
                                  lambda: _hypothesis_model(adapter, examples, family)))
    setattr(config, _STATE_KEY, suite)
    config._refopt_adapter = adapter
    return suite


def _hypothesis_model(adapter, examples: int, family: str):
    """Logits, activations and gradients on hypothesis-drawn models (deterministic examples, no
    shrinking: the first failing example is reported as drawn)."""
    from hypothesis import HealthCheck, Phase, given, settings

    from refopt.testing import checks, strategies
    from refopt.testing.adapter import NotSupported

    outcome = {"examples": 0, "ran": 0, "skipped": set()}

    @settings(max_examples=examples, derandomize=True, deadline=None, database=None,
              phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=strategies.model_cases(family, min_length=2))
    def run(case):
        outcome["examples"] += 1
        for fn in (checks.check_logits, checks.check_activations, checks.check_gradients):
            try:
                result = fn(adapter, case)
            except NotSupported as e:
                outcome["skipped"].add(str(e))
                continue
            if result.status == checks.FAIL:
                raise AssertionError(f"{case.name} ({case.config}): {fn.__name__}: {result.detail}")
            outcome["ran"] += 1

    try:
        run()
    except AssertionError as e:
        return checks.CheckResult("hypothesis", "", checks.FAIL, f"{outcome['examples']} examples",
                                  str(e).splitlines()[0])
    if outcome["ran"] == 0:
        raise NotSupported("; ".join(sorted(outcome["skipped"])) or "no example ran")
    note = ("; not run: " + "; ".join(sorted(outcome["skipped"]))) if outcome["skipped"] else ""
    return checks.CheckResult("hypothesis", "", checks.PASS,
                              f"{outcome['examples']} hypothesis examples (logits, activations, gradients)",
                              note)


def pytest_collection_modifyitems(session, config, items):
    if not config.getoption("--refopt-backend"):
        return
    collector = ConformanceCollector.from_parent(session, name="refopt-conformance",
                                                 nodeid="refopt-conformance")
    items.extend(collector.collect())


def pytest_unconfigure(config):
    adapter = getattr(config, "_refopt_adapter", None)
    if adapter is not None:
        adapter.close()
