"""The conformance checks, by family, and the suite that runs them against an adapter.

Checks, in the order they run (each one a row of ``refopt conform``'s table and one pytest item of
the plugin):

per model (a preset, a random config, a stress case; :mod:`.model`, :mod:`.gradients`, :mod:`.generation`):
    ``logits``                    right-padded batch, real positions only
    ``logits.left_padding``       its left-padded twin
    ``activations``               every named intermediate, forward order; fails at the first that
                                  exceeds its tolerance (the divergence locator)
    ``gradients``                 the loss, then every parameter's gradient in backward order
    ``incremental``               a prefill and one cached step per token, position by position
    ``incremental.left_padding``  the same on the left-padded batch
    ``generation``                greedy decoding of a few prompts, token by token
tokenizer (when a ``vocab.json`` / ``merges.txt`` pair is available; :mod:`.tokenizer`):
    ``tokenizer.prompt_start``, ``tokenizer.special_tokens``, ``tokenizer.encode``,
    ``tokenizer.bytes``, ``tokenizer.decode``
samplers (one sampler step on given probabilities and uniform draws; :mod:`.samplers`):
    ``samplers.greedy``, ``samplers.random``, ``samplers.top_k``, ``samplers.top_k_tie``,
    ``samplers.top_p``, ``samplers.top_k_top_p``, ``samplers.top_p_zero``, ``samplers.top_p_tie``,
    ``samplers.temperature``

A check needs some of the adapter's capabilities (:data:`refopt.testing.adapter.CAPABILITIES`); the
suite leaves out the checks an adapter does not support and lists them once in the report
(:class:`refopt.testing.report.Report`).  Model checks compare against refopt's float64 result with
the tolerance of the adapter's dtype and the tensor's depth, raised by the rounding noise of the
input (:mod:`refopt.testing.tolerances`, :mod:`refopt.testing.noise`).  Token-valued checks are exact,
except where the reference itself sits on a knife edge: a greedy step whose two best logits are
within the logits tolerance, or a sampler row whose filtering decision is within 1e-6 of its
threshold (random cases only; the tie cases are built exactly and always judged).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

from refopt.testing.adapter import Adapter, NotSupported, capabilities_of
from refopt.testing.cases import case_by_id, random_case, stress_specs
from refopt.testing.checks.base import FAIL, PASS, SKIP, Check, CheckResult, ensure_loaded
from refopt.testing.checks.generation import check_generation, check_incremental
from refopt.testing.checks.gradients import check_gradients
from refopt.testing.checks.model import check_activations, check_logits, locate
from refopt.testing.checks.samplers import UNIFORMS_PER_ROW, check_sampler, sampler_cases, sampler_checks
from refopt.testing.checks.tokenizer import (SPECIAL_TEXTS, TEXTS, TokenizerCase, byte_characters,
                                             byte_texts, find_tokenizer_files, tokenizer_checks)
from refopt.testing.modelcase import ModelCase, StreamingCase, case_from_preset, preset_case
from refopt.testing.report import Report, reproduce_command

__all__ = [
    "FAIL", "PASS", "SKIP", "Check", "CheckResult", "ensure_loaded", "check_generation",
    "check_incremental", "check_gradients", "check_activations", "check_logits", "locate",
    "UNIFORMS_PER_ROW", "check_sampler", "sampler_cases", "sampler_checks", "SPECIAL_TEXTS", "TEXTS",
    "TokenizerCase", "byte_characters", "byte_texts", "find_tokenizer_files", "tokenizer_checks",
    "ModelCase", "StreamingCase", "case_from_preset", "Report", "model_checks", "Suite", "build_suite",
    "run_conformance", "check_case", "random_case", "NotSupported", "Plan", "plan", "run_check",
]


def model_checks(adapter: Adapter, case) -> list[Check]:
    """Every check of one model case (unsupported ones raise :class:`NotSupported` when run)."""
    n = case.name
    return [Check("logits", f"{n}/logits", lambda: check_logits(adapter, case), ("logits",), case),
            Check("logits", f"{n}/logits.left_padding", lambda: check_logits(adapter, case, left=True),
                  ("logits", "left_padding"), case),
            Check("activations", f"{n}/activations", lambda: check_activations(adapter, case),
                  ("activations",), case),
            Check("gradients", f"{n}/gradients", lambda: check_gradients(adapter, case), ("gradients",), case),
            Check("incremental", f"{n}/incremental", lambda: check_incremental(adapter, case),
                  ("incremental",), case),
            Check("incremental", f"{n}/incremental.left_padding",
                  lambda: check_incremental(adapter, case, left=True), ("incremental", "left_padding"), case),
            Check("generation", f"{n}/generation", lambda: check_generation(adapter, case),
                  ("generation",), case)]


def check_case(adapter: Adapter, case) -> list[CheckResult]:
    """Run every model check the adapter supports on ``case`` (for your own hypothesis tests:
    ``assert not [r for r in check_case(MyAdapter(), case) if r.failed]``)."""
    return [c.run() for c in build_suite(adapter, [case], samplers=False, tokenizer_checks_=False)]


class Suite(list):
    """The checks an adapter supports, in report order; ``unsupported`` maps each capability the
    adapter lacks to the names of the checks that need it."""

    unsupported: dict


def build_suite(adapter: Adapter, cases=(), tokenizer: TokenizerCase | None = None,
                tokenizer_reason: str = "", samplers: bool = True, seed: int = 0,
                tokenizer_checks_: bool = True) -> Suite:
    """Every check the adapter supports, in report order: per model case, then the tokenizer, then
    the samplers."""
    checks: list[Check] = []
    for case in cases:
        checks += model_checks(adapter, case)
    if tokenizer_checks_:
        checks += tokenizer_checks(adapter, tokenizer, tokenizer_reason)
    if samplers:
        checks += sampler_checks(adapter, seed)
    caps = capabilities_of(adapter)
    suite = Suite(c for c in checks if set(c.needs) <= caps)
    suite.unsupported = {}
    for c in checks:
        for need in c.needs:
            if need not in caps:
                suite.unsupported.setdefault(need, []).append(c.name)
                break
    return suite


def _selected(name: str, case_id: str) -> bool:
    # "random-3" selects its checks, "random-3/gradients" that check, "samplers" the sampler family
    if "/" in case_id:
        return name == case_id
    return name == case_id or name.startswith((case_id + "/", case_id + "."))


def _select(suite: Suite, case_id: str) -> Suite:
    picked = Suite(c for c in suite if _selected(c.name, case_id))
    picked.unsupported = {cap: [n for n in names if _selected(n, case_id)]
                          for cap, names in suite.unsupported.items()}
    picked.unsupported = {k: v for k, v in picked.unsupported.items() if v}
    return picked


def adapter_spec_of(adapter, spec=None) -> str:
    """How ``refopt conform --against`` names this adapter."""
    if isinstance(spec, str):
        return spec
    return f"{type(adapter).__module__}:{type(adapter).__qualname__}"


class Plan(NamedTuple):
    """A conformance run before it runs: the adapter (loaded), the checks it supports, and what a
    failure's reproduce line needs."""

    adapter: Adapter
    suite: Suite
    spec: str
    seed: int
    tokenizer_dir: object
    extra: tuple = ()     # more arguments of the reproduce line (``--dtype float32``)


def plan(adapter, presets=(), random_configs: int = 0, tokenizer=None, samplers: bool = True,
         seed: int = 0, streaming: bool | None = None, stress: bool = True, case: str | None = None,
         spec: str | None = None) -> Plan:
    """The checks of a run (see :func:`run_conformance` for the arguments; ``spec``: how the
    reproduce lines name the adapter, default its spec string or ``module:Class``)."""
    from refopt.testing.adapter import Unavailable, load_adapter

    spec = spec or adapter_spec_of(adapter, adapter)
    try:
        adapter = load_adapter(adapter)
    except NotSupported as e:
        adapter = Unavailable(spec, str(e))
    family = getattr(adapter, "config_family", "opt")
    cases = [preset_case(p, seed, streaming) for p in presets]
    cases += [random_case(seed + i, family=family) for i in range(random_configs)]
    if stress:
        cases += [s.build(name) for name, s in stress_specs(family).items()]
    if case is not None and case.split("/")[0] not in {c.name for c in cases} \
            and not case.startswith(("samplers", "tokenizer")):
        cases.append(case_by_id(case.split("/")[0], family))
    tok_case, reason, tok_dir = None, "", None
    sources = [tokenizer] if tokenizer is not None else list(presets)
    for src in sources:
        files = find_tokenizer_files(src)
        if files is not None:
            tok_case, tok_dir = TokenizerCase(*files, seed=seed), src
            break
    if tok_case is None:
        reason = (f"no vocab.json/merges.txt in {', '.join(str(s) for s in sources)}" if sources
                  else "no tokenizer files given (pass a preset with vocab.json and merges.txt, or --tokenizer)")
    suite = build_suite(adapter, cases, tok_case, reason, samplers, seed)
    if case is not None:
        suite = _select(suite, case)
    return Plan(adapter, suite, spec, seed, tok_dir)


def run_check(check: Check, p: Plan) -> CheckResult:
    """Run one check of a plan; a failure gets the command that runs it again."""
    result = check.run()
    if result.status == FAIL and not result.reproduce:
        if check.case is not None:
            presets = [check.case.preset] if check.case.preset is not None else []
            result.reproduce = reproduce_command(p.spec, check.name, p.seed, presets, extra=p.extra)
        else:
            result.reproduce = reproduce_command(p.spec, check.name, p.seed, tokenizer=p.tokenizer_dir
                                                 if check.group == "tokenizer" else None, extra=p.extra)
    return result


def run_conformance(adapter, presets=(), random_configs: int = 0, tokenizer=None, samplers: bool = True,
                    seed: int = 0, progress: Callable[[CheckResult], None] | None = None,
                    streaming: bool | None = None, stress: bool = True, case: str | None = None) -> Report:
    """Run the whole suite.

    ==============  ==============================================================================
    adapter         an :class:`Adapter` or a spec for :func:`refopt.testing.load_adapter`
    presets         preset directories (their models; the first one's tokenizer files are used
                    when ``tokenizer`` is None)
    random_configs  how many random configs (``random-<seed>`` .. ``random-<seed+n-1>``) to add
    stress          add the fixed stress cases (:func:`refopt.testing.cases.stress_specs`)
    tokenizer       a directory with ``vocab.json`` + ``merges.txt`` (or a KerasHub preset)
    streaming       reference the presets layer by layer (:class:`StreamingCase`), for checkpoints
                    larger than memory; None: for presets of more than 20M parameters
    case            run only this case (a preset's name, ``random-N``, ``stress-*``, a case id) or
                    these checks (``samplers``, ``tokenizer.bytes``, ``random-3/gradients``)
    ==============  ==============================================================================
    """
    from refopt.testing.adapter import Unavailable

    p = plan(adapter, presets, random_configs, tokenizer, samplers, seed, streaming, stress, case)
    results = []
    for check in p.suite:
        results.append(run_check(check, p))
        if progress is not None:
            progress(results[-1])
    reason = p.adapter.reason if isinstance(p.adapter, Unavailable) else ""
    return Report(p.adapter.name, p.adapter.dtype, results, p.suite.unsupported, reason, seed)
