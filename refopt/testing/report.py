"""The report of a conformance run: a table (``refopt conform``) or JSON, what was not compared and
why, and for each failure the seed and a command that runs it again."""

from __future__ import annotations

import dataclasses
import json
import math
import shlex

import numpy as np

from refopt.testing.checks.base import FAIL, PASS, SKIP


def reproduce_command(adapter_spec: str, case_id: str, seed: int, presets=(), tokenizer=None,
                      extra=()) -> str:
    """``refopt conform`` running one case (or one sampler / tokenizer check) again."""
    parts = ["refopt", "conform", "--against", adapter_spec, *extra, *map(str, presets), "--seed", str(seed),
             "--case", case_id]
    if tokenizer is not None:
        parts += ["--tokenizer", str(tokenizer)]
    return " ".join(shlex.quote(p) for p in parts)


@dataclasses.dataclass
class Report:
    adapter: str
    dtype: str
    results: list
    unsupported: dict = dataclasses.field(default_factory=dict)   # capability -> [check names]
    reason: str = ""      # why the adapter could run nothing at all (e.g. its library is missing)
    seed: int = 0

    @property
    def failed(self) -> list:
        return [r for r in self.results if r.status == FAIL]

    @property
    def compared(self) -> int:
        """How many checks compared something (passed or failed)."""
        return sum(r.status in (PASS, FAIL) for r in self.results)

    @property
    def passed(self) -> bool:
        return not self.failed

    def nothing_compared(self) -> str:
        """Why no check compared anything ("" when some did)."""
        if self.compared:
            return ""
        if self.reason:
            return self.reason
        reasons = sorted({r.detail.removeprefix("skipped: ") for r in self.results if r.status == SKIP})
        if self.unsupported:
            reasons.append(f"the adapter supports none of: {', '.join(self.unsupported)}")
        return "; ".join(reasons) or "no checks were selected"

    def to_json(self) -> str:
        return json.dumps({"adapter": self.adapter, "dtype": self.dtype, "passed": self.passed,
                           "seed": self.seed, "compared": self.compared,
                           "nothing_compared": self.nothing_compared(),
                           "unsupported": self.unsupported,
                           "checks": [r.to_dict() for r in self.results]}, indent=1, default=_json_default)

    def table(self, width: int = 110) -> str:
        against = ("float64 reference" if self.dtype not in ("bfloat16", "float16") else
                   f"{self.dtype} reference (KerasHub's rounding; gradients and generation against float64)")
        lines = [f"refopt conform: {self.adapter} ({self.dtype}) against refopt's {against}, "
                 f"seed {self.seed}", ""]
        rows = _merge_skips(self.results)
        name_w = min(max([len(name) for name, _, _ in rows] + [5]), 46)
        lines.append(f"{'check':<{name_w}}  {'result':<6}  figures")
        lines.append("-" * min(width, name_w + 80))
        for name, status, r in rows:
            lines.append(f"{name:<{name_w}}  {status:<6}  {r.figures if name == r.name else ''}")
            if status == FAIL and r.detail:
                lines.append(f"{'':<{name_w}}  {'':<6}  -> {r.detail}")
            if status == FAIL and r.reproduce:
                lines.append(f"{'':<{name_w}}  {'':<6}  reproduce: {r.reproduce}")
            if status == SKIP and name != r.name:
                lines.append(f"{'':<{name_w}}  {'':<6}  {r.detail.removeprefix('skipped: ')}")
        counts = {s: sum(r.status == s for r in self.results) for s in (PASS, FAIL, SKIP)}
        lines.append("")
        lines.append(f"{counts[PASS]} passed, {counts[FAIL]} failed, {counts[SKIP]} skipped")
        if self.unsupported:
            listed = ", ".join(f"{cap} ({len(names)} check{'s' if len(names) > 1 else ''})"
                               for cap, names in self.unsupported.items())
            lines.append(f"not supported by the adapter, not run: {listed}")
        skipped = [r for r in self.results if r.status == SKIP]
        if skipped:
            reasons: dict = {}
            for r in skipped:
                reasons.setdefault(r.detail.removeprefix("skipped: "), []).append(r.name)
            lines.append("skipped:")
            for reason, names in reasons.items():
                shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
                lines.append(f"  {shown}: {reason}")
        why = self.nothing_compared()
        if why:
            lines.append(f"NOTHING WAS COMPARED: {why}")
        return "\n".join(lines)


def _merge_skips(results):
    """Table rows ``(name, status, result)``: a model case whose every check was skipped for one
    reason (a config the adapter does not build) is one row ``case/*``."""
    rows, i = [], 0
    while i < len(results):
        r = results[i]
        case = r.name.split("/")[0] if "/" in r.name else None
        j = i
        first = case is not None and (i == 0 or not results[i - 1].name.startswith(case + "/"))
        if first and r.status == SKIP:
            while (j + 1 < len(results) and results[j + 1].name.startswith(case + "/")
                   and results[j + 1].status == SKIP and results[j + 1].detail == r.detail):
                j += 1
        if j > i and (j + 1 == len(results) or not results[j + 1].name.startswith(case + "/")):
            rows.append((f"{case}/*", SKIP, r))
            i = j + 1
            continue
        rows.append((r.name, r.status, r))
        i += 1
    return rows


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating, float)):
        return float(o) if math.isfinite(o) else str(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)
