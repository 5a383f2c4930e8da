"""One record per training epoch, and ``metrics.csv``, the file that holds them.

ELBOs and log p(x) are per data point, in nats.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

from pyrovae.rundir import write_text

METRICS_NAME = "metrics.csv"
METRIC_COLUMNS = ("epoch", "step", "train_elbo", "test_elbo", "epoch_seconds", "valid_elbo",
                  "test_log_px")
#: the columns of metrics.csv where the latent usage is counted (``activity_every``); a
#: hierarchy also gets ``active_units_<site>`` for each latent site, after ``active_units``
ACTIVITY_COLUMNS = ("active_units", "mutual_information")
_SITE_COLUMN = "active_units_"


@dataclass
class EpochRecord:
    """One line of ``metrics.csv``; ELBOs and log p(x) per data point in nats (NaN where not
    computed).  ``test_log_px`` is the importance-sampled estimate on the first
    ``log_px_size`` test points (:class:`~pyrovae.train.FitOptions`' ``log_px_every``);
    ``active_units`` (of all latent sites together), ``active_units_per_site``
    (``{site: count}``) and ``mutual_information`` (I(x; z) under q, nats) are the latent
    usage on the same points (``activity_every``, :mod:`pyrovae.activity`).
    ``stopped_early`` marks the epoch after which early stopping ended the run (kept in the
    checkpoint's history, not in ``metrics.csv``)."""

    epoch: int
    step: int
    train_elbo: float
    test_elbo: float
    epoch_seconds: float
    valid_elbo: float = math.nan
    test_log_px: float = math.nan
    active_units: float = math.nan
    mutual_information: float = math.nan
    active_units_per_site: dict[str, int] | None = None
    stopped_early: bool = False


def _metric_columns(records: list[EpochRecord],
                    activity_sites: list[str] | None) -> tuple[str, ...]:
    """:data:`METRIC_COLUMNS`, and the activity columns where the loop counts the latent
    usage or an earlier session of the run did."""
    if activity_sites is None:
        activity_sites = next((list(record.active_units_per_site) for record in records
                               if record.active_units_per_site), None)
    if activity_sites is None:
        return METRIC_COLUMNS
    sites = tuple(_SITE_COLUMN + site for site in activity_sites) if len(activity_sites) > 1 \
        else ()
    return (*METRIC_COLUMNS, ACTIVITY_COLUMNS[0], *sites, ACTIVITY_COLUMNS[1])


def _cell(record: EpochRecord, column: str) -> object:
    if column == "active_units":
        return int(record.active_units) if math.isfinite(record.active_units) else math.nan
    if column.startswith(_SITE_COLUMN):
        return (record.active_units_per_site or {}).get(column[len(_SITE_COLUMN):], math.nan)
    return getattr(record, column)


def write_metrics(path: Path, records: list[EpochRecord],
                  activity_sites: list[str] | None = None) -> None:
    """Write ``metrics.csv`` with every record, atomically (rewritten whole each epoch, so a
    kill never leaves half a row); with ``activity_sites``, the latent usage columns too
    (NaN on the epochs that did not count it)."""
    columns = _metric_columns(records, activity_sites)
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(columns)
    for record in records:
        writer.writerow([_cell(record, column) for column in columns])
    write_text(path, text.getvalue())


def _number(row: dict[str, str], column: str) -> float:
    return float(row.get(column) or math.nan)


def read_metrics(path: str | Path) -> list[EpochRecord]:
    """Read ``metrics.csv`` back into records (a column the file lacks reads as NaN)."""
    with Path(path).open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    records = []
    for row in rows:
        per_site = {column[len(_SITE_COLUMN):]: int(float(value)) for column, value in row.items()
                    if column.startswith(_SITE_COLUMN) and value and value != "nan"}
        records.append(EpochRecord(
            int(row["epoch"]), int(row["step"]), float(row["train_elbo"]),
            float(row["test_elbo"]), float(row["epoch_seconds"]), _number(row, "valid_elbo"),
            _number(row, "test_log_px"), _number(row, "active_units"),
            _number(row, "mutual_information"), per_site or None))
    return records
