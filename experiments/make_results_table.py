"""Collect the experiments' ``results.json`` files into one Markdown table.

One row per trained setting: experiment, setting, epochs, our test log p(x) ± standard
error (with K), the published number and its source, the active latent units (a unit u is
active when Var_x(E_q[z_u | x]) > 0.01 over the test points, as in Burda et al. 2016's
Table 1) beside the published count, hardware, and wall time (training plus evaluation).
Only numbers found in the JSON files appear (``active_units``,
``published_active_units`` of a run); a run without one gets "—".  With ``--readme`` the
table replaces the text between the ``<!-- results table -->`` markers of that file.

Usage::

    python experiments/make_results_table.py runs/*/results.json --readme experiments/README.md
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

BEGIN = "<!-- results table: begin -->"
END = "<!-- results table: end -->"
COLUMNS = ("experiment", "setting", "epochs", "test log p(x) ± SE (K)", "test ELBO",
           "published log p(x)", "active units", "published active units", "hardware",
           "wall time")


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _singular(hardware: str) -> str:
    # files written before describe_device learnt the singular say "(1 threads)"
    return hardware.replace("(1 threads)", "(1 thread)")


def run_hardware(run: dict[str, Any], writer: str) -> str:
    """Where ``run`` trained: each machine with its epochs where its recorded training
    sessions span more than one (epochs before the record began: "unrecorded"), else
    ``writer`` (the machine that wrote the file)."""
    spans: list[list[Any]] = []  # [hardware, first epoch, last epoch], consecutive merged
    for session in run.get("training_sessions") or []:
        if spans and spans[-1][0] == session["hardware"]:
            spans[-1][2] = session["last_epoch"]
        else:
            spans.append([session["hardware"], session["first_epoch"], session["last_epoch"]])
    if len({hardware for hardware, _, _ in spans}) < 2:
        return writer
    if spans[0][1] > 1:  # the run began before the record existed
        spans.insert(0, ["unrecorded", 1, spans[0][1] - 1])
    return " + ".join(f"{_singular(hardware)} (epochs {first}–{last})"
                      for hardware, first, last in spans)


def _count(value: Any, source: str | None = None) -> str:
    if value is None:
        return "—"
    return f"{value} ({source})" if source else str(value)


def rows(results: dict[str, Any]) -> Iterable[list[str]]:
    """Table rows for one ``results.json``."""
    writer = _singular(results.get("hardware") or results.get("device") or "?")
    for run in results["runs"]:
        published = run.get("published_log_marginal_likelihood")
        source = run.get("published_source")
        wall = run["train_seconds"] + run.get("evaluation_seconds", 0.0)
        yield [
            results["experiment"],
            run["setting"],
            str(run["epochs"]),
            f"{run['test_log_marginal_likelihood']:.2f} ± "
            f"{run['test_log_marginal_likelihood_standard_error']:.2f} (K={run['eval_samples']}, "
            f"N={run['num_test_points']})",
            f"{run['test_elbo']:.2f}",
            f"{published:g} ({source})" if published is not None else "—",
            _count(run.get("active_units")),
            _count(run.get("published_active_units"), run.get("published_active_units_source")),
            run_hardware(run, writer),
            _duration(wall),
        ]


def markdown_table(paths: Sequence[Path]) -> str:
    """The Markdown table of every run in ``paths``, in the order given."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for path in paths:
        for row in rows(json.loads(Path(path).read_text())):
            lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")
    return "\n".join(lines) + "\n"


def replace_between_markers(text: str, table: str) -> str:
    """``text`` with the part between :data:`BEGIN` and :data:`END` replaced by ``table``."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"markers {BEGIN!r} ... {END!r} not found")
    return text[: start + len(BEGIN)] + "\n" + table + text[end:]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make_results_table.py",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path, help="results.json files")
    parser.add_argument("--output", type=Path, default=None, help="also write the table here")
    parser.add_argument("--readme", type=Path, default=None,
                        help="replace the table between the markers of this Markdown file")
    args = parser.parse_args(argv)
    missing = [str(path) for path in args.results if not path.is_file()]
    if missing:
        parser.error(f"not found: {', '.join(missing)}")
    table = markdown_table(args.results)
    print(table, end="")
    if args.output is not None:
        args.output.write_text(table)
    if args.readme is not None:
        try:
            args.readme.write_text(replace_between_markers(args.readme.read_text(), table))
        except ValueError as error:
            parser.error(f"{args.readme}: {error}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
