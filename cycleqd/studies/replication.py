"""Does a table hold still? Its conclusions on one test draw against another draw's.

A conclusion ("A better", "B better", "no difference") is read off a paired 95% interval
of A - B over one draw of test items. Another draw of the same size gives another interval,
and the conclusion may differ: a difference that is a few standard errors from zero is
"better" on some draws and "no difference" on others. :func:`compare_tables` lines up every
conclusion of two tables of the same models and says, per comparison:

- ``same``: whether both draws reach the same conclusion (a pair that differs is ``flipped``;
  it is ``reversed`` where one draw finds A better and the other B);
- ``chance_same``: the chance that a fresh draw of this size reaches the reference table's
  conclusion, if the difference is what both draws together estimate (normal approximation);
- ``items_per_task``: how many items per task a draw needs so that it reaches the pooled
  conclusion with 97.5% chance (None for a difference estimated as exactly zero).

Nothing here chooses or changes a model or a draw: it reads two finished tables.
"""
from __future__ import annotations

import math
from statistics import NormalDist
from typing import Any, Iterator, Mapping

#: the two-sided 95% normal quantile the tables' intervals are read at
Z95 = NormalDist().inv_cdf(0.975)
#: the chance a draw should repeat a conclusion for ``items_per_task``
REPEAT = 0.975


def _comparisons(table: Mapping[str, Any]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """Every (name, {mean, interval, conclusion}) a table states, named "A - B"."""
    from cycleqd.studies.table import INTERVAL_KEY, VERSUS_CYCLEQD_KEY, VERSUS_KEY

    if INTERVAL_KEY in table:
        yield "cycleqd_best - task_arithmetic", table[INTERVAL_KEY]
    for row, d in table.get(VERSUS_KEY, {}).items():
        yield f"{row} - task_arithmetic", d
    for row, d in table.get(VERSUS_CYCLEQD_KEY, {}).items():
        yield f"{row} - {d.get('rival', 'cycleqd_best')}", d


def _std_error(d: Mapping[str, Any]) -> float:
    lo, hi = d["interval"]
    return max((hi - lo) / (2 * Z95), 1e-12)


def chance_of_side(mean: float, std_error: float, side: int) -> float:
    """The chance that a draw whose estimate is N(mean, std_error^2) reads ``side`` at 95%."""
    z = mean / std_error
    better, worse = NormalDist().cdf(z - Z95), NormalDist().cdf(-z - Z95)
    return better if side > 0 else worse if side < 0 else 1.0 - better - worse


def items_needed(mean: float, std_error: float, items: int) -> int | None:
    """Items per task at which a draw reads the sign of ``mean`` with :data:`REPEAT` chance.

    ``std_error`` is one draw's at ``items`` per task; it shrinks as 1/sqrt(items).
    None where ``mean`` is zero (a tie never reads the same side twice for sure).
    """
    if mean == 0:
        return None
    z = Z95 + NormalDist().inv_cdf(REPEAT)
    return math.ceil(items * (z * std_error / abs(mean)) ** 2)


def compare_tables(reference: Mapping[str, Any], other: Mapping[str, Any]) -> dict[str, Any]:
    """Each conclusion of ``reference`` against ``other`` (two draws of the same models).

    Raises:
        ValueError: the tables were scored on different numbers of items per task, or one
            states a comparison the other lacks.
    """
    if reference.get("test_n") != other.get("test_n"):
        raise ValueError(f"the tables were scored on {reference.get('test_n')} and {other.get('test_n')} items "
                         "per task; compare draws of the same size")
    theirs = dict(_comparisons(other))
    ours = dict(_comparisons(reference))
    if set(ours) != set(theirs):
        missing = sorted(set(ours) ^ set(theirs))
        raise ValueError(f"the tables state different comparisons: {', '.join(missing)}")
    from cycleqd.studies.table import side

    n = int(reference["test_n"])
    rows = {}
    for name, a in ours.items():
        b = theirs[name]
        sa, sb = _std_error(a), _std_error(b)
        pooled = (a["mean"] / sa**2 + b["mean"] / sb**2) / (1 / sa**2 + 1 / sb**2)
        se = (sa + sb) / 2  # one draw's, at this size
        ref, now = side(a["interval"]), side(b["interval"])
        rows[name] = {"reference": a["conclusion"], "other": b["conclusion"], "same": ref == now,
                      "reversed": ref * now < 0, "pooled_mean": pooled, "chance_same": chance_of_side(pooled, se, ref),
                      "items_per_task": items_needed(pooled, se, n)}
    chance_all = math.prod(r["chance_same"] for r in rows.values())
    return {"reference_test_seed": reference.get("test_seed"), "other_test_seed": other.get("test_seed"),
            "test_n": n, "flipped": sorted(k for k, r in rows.items() if not r["same"]),
            "reversed": sorted(k for k, r in rows.items() if r["reversed"]),
            "chance_all_same": chance_all, "comparisons": rows}


def format_comparison(rep: Mapping[str, Any]) -> str:
    """The comparison as lines for a terminal."""
    lines = [f"conclusions on test seed {rep['other_test_seed']} against seed {rep['reference_test_seed']} "
             f"({rep['test_n']} items per task):"]
    for name, r in rep["comparisons"].items():
        need = "a tie" if r["items_per_task"] is None else f"{r['items_per_task']:,} items per task to hold"
        mark = "same    " if r["same"] else "REVERSED" if r["reversed"] else "FLIPPED "
        lines.append(f"  {mark} {name:42s} {r['reference']!r} -> {r['other']!r}  "
                     f"(a fresh draw repeats it with chance {r['chance_same']:.2f}; {need})")
    lines.append(f"{len(rep['flipped'])} of {len(rep['comparisons'])} conclusions differ, {len(rep['reversed'])} of them "
                 f"reversed; a fresh draw of this size repeats all of them with chance {rep['chance_all_same']:.2f}")
    return "\n".join(lines)
