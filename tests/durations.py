"""Write ``tests/durations.json`` (seconds per unit of work: a test file, the vLLM files together) from a
JUnit XML report: ``make test`` with ``--junitxml=report.xml``, then ``python tests/durations.py report.xml``.
``make test`` hands the longest units to its workers first (see ``conftest.py``)."""
from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from conftest import unit

HERE = Path(__file__).parent


def durations(report: Path) -> dict[str, float]:
    """{file or group: seconds} of the report's test cases (a case's file from its class name)."""
    out: dict[str, float] = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        parts = [p for p in case.get("classname", "").split(".") if not p[:1].isupper()]  # drop a test class
        u = unit("/".join(parts) + ".py")
        out[u] = out.get(u, 0.0) + float(case.get("time", 0))
    return {k: round(v, 1) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}


if __name__ == "__main__":
    (HERE / "durations.json").write_text(json.dumps(durations(Path(sys.argv[1])), indent=1) + "\n")
