"""A marginal-likelihood report a reviewer can check: bound curve, diagnostics, provenance.

:func:`bound_curve` evaluates, on the same test points, the ELBO, the IWAE bound at
several K (nested prefixes of one set of K_max importance samples) and annealed
importance sampling, with per-point Monte Carlo errors, ESS and PSIS k-hat.
:func:`write_report` saves

* ``bounds.csv`` and ``bounds.md``: one row per estimator (mean over points, standard
  error over points, Monte Carlo error of the mean, seconds);
* ``bounds.png``: the bound against K, with the ELBO and AIS as reference lines, and
  k-hat against the AIS - IS difference per point;
* ``diagnostics.nc``: per-point estimates and diagnostics as ArviZ InferenceData (group
  ``sample_stats``, dimension ``point``), which reloads with ``arviz.from_netcdf``;
* ``report.json``: the table plus seed, Ks, AIS settings, number of points with
  k-hat > 0.7, elapsed seconds, commit, device and library versions;
* ``kl_per_dimension.png`` and ``report.json``'s ``latent_usage``: active units, the KL
  per latent dimension (sorted) and I(x; z) under q (:mod:`pyrovae.activity`).

With ``sandwich_points``, the table, figure, netCDF and JSON also hold bidirectional Monte
Carlo (:mod:`pyrovae.sandwich`) with the AIS settings: forward AIS below and reverse AIS
above log p(x) on points simulated from the model (not the test points), and their gap.

Two kinds of error are reported.  The *standard error* (std over points / sqrt(N)) is the
uncertainty of the test-set average as an estimate over the data distribution; the
*Monte Carlo error* (sqrt(sum_n se_n^2) / N) is the uncertainty due to sampling for these
fixed points, the one to use when comparing estimators on the same points.  Both hold
only where k-hat is small.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch
from tqdm.auto import tqdm

from pyrovae.activity import LatentUsage, latent_usage
from pyrovae.ais import AISResult, ais_log_marginal_likelihood
from pyrovae.diagnostics import KHAT_THRESHOLD, ImportanceSummary, importance_summary
from pyrovae.evaluation import default_chunk_size
from pyrovae.programs import ProgramError, as_data, as_program
from pyrovae.provenance import provenance
from pyrovae.rundir import TMP_SUFFIX, RunFileError, describe_os_error, file_mode, json_safe
from pyrovae.sandwich import SandwichResult, bidirectional_monte_carlo

logger = logging.getLogger(__name__)

#: the Ks of the bound curve by default
DEFAULT_KS = (1, 5, 50, 500, 5000)
#: AIS settings used when none are given (a few minutes for 200 MNIST points on 2 cores)
DEFAULT_AIS = {"num_temperatures": 200, "num_chains": 16, "num_leapfrog_steps": 5,
               "step_size": 0.05, "initial": "guide"}

TABLE_CSV = "bounds.csv"
TABLE_MARKDOWN = "bounds.md"
PLOT_NAME = "bounds.png"
NETCDF_NAME = "diagnostics.nc"
SUMMARY_NAME = "report.json"
USAGE_PLOT_NAME = "kl_per_dimension.png"
#: every file a report writes (a new report removes those of an earlier one it does not write)
REPORT_FILES = (TABLE_CSV, TABLE_MARKDOWN, PLOT_NAME, USAGE_PLOT_NAME, NETCDF_NAME, SUMMARY_NAME)
#: the table's estimators for the two bounds of bidirectional Monte Carlo
SANDWICH_LOWER, SANDWICH_UPPER = "BDMC lower", "BDMC upper"


@dataclass(frozen=True)
class BoundRow:
    """One estimator averaged over the test points, in nats.

    :ivar estimator: ``"ELBO"``, ``"IWAE"``, ``"AIS"``, or ``"BDMC lower"`` and ``"BDMC
        upper"`` (forward and reverse AIS on simulated points, not the test points).
    :ivar num_samples: K for ELBO/IWAE, the number of chains for AIS and BDMC.
    :ivar num_temperatures: T for AIS and BDMC, else None.
    :ivar mean: mean over points of the per-point estimate.
    :ivar standard_error: std over points / sqrt(N).
    :ivar monte_carlo_error: sqrt(sum_n se_n^2) / N, the sampling error for these points.
    :ivar seconds: wall time of the pass that produced it (shared by all IWAE rows).
    """

    estimator: str
    num_samples: int
    num_temperatures: int | None
    mean: float
    standard_error: float
    monte_carlo_error: float
    seconds: float

    @property
    def label(self) -> str:
        if self.estimator == SANDWICH_LOWER:
            return f"BDMC lower: AIS on simulated data (T={self.num_temperatures}, C={self.num_samples})"
        if self.estimator == SANDWICH_UPPER:
            return (f"BDMC upper: reverse AIS on simulated data (T={self.num_temperatures}, "
                    f"C={self.num_samples})")
        if self.estimator == "AIS":
            return f"AIS (T={self.num_temperatures}, C={self.num_samples})"
        if self.estimator == "IWAE":
            return f"IWAE (K={self.num_samples})"
        return f"ELBO (K={self.num_samples})"


def _row(estimator: str, num_samples: int, num_temperatures: int | None, values: torch.Tensor,
         errors: torch.Tensor, seconds: float) -> BoundRow:
    values, errors = values.double(), errors.double()
    n = values.numel()
    return BoundRow(
        estimator=estimator, num_samples=num_samples, num_temperatures=num_temperatures,
        mean=values.mean().item(),
        standard_error=values.std().item() / math.sqrt(n) if n > 1 else math.nan,
        monte_carlo_error=errors.pow(2).sum().sqrt().item() / n,
        seconds=seconds,
    )


@dataclass
class BoundCurve:
    """ELBO, IWAE_K and AIS on the same points, and optionally the sandwich on simulated
    points; see :func:`bound_curve`."""

    rows: list[BoundRow]
    importance: ImportanceSummary
    ais: AISResult | None
    seed: int | None
    ais_settings: dict[str, Any] = field(default_factory=dict)
    sandwich: SandwichResult | None = None
    usage: LatentUsage | None = None

    @property
    def num_points(self) -> int:
        return int(self.importance.elbo.numel())

    def row(self, estimator: str, num_samples: int | None = None) -> BoundRow:
        """The row of ``estimator`` (and K, for IWAE)."""
        for row in self.rows:
            if row.estimator == estimator and num_samples in (None, row.num_samples):
                return row
        raise KeyError((estimator, num_samples))

    def table(self) -> list[dict[str, Any]]:
        """The rows as dicts, ready for CSV or JSON."""
        return [{"estimator": row.estimator, "label": row.label, **{
            key: value for key, value in asdict(row).items() if key != "estimator"}}
            for row in self.rows]

    def to_markdown(self) -> str:
        header = ("| estimator | mean (nats) | standard error | Monte Carlo error | seconds |\n"
                  "|---|---:|---:|---:|---:|\n")
        lines = [f"| {row.label} | {row.mean:.3f} | {row.standard_error:.3f} | "
                 f"{row.monte_carlo_error:.3f} | {row.seconds:.1f} |" for row in self.rows]
        diagnostics = self.importance
        note = (f"\n{self.num_points} test points; standard error over points, Monte Carlo error "
                f"of the mean for these points. IWAE at K={diagnostics.num_samples[-1]}: "
                f"{diagnostics.num_unreliable} points with Pareto k-hat > "
                f"{diagnostics.khat_threshold} (unreliable), median ESS "
                f"{float(diagnostics.effective_sample_size.median()):.1f}.\n")
        if self.sandwich is not None:
            gap = self.sandwich.summary()
            note += (f"\nBDMC rows: {gap['num_points']} points simulated from the model, not the "
                     f"test points; log p(x) lies between them up to Monte Carlo error. Mean gap "
                     f"(upper - lower) {gap['gap_mean']:.3f} ± {gap['gap_standard_error']:.3f} "
                     f"nats: how far AIS with these settings can be from log p(x) on data from "
                     f"the model.\n")
        if self.usage is not None:
            usage = self.usage.summary()
            information = ("" if usage["mutual_information"] is None else
                           f"; I(x; z) under q {usage['mutual_information']:.2f} nats "
                           f"(N={usage['mutual_information_points']}, at most "
                           f"{usage['mutual_information_max']:.2f})")
            note += (f"\nLatent usage: {usage['active_units']} of {usage['latent_dim']} units "
                     f"active (Var_x E_q[z_u|x] > {usage['threshold']}){information}.\n")
        return header + "\n".join(lines) + "\n" + note

    def to_csv(self, path: str | Path | None = None) -> str:
        """The table as CSV text, also written to ``path`` if given."""
        table = self.table()
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
        if path is not None:
            Path(path).write_text(text.getvalue(), newline="")
        return text.getvalue()

    def plot(self, path: str | Path | Any) -> None:
        """Save the bound curve and the k-hat panel as a PNG (Agg backend) to a path or an
        open binary file."""
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt

        iwae = [row for row in self.rows if row.estimator == "IWAE"]
        panels = 2 if self.sandwich is None else 3
        figure, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.2))
        left, right = axes[0], axes[1]
        left.errorbar([row.num_samples for row in iwae], [row.mean for row in iwae],
                      yerr=[row.monte_carlo_error for row in iwae], marker="o", capsize=3,
                      label="IWAE$_K$")
        elbo = self.row("ELBO")
        left.axhline(elbo.mean, color="grey", linestyle="--", label="ELBO")
        if self.ais is not None:
            ais = self.row("AIS")
            left.axhline(ais.mean, color="C3", label=ais.label)
            left.axhspan(ais.mean - ais.monte_carlo_error, ais.mean + ais.monte_carlo_error,
                         color="C3", alpha=0.2)
        left.set_xscale("log")
        left.set_xlabel("K (importance samples)")
        left.set_ylabel("mean log p(x) bound (nats)")
        left.set_title(f"bounds on {self.num_points} test points (bars: Monte Carlo error)")
        left.legend(loc="lower right")

        khat = self.importance.pareto_k.numpy()
        if self.ais is not None:
            difference = (self.ais.log_marginal_likelihood
                          - self.importance.log_marginal_likelihood).numpy()
            right.scatter(np.where(np.isfinite(khat), khat, np.nan), difference, s=10)
            right.axhline(0.0, color="grey", linewidth=0.8)
            right.set_ylabel("AIS − IWAE$_{K_{max}}$ per point (nats)")
        else:
            right.hist(khat[np.isfinite(khat)], bins=30)
            right.set_ylabel("number of points")
        right.axvline(0.5, color="C2", linestyle=":", label="k = 0.5")
        right.axvline(self.importance.khat_threshold, color="C3", linestyle="--",
                      label=f"k = {self.importance.khat_threshold} (unreliable above)")
        right.set_xlabel(f"Pareto k-hat of the K={self.importance.num_samples[-1]} weights")
        right.set_title(f"{self.importance.num_unreliable} of {self.num_points} points unreliable")
        right.legend(loc="best")
        if self.sandwich is not None:
            _plot_sandwich(axes[2], self.sandwich)
        figure.tight_layout()
        figure.savefig(path, dpi=120, format="png")
        plt.close(figure)

    def to_inference_data(self, attrs: Mapping[str, Any] | None = None) -> Any:
        """Per-point results as ArviZ InferenceData (a DataTree with ArviZ >= 1).

        Group ``sample_stats``, dimension ``point`` (and ``num_samples`` for the IWAE bound,
        ``ais_chain`` for the AIS chain weights).
        """
        import xarray as xr

        summary = self.importance
        point = np.arange(self.num_points)
        variables: dict[str, tuple[tuple[str, ...], np.ndarray]] = {
            "elbo": (("point",), summary.elbo.numpy()),
            "iwae": (("num_samples", "point"), summary.iwae.numpy()),
            "iwae_standard_error": (("num_samples", "point"), summary.iwae_standard_error.numpy()),
            "log_marginal_likelihood": (("point",), summary.log_marginal_likelihood.numpy()),
            "pareto_k": (("point",), summary.pareto_k.numpy()),
            "unreliable": (("point",), summary.unreliable.numpy()),
            "effective_sample_size": (("point",), summary.effective_sample_size.numpy()),
            "log_weight_mean": (("point",), summary.log_weight_mean.numpy()),
            "log_weight_std": (("point",), summary.log_weight_std.numpy()),
            "log_weight_min": (("point",), summary.log_weight_min.numpy()),
            "log_weight_max": (("point",), summary.log_weight_max.numpy()),
        }
        if self.ais is not None:
            variables.update({
                "ais": (("point",), self.ais.log_marginal_likelihood.numpy()),
                "ais_standard_error": (("point",), self.ais.standard_error.numpy()),
                "ais_log_weights": (("ais_chain", "point"), self.ais.log_weights.numpy()),
                "ais_acceptance_rate": (("point",), self.ais.acceptance_rate.numpy()),
                "ais_step_size": (("point",), self.ais.step_size.numpy()),
            })
        coords: dict[str, Any] = {"point": point, "num_samples": list(summary.num_samples)}
        if self.sandwich is not None:
            sandwich = self.sandwich
            variables.update({
                "bdmc_lower": (("simulated_point",), sandwich.lower.numpy()),
                "bdmc_lower_standard_error": (("simulated_point",),
                                              sandwich.lower_standard_error.numpy()),
                "bdmc_upper": (("simulated_point",), sandwich.upper.numpy()),
                "bdmc_upper_standard_error": (("simulated_point",),
                                              sandwich.upper_standard_error.numpy()),
                "bdmc_reverse_log_weights": (("bdmc_chain", "simulated_point"),
                                             sandwich.reverse_log_weights.numpy()),
            })
            coords["simulated_point"] = np.arange(sandwich.num_points)
        dataset = xr.Dataset(variables, coords=coords,
                             attrs=_netcdf_attrs(attrs or {}))
        return _inference_data(sample_stats=dataset)

    def summary(self) -> dict[str, Any]:
        """Numbers for ``report.json``: table, diagnostics and the AIS - IS comparison."""
        diagnostics = self.importance
        khat = diagnostics.pareto_k
        finite = khat[torch.isfinite(khat)]
        result: dict[str, Any] = {
            "num_points": self.num_points,
            "seed": self.seed,
            "ks": list(diagnostics.num_samples),
            "bounds": self.table(),
            "diagnostics": {
                "num_samples": diagnostics.num_samples[-1],
                "khat_threshold": diagnostics.khat_threshold,
                "num_unreliable": diagnostics.num_unreliable,
                "khat_median": float(khat.median()) if len(khat) else None,
                "khat_max": float(finite.max()) if len(finite) else None,
                "num_khat_above_0.5": int((khat > 0.5).sum()),
                "effective_sample_size_median": float(diagnostics.effective_sample_size.median()),
                "effective_sample_size_min": float(diagnostics.effective_sample_size.min()),
            },
        }
        if self.ais is not None:
            difference = self.ais.log_marginal_likelihood - diagnostics.log_marginal_likelihood
            reliable = ~diagnostics.unreliable
            result["ais"] = {**self.ais_settings,
                             "acceptance_rate": float(self.ais.acceptance_rate.mean()),
                             "final_step_size_median": float(self.ais.step_size.median())}
            result["ais_minus_is"] = {
                "mean": float(difference.mean()),
                "standard_error": _standard_error(difference),
                "mean_where_reliable": float(difference[reliable].mean()) if reliable.any() else None,
                "mean_where_unreliable": (float(difference[~reliable].mean())
                                          if (~reliable).any() else None),
            }
        if self.sandwich is not None:
            result["sandwich"] = self.sandwich.summary()
        if self.usage is not None:
            result["latent_usage"] = self.usage.summary()
        return json_safe(result)


def _plot_sandwich(axis: Any, sandwich: SandwichResult) -> None:
    """Per simulated point, the gap between the two bounds (a histogram, its mean dashed)."""
    summary = sandwich.summary()
    axis.hist(sandwich.gap.numpy(), bins=min(30, max(5, sandwich.num_points // 5)), color="C4")
    axis.axvline(summary["gap_mean"], color="k", linestyle="--",
                 label=f"mean {summary['gap_mean']:.3f} nats")
    axis.axvline(0.0, color="grey", linewidth=0.8)
    axis.set_xlabel("BDMC upper − lower per simulated point (nats)")
    axis.set_ylabel("number of points")
    axis.set_title(f"sandwich on {summary['num_points']} simulated points: "
                   f"{summary['lower_mean']:.2f} ≤ log p(x) ≤ {summary['upper_mean']:.2f}",
                   fontsize=9)
    axis.legend(loc="best")


def _standard_error(values: torch.Tensor) -> float:
    return float(values.std() / math.sqrt(values.numel())) if values.numel() > 1 else math.nan


def _netcdf_attrs(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """netCDF attributes hold strings and numbers only: the rest goes in as JSON text."""
    # str(value): subclasses of str (torch.__version__) would reach h5py as numpy unicode
    return {key: str(value) if isinstance(value, str) else value
            if isinstance(value, int | float) and not isinstance(value, bool)
            else json.dumps(json_safe(value)) for key, value in attrs.items()}


def _inference_data(**groups: Any) -> Any:
    import arviz

    if hasattr(arviz, "InferenceData"):
        return arviz.InferenceData(**groups)
    import xarray as xr  # pragma: no cover - ArviZ >= 1 stores groups in a DataTree

    return xr.DataTree.from_dict(groups)  # pragma: no cover


def bound_curve(vae: Any, x: torch.Tensor | Sequence[torch.Tensor], ks: Sequence[int] = DEFAULT_KS, *,
                ais_kwargs: Mapping[str, Any] | None = None, ais: bool = True,
                batch_size: int = 100, chunk_size: int | None = None, seed: int | None = None,
                khat_threshold: float = KHAT_THRESHOLD, sandwich_points: int = 0,
                progress: bool = False) -> BoundCurve:
    """ELBO, IWAE_K for each K in ``ks``, and AIS, on the same points, in nats.

    The IWAE bounds use nested prefixes of one set of max(ks) importance samples per point,
    so they rise with K up to noise in the weights only; the ELBO row is the mean of all
    max(ks) log weights.  With ``seed`` the RNG is seeded before the importance pass and
    again before AIS, so each is reproducible on its own.

    :param vae: the program: a :class:`~pyrovae.models.VAE`, an object with ``model`` and
        ``guide``, or a ``(model, guide)`` pair.
    :param x: test data ``(N, D)``.
    :param ks: numbers of importance samples.
    :param ais_kwargs: keyword arguments of
        :func:`~pyrovae.ais.ais_log_marginal_likelihood`, over :data:`DEFAULT_AIS`.
    :param ais: run AIS at all.
    :param batch_size: data points per vectorized trace.
    :param chunk_size: importance samples per vectorized trace (``None``: the device's default).
    :param seed: seed for both passes; None leaves the RNG as it is.
    :param khat_threshold: k-hat above which a point is flagged unreliable.
    :param sandwich_points: simulate this many points from the model (``x``'s first rows as
        the template) and sandwich their log p(x) by forward and reverse AIS with the AIS
        settings (:func:`~pyrovae.sandwich.bidirectional_monte_carlo`); 0: no sandwich.
    :param progress: show a progress bar over the batches of each pass (the draws are those
        of one pass over all points).
    :returns: a :class:`BoundCurve`.

    Example::

        curve = bound_curve(vae, x_test[:200], ks=(1, 5, 50, 500, 5000),
                            ais_kwargs={"num_temperatures": 500})
        print(curve.to_markdown())
    """
    if seed is not None:
        pyro.set_rng_seed(seed)
    started = time.perf_counter()
    args = as_data(x)
    k_max = max(ks)
    # batch by batch, as importance_summary goes: the same draws, with a bar between batches
    summary = _join_importance([
        importance_summary(vae, batch, ks, batch_size=batch_size, chunk_size=chunk_size,
                           khat_threshold=khat_threshold)
        for batch in tqdm(list(zip(*(a.split(batch_size) for a in args), strict=True)),
                          disable=not progress, unit="batch", dynamic_ncols=True,
                          desc=f"IWAE bounds, K up to {k_max}")])
    is_seconds = time.perf_counter() - started
    k_max = summary.num_samples[-1]
    elbo_error = summary.log_weight_std / math.sqrt(k_max)
    rows = [_row("ELBO", k_max, None, summary.elbo, elbo_error, is_seconds)]
    rows += [_row("IWAE", k, None, summary.iwae[i], summary.iwae_standard_error[i], is_seconds)
             for i, k in enumerate(summary.num_samples)]
    num_points = args[0].shape[0]
    logger.info("importance sampling with K=%d on %d points: %.1f s", k_max, num_points,
                is_seconds)
    result: AISResult | None = None
    settings: dict[str, Any] = {}
    if ais:
        settings = {**DEFAULT_AIS, **(ais_kwargs or {})}
        settings.setdefault("batch_size", batch_size)
        if seed is not None:
            pyro.set_rng_seed(seed)
        started = time.perf_counter()
        num_batches = -(-args[0].shape[0] // settings["batch_size"])
        result = _join_ais([
            ais_log_marginal_likelihood(vae, x, **settings, batches=[index])
            for index in tqdm(range(num_batches), disable=not progress, unit="batch",
                              dynamic_ncols=True,
                              desc=f"AIS, T={settings['num_temperatures']}")])
        ais_seconds = time.perf_counter() - started
        rows.append(_row("AIS", result.num_chains, result.num_temperatures,
                         result.log_marginal_likelihood, result.standard_error, ais_seconds))
        logger.info("AIS with T=%d, C=%d on %d points: %.1f s", result.num_temperatures,
                    result.num_chains, num_points, ais_seconds)
    sandwich = None
    if sandwich_points:
        if not ais:
            raise ValueError("the sandwich runs with the AIS settings: it needs ais=True")
        started = time.perf_counter()
        sandwich = bidirectional_monte_carlo(vae, x, sandwich_points, **settings, seed=seed)
        sandwich_seconds = time.perf_counter() - started
        for estimator, values, errors in (
                (SANDWICH_LOWER, sandwich.lower, sandwich.lower_standard_error),
                (SANDWICH_UPPER, sandwich.upper, sandwich.upper_standard_error)):
            rows.append(_row(estimator, sandwich.forward.num_chains,
                             sandwich.forward.num_temperatures, values, errors, sandwich_seconds))
        logger.info("sandwich on %d simulated points: %.1f s", sandwich_points, sandwich_seconds)
    return BoundCurve(rows=rows, importance=summary, ais=result, seed=seed, ais_settings=settings,
                      sandwich=sandwich)


def _join_importance(parts: Sequence[ImportanceSummary]) -> ImportanceSummary:
    """The summaries of consecutive batches as one, points in order."""
    tensors = {name: torch.cat([getattr(part, name) for part in parts], dim=-1)
               for name, value in vars(parts[0]).items() if isinstance(value, torch.Tensor)}
    return replace(parts[0], **tensors)


def _join_ais(parts: Sequence[AISResult]) -> AISResult:
    """The AIS results of consecutive batches as one, points in order."""
    tensors = {name: torch.cat([getattr(part, name) for part in parts],
                               dim=1 if name == "samples" else -1)
               for name, value in vars(parts[0]).items() if isinstance(value, torch.Tensor)}
    return replace(parts[0], **tensors)


def save_inference_data(data: Any, path: str | Path) -> None:
    """Write InferenceData (or an ArviZ >= 1 DataTree) to netCDF with the h5netcdf engine."""
    data.to_netcdf(str(path), engine="h5netcdf")


def build_report(vae: Any, x: torch.Tensor | Sequence[torch.Tensor], *,
                 ks: Sequence[int] = DEFAULT_KS, ais_kwargs: Mapping[str, Any] | None = None,
                 ais: bool = True, batch_size: int = 100, chunk_size: int | None = None,
                 seed: int = 0, extra: Mapping[str, Any] | None = None,
                 sandwich_points: int = 0, usage: bool = True,
                 progress: bool = False) -> tuple[BoundCurve, dict[str, Any]]:
    """Run :func:`bound_curve` (and the latent usage): the curve and the contents of
    ``report.json``; :func:`save_report` writes them.  Parameters as :func:`write_report`."""
    started = time.perf_counter()
    curve = bound_curve(vae, x, ks, ais_kwargs=ais_kwargs, ais=ais, batch_size=batch_size,
                        chunk_size=chunk_size, seed=seed, sandwich_points=sandwich_points,
                        progress=progress)
    usage_error = None
    if usage:
        pyro.set_rng_seed(seed)
        try:
            curve.usage = latent_usage(vae, x, batch_size=batch_size)
        except ProgramError as error:
            usage_error = str(error)
            logger.warning("no latent usage in the report: %s", error)
    summary = curve.summary()
    if usage_error is not None:
        summary["latent_usage"] = {"error": usage_error}
    if chunk_size is None:
        chunk_size = default_chunk_size(batch_size, as_program(vae).device)
    summary.update({"batch_size": batch_size, "chunk_size": chunk_size,
                    "elapsed_seconds": time.perf_counter() - started})
    summary.update(extra or {})
    summary.update(provenance(as_program(vae).device))
    summary["arviz"] = _arviz_version()
    return curve, summary


def save_report(curve: BoundCurve, summary: Mapping[str, Any], output_dir: str | Path) -> None:
    """Write :func:`build_report`'s table, figures, netCDF and JSON into ``output_dir``
    (created if missing).

    Every file goes to a temporary beside its name first; only once all are written are
    they renamed into place, and the files of an earlier report that this one does not
    write are removed.  A failed write (a full disk, a file-size limit) leaves the earlier
    report as it was and no temporary behind.

    :raises RunFileError: naming the folder and the reason.
    """
    output_dir = Path(output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RunFileError(f"cannot write the report into {output_dir}: "
                           f"{describe_os_error(error)}") from None
    attrs = {key: value for key, value in summary.items() if key not in ("bounds", "diagnostics")}
    writers: dict[str, Callable[[Path], None]] = {
        TABLE_CSV: lambda path: path.write_text(curve.to_csv(), newline=""),
        TABLE_MARKDOWN: lambda path: path.write_text(curve.to_markdown()),
        PLOT_NAME: lambda path: _write_binary(path, curve.plot),
    }
    if curve.usage is not None:
        usage = curve.usage
        writers[USAGE_PLOT_NAME] = lambda path: _write_binary(path, usage.plot)
    writers[NETCDF_NAME] = lambda path: save_inference_data(
        curve.to_inference_data(attrs=attrs), path)
    writers[SUMMARY_NAME] = lambda path: path.write_text(
        json.dumps(json_safe(dict(summary)), indent=2) + "\n")
    _write_all(output_dir, writers)


def _write_binary(path: Path, write: Callable[[Any], None]) -> None:
    with open(path, "wb") as handle:
        write(handle)


def _write_all(output_dir: Path, writers: Mapping[str, Callable[[Path], None]]) -> None:
    """Write every file of ``writers`` (name -> writer of a path) to a temporary in
    ``output_dir``, then rename them all into place, then remove the other
    :data:`REPORT_FILES` there."""
    temporaries: dict[str, Path] = {}
    try:
        for name, write in writers.items():
            handle, tmp_name = tempfile.mkstemp(prefix=name + ".", suffix=TMP_SUFFIX,
                                                dir=output_dir)
            os.fchmod(handle, file_mode(output_dir / name))
            os.close(handle)
            temporaries[name] = Path(tmp_name)
            write(temporaries[name])
            with open(tmp_name, "rb") as written:
                os.fsync(written.fileno())
        for name, tmp in temporaries.items():
            os.replace(tmp, output_dir / name)
        for name in set(REPORT_FILES) - set(writers):
            (output_dir / name).unlink(missing_ok=True)
    except OSError as error:
        raise RunFileError(f"cannot write the report into {output_dir}: "
                           f"{describe_os_error(error)}; an earlier report there is unchanged") \
            from None
    finally:
        for tmp in temporaries.values():
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)


def write_report(vae: Any, x: torch.Tensor | Sequence[torch.Tensor], output_dir: str | Path, *,
                 ks: Sequence[int] = DEFAULT_KS, ais_kwargs: Mapping[str, Any] | None = None,
                 ais: bool = True, batch_size: int = 100, chunk_size: int | None = None,
                 seed: int = 0,
                 extra: Mapping[str, Any] | None = None, sandwich_points: int = 0,
                 usage: bool = True, progress: bool = False) -> dict[str, Any]:
    """Run :func:`bound_curve` and write the table, plot, netCDF and JSON into ``output_dir``
    (:func:`save_report`: all or nothing).

    :param extra: more entries for ``report.json`` (e.g. the checkpoint path).
    :param sandwich_points: see :func:`bound_curve`.
    :param usage: add the latent usage (:func:`~pyrovae.activity.latent_usage`) on ``x``
        and its figure; a program it cannot read (no continuous latent site in the data
        plate) gets the reason in ``report.json`` instead.
    :param progress: a progress bar for each pass (:func:`bound_curve`).
    :returns: the contents of ``report.json``.
    """
    curve, summary = build_report(vae, x, ks=ks, ais_kwargs=ais_kwargs, ais=ais,
                                  batch_size=batch_size, chunk_size=chunk_size, seed=seed,
                                  extra=extra, sandwich_points=sandwich_points, usage=usage,
                                  progress=progress)
    save_report(curve, summary, output_dir)
    return summary


def _arviz_version() -> str:
    import arviz

    return arviz.__version__
