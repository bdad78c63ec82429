"""Results table: one ``Row`` per configuration, each metric with a ratio column against a baseline row.

Also the end of every report: the CPU share other processes took (``print_other_cpu``) and
the dated JSON document (``write_dated_json``).  Standard library only.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

OTHER_CPU_WARN_FRACTION = 0.10
"""Above this share of the machine taken by other processes, a run's numbers are not trustworthy."""


@dataclasses.dataclass
class Row:
    """One configuration in the results table; ``values`` maps metric name -> number."""

    name: str
    values: Mapping[str, float | None]
    note: str = ""


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def print_table(rows: Sequence[Row], baseline_name: str, metrics: Sequence[str] | None = None) -> None:
    """Print a plain-text table; each metric gets a ``x<baseline>`` ratio column.

    Ratio = value / baseline value from the same run (so >1 is better for
    MB/s and worse for ms, s, MB and CPU per unit of work).  Metric columns default to the union of
    keys in row order.  Notes (e.g. negotiated kex) are printed under the table.
    """
    base = next((r for r in rows if r.name == baseline_name), None)
    if base is None:
        raise ValueError(f"baseline {baseline_name!r} not among rows {[r.name for r in rows]}")
    if metrics is None:
        metrics = []
        for r in rows:
            metrics += [k for k in r.values if k not in metrics]
    header = ["config"]
    for m in metrics:
        header += [m, "ratio"]
    table = [header]
    for r in rows:
        line = [r.name]
        for m in metrics:
            v = r.values.get(m)
            b = base.values.get(m)
            line.append(_fmt(v))
            line.append(f"{v / b:.2f}x" if v is not None and b else "-")
        table.append(line)
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for j, row in enumerate(table):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        print("  ".join(cells))
        if j == 0:
            print("  ".join("-" * w for w in widths))
    print(f"ratio = value / value of '{baseline_name}' in this run")
    for r in rows:
        if r.note:
            print(f"  {r.name}: {r.note}")


def print_other_cpu(fraction: float) -> None:
    """Print the share of the machine other processes used during the run, so a disturbed run is recognisable."""
    print(f"CPU used by other processes during the run: {fraction:.0%} of the machine")
    if fraction > OTHER_CPU_WARN_FRACTION:
        print("WARNING: other processes competed for the CPU; rerun on an idle machine for real numbers")


def write_dated_json(path: Path, doc: Mapping[str, Any]) -> None:
    """Write ``doc`` as indented JSON led by the run's UTC ``date``, so saved results can be ordered."""
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    path.write_text(json.dumps({"date": date, **doc}, indent=2))
