"""``pytest --refopt-backend module:Adapter``: refopt's conformance suite as pytest items.

With the plugin registered (refopt's ``pytest11`` entry point, or ``-p refopt.testing.pytest_plugin``)
and ``--refopt-backend`` given, the session gains one item per conformance check, named like the
rows of ``refopt conform``::

    refopt-conformance::opt-tiny-preln/logits
    refopt-conformance::opt-tiny-preln/activations
    refopt-conformance::tokenizer.encode
    refopt-conformance::samplers.top_p_tie
    refopt-conformance::hypothesis/model

A failing item prints the located divergence (``first divergence: layers.3.attention_output: ...``)
and a command that runs it again (``refopt conform --against ... --seed S --case ID``); a check the
adapter cannot run is a pytest skip with the reason; checks needing a capability the adapter lacks
are not collected and are listed once in the summary.  A session in which no conformance item
compared anything (every one skipped: no torch, no preset the adapter builds) exits with status 1
and says why.  Without ``--refopt-backend`` the plugin does nothing.

Options: ``--refopt-preset DIR`` (repeatable: models to check), ``--refopt-tokenizer DIR``
(``vocab.json`` + ``merges.txt``; default: the first preset that has them), ``--refopt-random-configs
N`` (default 3), ``--refopt-no-stress`` (leave out the fixed stress cases),
``--refopt-examples N`` (hypothesis examples of the ``hypothesis/model`` item, default 10; 0 leaves
it out), ``--refopt-seed S`` (the random configs, inputs, sampler draws, and the hypothesis
examples), ``--refopt-case ID`` (one case or check, as ``refopt conform --case``),
``--refopt-streaming`` (the presets' reference computed one decoder layer at a time, the default
for checkpoints of more than 20M parameters).

Parallel runs: every item is independent, so ``pytest -n auto`` (pytest-xdist) spreads them over
workers; each worker builds its own adapter and references.  The random configs come from fixed
NumPy seeds, so every worker collects the same items.  A bad ``--refopt-backend`` (a module that
cannot be imported, a class that is not an adapter) is a usage error reported once, before any
worker starts.
"""

from __future__ import annotations

import pytest

# what the plugin keeps on pytest's config: the adapter, the plan of checks, how many compared
_ADAPTER = pytest.StashKey[object]()
_PLAN = pytest.StashKey[object]()
_COMPARED = pytest.StashKey[int]()


def pytest_addoption(parser):
    group = parser.getgroup("refopt", "refopt conformance oracle")
    group.addoption("--refopt-backend", metavar="MODULE:ADAPTER", default=None,
                    help="run refopt's conformance suite against this adapter ('transformers', "
                         "'keras-hub', 'ctranslate2', 'refopt[:backend]' or 'package.module:AdapterClass', "
                         "importable from the current directory)")
    group.addoption("--refopt-preset", metavar="DIR", action="append", default=[],
                    help="a preset directory whose model is checked (repeatable)")
    group.addoption("--refopt-tokenizer", metavar="DIR", default=None,
                    help="a directory with vocab.json and merges.txt for the tokenizer checks")
    group.addoption("--refopt-random-configs", metavar="N", type=int, default=3,
                    help="random configs checked besides the presets (default 3)")
    group.addoption("--refopt-no-stress", action="store_false", dest="refopt_stress", default=True,
                    help="leave out the fixed stress cases (outliers, large scores, offsets, long sequences)")
    group.addoption("--refopt-examples", metavar="N", type=int, default=10,
                    help="hypothesis examples of the hypothesis/model item (default 10, 0: none)")
    group.addoption("--refopt-seed", metavar="S", type=int, default=0,
                    help="seed of the random configs, inputs, sampler draws and hypothesis examples (default 0)")
    group.addoption("--refopt-case", metavar="ID", default=None,
                    help="only this case or check (a preset's name, random-N, stress-*, a case id, samplers, ...)")
    group.addoption("--refopt-dtype", choices=("float32", "float64", "bfloat16", "float16"), default=None,
                    help="the port's compute dtype, as refopt conform --dtype (default: the adapter's own); "
                         "a bfloat16 or float16 port is held to refopt's reference in that dtype")
    group.addoption("--refopt-streaming", action="store_true", default=None,
                    help="reference the presets one decoder layer at a time, the adapter loading them "
                         "itself (the default for presets of more than 20M parameters)")


def pytest_configure(config):
    spec = config.getoption("--refopt-backend", default=None)
    if not spec:
        return
    from refopt.errors import RefoptError
    from refopt.testing.adapter import NotSupported, Unavailable, load_adapter_as

    try:
        adapter = load_adapter_as(spec, config.getoption("--refopt-dtype", default=None))
    except NotSupported as e:
        adapter = Unavailable(spec, str(e))
    except (RefoptError, ValueError, TypeError, ImportError) as e:
        raise pytest.UsageError(f"--refopt-backend {spec}: {e}") from None
    config.stash[_ADAPTER] = adapter
    config.stash[_COMPARED] = 0


class ConformanceFailure(Exception):
    def __init__(self, result):
        super().__init__(result.detail)
        self.result = result


class ConformanceItem(pytest.Item):
    def __init__(self, *, check, run=None, **kwargs):
        super().__init__(**kwargs)
        self.check = check
        self._run = run or (lambda c: c.run())

    def runtest(self):
        result = self._run(self.check)
        if result.status == "skip":
            pytest.skip(result.detail.removeprefix("skipped: "))
        if result.status == "FAIL":
            raise ConformanceFailure(result)

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, ConformanceFailure):
            r = excinfo.value.result
            text = f"{r.name} FAILED\n  figures: {r.figures}\n  {r.detail}"
            if r.reproduce:
                text += f"\n  reproduce: {r.reproduce}"
            return text
        return super().repr_failure(excinfo, style)

    def reportinfo(self):
        return "refopt-conformance", None, self.name


class _BrokenSuite:
    """Stands in for the checks when building them failed (a preset that cannot be read): one item
    that fails with the reason, instead of an internal error."""

    def __init__(self, error):
        self.name, self.error = "setup", error

    def run(self):
        from refopt.testing.checks import FAIL, CheckResult

        return CheckResult("setup", "setup", FAIL, "", f"{type(self.error).__name__}: {self.error}")


class ConformanceCollector(pytest.Collector):
    def collect(self):
        try:
            p = _suite(self.config)
        except Exception as e:        # reported as a failing item, never as an INTERNALERROR
            return [ConformanceItem.from_parent(self, name="setup", check=_BrokenSuite(e))]
        from refopt.testing.checks import run_check

        return [ConformanceItem.from_parent(self, name=check.name, check=check,
                                            run=lambda c: run_check(c, p))
                for check in p.suite]


def _suite(config):
    state = config.stash.get(_PLAN, None)
    if state is not None:
        return state
    from refopt.testing import checks

    adapter = config.stash[_ADAPTER]
    seed = config.getoption("--refopt-seed")
    case = config.getoption("--refopt-case")
    only_hypothesis = case in ("hypothesis", "hypothesis/model")
    p = checks.plan(adapter, config.getoption("--refopt-preset"), config.getoption("--refopt-random-configs"),
                    config.getoption("--refopt-tokenizer"), True, seed, config.getoption("--refopt-streaming"),
                    config.getoption("refopt_stress"), None if only_hypothesis else case,
                    spec=config.getoption("--refopt-backend"))
    if only_hypothesis:
        del p.suite[:]
        p.suite.unsupported = {}
    examples = config.getoption("--refopt-examples")
    if examples > 0 and (case is None or only_hypothesis):
        family = getattr(p.adapter, "config_family", "opt")
        p.suite.append(checks.Check("hypothesis", "hypothesis/model",
                                    lambda: _hypothesis_model(p, examples, family)))
    config.stash[_PLAN] = p
    return p


def _hypothesis_model(p, examples: int, family: str):
    """Every supported model check on hypothesis-drawn models (examples from ``--refopt-seed``, no
    shrinking: the first failing example is reported as drawn, by its case id)."""
    from hypothesis import HealthCheck, Phase, given, seed, settings

    from refopt.testing import checks, strategies
    from refopt.testing.report import reproduce_command

    outcome = {"examples": 0, "ran": 0, "skipped": set()}

    @seed(p.seed)
    @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck), derandomize=False)
    @given(case=strategies.model_cases(family, min_length=2, seed=p.seed))
    def run(case):
        outcome["examples"] += 1
        for result in checks.check_case(p.adapter, case):
            if result.status == checks.SKIP:
                outcome["skipped"].add(result.detail.removeprefix("skipped: "))
                continue
            if result.status == checks.FAIL:
                raise AssertionError(f"{case!r}: {result.name}: {result.detail}\n"
                                     f"reproduce: {reproduce_command(p.spec, result.name, p.seed)}")
            outcome["ran"] += 1

    try:
        run()
    except AssertionError as e:
        lines = str(e).splitlines()
        return checks.CheckResult("hypothesis", "", checks.FAIL, f"{outcome['examples']} examples",
                                  lines[0], reproduce=next((x.removeprefix("reproduce: ") for x in lines
                                                            if x.startswith("reproduce: ")), ""))
    if outcome["ran"] == 0:
        raise checks.NotSupported("; ".join(sorted(outcome["skipped"])) or "no example ran")
    note = ("; not run: " + "; ".join(sorted(outcome["skipped"]))) if outcome["skipped"] else ""
    return checks.CheckResult("hypothesis", "", checks.PASS,
                              f"{outcome['examples']} hypothesis examples (seed {p.seed})", note)


def pytest_collection_modifyitems(session, config, items):
    if not config.getoption("--refopt-backend"):
        return
    collector = ConformanceCollector.from_parent(session, name="refopt-conformance",
                                                 nodeid="refopt-conformance")
    items.extend(collector.collect())


def pytest_runtest_logreport(report):
    # counted where the reports arrive (the controller under xdist): did anything compare?
    if report.nodeid.startswith("refopt-conformance::") and report.when == "call" and not report.skipped:
        config = _CONFIG.get("config")
        if config is not None:
            config.stash[_COMPARED] = config.stash.get(_COMPARED, 0) + 1


_CONFIG: dict = {}


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session):
    _CONFIG["config"] = session.config


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    adapter = config.stash.get(_ADAPTER, None)
    if adapter is None:
        return
    from refopt.testing.adapter import CAPABILITIES, capabilities_of

    missing = [c for c in CAPABILITIES if c not in capabilities_of(adapter)]
    if missing:
        terminalreporter.write_line(f"refopt conformance: not supported by {adapter.name}, its checks not "
                                    f"run: {', '.join(missing)}")
    if config.stash.get(_COMPARED, 0) == 0 and not config.option.collectonly:
        why = getattr(adapter, "reason", "") or "every conformance check was skipped (see the reasons above)"
        terminalreporter.write_line(f"refopt conformance: NOTHING WAS COMPARED: {why}", red=True)


def pytest_sessionfinish(session, exitstatus):
    config = session.config
    if config.getoption("--refopt-backend") and config.stash.get(_COMPARED, 0) == 0 \
            and exitstatus == 0 and not hasattr(config, "workerinput") and not config.option.collectonly:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_unconfigure(config):
    adapter = config.stash.get(_ADAPTER, None)
    if adapter is not None:
        adapter.close()
