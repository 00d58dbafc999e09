"""The closing step every `bench/` script shares: run the measurement, note the machine's 1-minute
load average before and after it (BENCHMARKS.md quotes a number only with the load beside it),
print the result as JSON and write it to ``--json`` when given."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path


def run_and_report(measure: Callable[[], dict], json_path: Path | None) -> dict:
    """`measure()`'s result with ``load_average_1m_before`` / ``_after``, printed (and written)."""
    before = round(os.getloadavg()[0], 2)
    result = measure()
    result["load_average_1m_before"] = before
    result["load_average_1m_after"] = round(os.getloadavg()[0], 2)
    text = json.dumps(result, indent=2)
    print(text)
    if json_path:
        json_path.write_text(text)
    return result
