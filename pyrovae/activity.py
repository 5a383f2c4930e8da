"""Latent usage under the guide: active units, KL per dimension and the mutual information I(x; z).

These tell whether the model uses its latent space, and where: a VAE whose every unit is
inactive has collapsed (q(z|x) ignores x, the KL term is about zero, and the decoder models
the data without z).  Every quantity is read from traces of the program's guide (and model,
for the KL), per latent site, so a hierarchy gets one answer per layer.

* **Active units** (Burda et al. 2016).  Dimension u of a site is active when its posterior
  mean varies over the data:

      A_u = Cov_x( E_q[z_u | x] ) > 0.01.

  E_q[z_u | x] is the site distribution's ``mean`` averaged over S guide draws (exact for a
  site whose q does not depend on other draws), or the average of S draws where it has no
  mean (a flow); the Monte Carlo part of the variance over the data (the within-point
  variance over S) is subtracted.
* **KL per dimension**.  Where a site's q and p both factorise over its dimensions (an
  ``Independent`` of univariate distributions with a registered KL, such as the diagonal
  guide with a N(0, I) or diagonal prior), KL(q(z_u | x) || p(z_u)) in closed form by
  ``torch.distributions.kl_divergence``, averaged over the data (and over guide draws of the
  sites it is conditioned on).  Elsewhere (a full-covariance guide, a mixture or flow prior)
  the KL does not split over dimensions: only the site's total KL is given, a Monte Carlo
  mean of log q(z|x) - log p(z), with a note saying why.
* **Mutual information** I(x; z) under q(x, z) = p_data(x) q(z|x), by the Monte Carlo
  estimate of Hoffman & Johnson (2016) as used for lagging inference by He et al. (2019),
  with one draw z_n ~ q(z | x_n) per point and the aggregate posterior q(z) estimated over
  the N evaluation points:

      Î = (1/N) sum_n [ log q(z_n | x_n) - log (1/N) sum_m q(z_n | x_m) ].

  This is the InfoNCE bound with critic log q(z|x) (Poole et al. 2019): a lower bound on
  I(x; z) in expectation, never above log N, close to I when I is well below log N.  z is
  every continuous latent site of the guide together.

References:

1. Burda, Grosse, Salakhutdinov (2016). Importance Weighted Autoencoders. ICLR.
2. Hoffman, Johnson (2016). ELBO surgery: yet another way to carve up the variational
   evidence lower bound. NIPS Workshop on Advances in Approximate Bayesian Inference.
3. He, Spokoyny, Neubig, Berg-Kirkpatrick (2019). Lagging Inference Networks and Posterior
   Collapse in Variational Autoencoders. ICLR.
4. Poole, Ozair, van den Oord, Alemi, Tucker (2019). On Variational Bounds of Mutual
   Information. ICML.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyro
import torch
from pyro import poutine

from pyrovae.evaluation import particle_traces, site_log_prob, trace_log_prob
from pyrovae.programs import (
    Program,
    ProgramError,
    as_data,
    as_program,
    evaluates,
    is_real_support,
    is_sample_site,
)
from pyrovae.sites import PARTICLE_PLATE

#: the variance of a posterior mean over the data below which a unit is inactive
ACTIVE_UNIT_THRESHOLD = 0.01
#: guide draws per point for the posterior means (a flow has no closed-form mean)
MEAN_SAMPLES = 256
#: guide and model draws per point for the KL per dimension
KL_SAMPLES = 16
#: evaluation points of the aggregate posterior q(z) in the mutual information by default
MUTUAL_INFORMATION_POINTS = 1000
#: the name of the mutual-information estimator, as written to report.json
MUTUAL_INFORMATION_ESTIMATOR = ("Monte Carlo E_x E_q(z|x)[log q(z|x) - log q(z)], q(z) the "
                                "aggregate posterior over the evaluation points (Hoffman & "
                                "Johnson 2016; He et al. 2019); at most log N")


def guide_sites(program: Program, *args: torch.Tensor) -> list[str]:
    """The guide's continuous latent sites in the data plate only, in program order.

    :raises ProgramError: a continuous latent site inside a further nested plate.
    """
    nesting = program.structure(*args).max_plate_nesting
    with torch.no_grad(), pyro.plate(PARTICLE_PLATE, 1, dim=-(nesting + 1)):
        trace = poutine.trace(program.guide).get_trace(*args)
    names = []
    for name, site in trace.nodes.items():
        if not is_sample_site(site) or site["is_observed"] or not is_real_support(site["fn"].support):
            continue
        if any(size != 1 for size in site["fn"].batch_shape[1:-1]):
            raise ProgramError(f"latent usage reads sites in the data plate only; site {name!r} "
                               f"has batch shape {tuple(site['fn'].batch_shape)}")
        names.append(name)
    if not names:
        raise ProgramError("the guide has no continuous latent site")
    return names


def _flat(tensor: torch.Tensor, num_samples: int, num_points: int) -> torch.Tensor:
    """``(S, [1...], N, *event)`` to ``(S, N, L)``: the plates between are of size 1."""
    return tensor.reshape(num_samples, num_points, -1)


def _site_mean(site: dict[str, Any]) -> torch.Tensor:
    try:
        return site["fn"].mean.expand(site["value"].shape)
    except NotImplementedError:
        return site["value"]


def _batches(program: Program, x: torch.Tensor | Sequence[torch.Tensor],
             batch_size: int) -> tuple[tuple[torch.Tensor, ...], list[tuple[torch.Tensor, ...]]]:
    args = program.check_data(as_data(x))
    batches = [tuple(a[start:start + batch_size].to(program.device) for a in args)
               for start in range(0, args[0].shape[0], batch_size)]
    return args, batches


@torch.no_grad()
@evaluates
def posterior_mean_variances(program: Any, x: torch.Tensor | Sequence[torch.Tensor], *,
                             batch_size: int = 100,
                             num_samples: int = MEAN_SAMPLES) -> dict[str, torch.Tensor]:
    """Var over the data points of E_q[z_u | x], per dimension u of each latent site.

    :param program: a VAE, an object with ``model`` and ``guide``, or a ``(model, guide)`` pair.
    :param x: data ``(N, ...)`` or a tuple of the program's data arguments, ``N >= 2``.
    :param num_samples: S guide draws per point (see the module docstring).
    :returns: ``{site: (L_site,)}`` variances, float64 on the CPU, in program order.
    """
    program = as_program(program)
    args, batches = _batches(program, x, batch_size)
    if args[0].shape[0] < 2:
        raise ValueError(f"the variance over data points needs at least 2, got {args[0].shape[0]}")
    sites = guide_sites(program, *batches[0])
    nesting = program.structure(*batches[0]).max_plate_nesting
    means: dict[str, list[torch.Tensor]] = {name: [] for name in sites}
    noise: dict[str, list[torch.Tensor]] = {name: [] for name in sites}
    def draw(batch: tuple[torch.Tensor, ...], count: int) -> dict[str, torch.Tensor]:
        with pyro.plate(PARTICLE_PLATE, count, dim=-(nesting + 1)):
            trace = poutine.trace(program.guide).get_trace(*batch)
        return {name: _flat(_site_mean(trace.nodes[name]), count, batch[0].shape[0]).double().cpu()
                for name in sites}

    with pyro.validation_enabled(False):
        for batch in batches:
            draws = draw(batch, 2)
            # where two draws give the same means, no mean depends on a draw: one is exact
            if not all(torch.equal(d[0], d[1]) for d in draws.values()) and num_samples > 2:
                draws = draw(batch, num_samples)
            for name in sites:
                means[name].append(draws[name].mean(0))
                noise[name].append(draws[name].var(0) / draws[name].shape[0])
    return {name: (torch.cat(means[name]).var(0) - torch.cat(noise[name]).mean(0)).clamp(min=0)
            for name in sites}


def posterior_mean_variance(program: Any, x: torch.Tensor | Sequence[torch.Tensor], *,
                            batch_size: int = 100) -> torch.Tensor:
    """:func:`posterior_mean_variances` of every site side by side: ``(L,)`` float64."""
    return torch.cat(list(posterior_mean_variances(program, x, batch_size=batch_size).values()))


def active_units(program: Any, x: torch.Tensor | Sequence[torch.Tensor], *,
                 threshold: float = ACTIVE_UNIT_THRESHOLD) -> int:
    """The number of latent dimensions whose posterior mean varies over ``x`` by more than
    ``threshold`` (see :func:`posterior_mean_variance`); 0 means the posterior collapsed."""
    return int((posterior_mean_variance(program, x) > threshold).sum())


def _univariate(fn: Any) -> Any:
    """The univariate distribution whose batch ``fn`` reinterprets as its event, or None."""
    while isinstance(fn, torch.distributions.Independent):
        fn = fn.base_dist
    return fn if fn.event_shape == () else None


def _name(fn: Any) -> str:
    return type(fn).__name__


@dataclass(frozen=True)
class SiteKL:
    """KL(q || p) of one latent site, averaged over the data points, in nats.

    :ivar per_dimension: ``(L_site,)`` where q and p factorise over the dimensions, else None.
    :ivar total: the site's KL (the sum of ``per_dimension`` where there is one); None
        where the model sums out a discrete site, so that p(z) is a mixture over it.
    :ivar note: why there is no per-dimension KL, else None.
    """

    per_dimension: torch.Tensor | None
    total: float | None
    note: str | None


def _factor_kl(q_fn: Any, p_fn: Any) -> tuple[torch.Tensor | None, str | None]:
    """The KL of the univariate factors of ``q_fn`` and ``p_fn``, or None and why not."""
    q, p = _univariate(q_fn), _univariate(p_fn)
    if q is None or p is None:
        return None, (f"q is {_name(q_fn)} and p is {_name(p_fn)}: the KL splits over "
                      f"dimensions only where both factorise (Independent of univariate "
                      f"distributions)")
    try:
        return torch.distributions.kl_divergence(q, p), None
    except NotImplementedError:
        return None, f"no closed-form KL between {_name(q)} and {_name(p)}"


@torch.no_grad()
@evaluates
def kl_per_dimension(program: Any, x: torch.Tensor | Sequence[torch.Tensor], *,
                     batch_size: int = 100, num_samples: int = KL_SAMPLES) -> dict[str, SiteKL]:
    """KL(q(z_u | x) || p(z_u)) per dimension u of each latent site, averaged over ``x``.

    Per dimension in closed form where both the guide's and the model's distribution of a
    site factorise over its dimensions, from ``torch.distributions.kl_divergence`` of their
    univariate factors; a prior or guide that depends on other latent sites (a hierarchy) is
    averaged over ``num_samples`` guide draws of those.  Elsewhere the site's total KL only,
    the Monte Carlo mean of log q(z|x) - log p(z) over the draws.

    :param num_samples: S guide draws per point, replayed through the model.
    :returns: ``{site: SiteKL}`` in program order; nats.
    """
    program = as_program(program)
    _, batches = _batches(program, x, batch_size)
    structure = program.structure(*batches[0])
    nesting = structure.max_plate_nesting
    sites = guide_sites(program, *batches[0])
    if structure.enumerated_sites:
        note = (f"the model sums out {', '.join(structure.enumerated_sites)}: p(z) is a "
                f"mixture over it, with no KL per dimension")
        return {name: SiteKL(None, None, note) for name in sites}
    per_dimension: dict[str, torch.Tensor | None] = {}
    notes: dict[str, str | None] = {}
    totals = dict.fromkeys(sites, 0.0)
    num_points = 0
    with pyro.validation_enabled(False):
        for batch in batches:
            size = batch[0].shape[0]
            model_trace, guide_trace = particle_traces(
                program.model, program.guide, *batch, num_samples=num_samples,
                max_plate_nesting=nesting)
            num_points += size
            for name in sites:
                q_site, p_site = guide_trace.nodes[name], model_trace.nodes[name]
                kl, note = _factor_kl(q_site["fn"], p_site["fn"])
                notes.setdefault(name, note)
                if kl is not None and notes[name] is None:
                    kl = _flat(kl.expand(q_site["value"].shape), num_samples, size)
                    kl = kl.double().sum((0, 1)).cpu() / num_samples
                    previous = per_dimension.get(name)
                    per_dimension[name] = kl if previous is None else previous + kl
                    totals[name] += float(kl.sum())
                else:
                    log_ratio = (site_log_prob(q_site, nesting, False)
                                 - site_log_prob(p_site, nesting, False))
                    totals[name] += float(log_ratio.double().sum()) / num_samples
    return {name: SiteKL(per_dimension[name] / num_points if notes[name] is None else None,
                         totals[name] / num_points, notes[name]) for name in sites}


@torch.no_grad()
@evaluates
def mutual_information(program: Any, x: torch.Tensor | Sequence[torch.Tensor], *,
                       batch_size: int = 100, chunk_size: int = 250) -> float:
    """I(x; z) under q by the aggregate-posterior Monte Carlo estimate (module docstring).

    Cost: N^2 evaluations of log q(z|x), ``chunk_size`` draws by ``batch_size`` points at a
    time.

    :param x: the N evaluation points (or the program's data arguments), ``N >= 2``.
    :returns: the estimate in nats, in [0, log N] up to rounding.
    """
    program = as_program(program)
    args, batches = _batches(program, x, batch_size)
    num_points = args[0].shape[0]
    if num_points < 2:
        raise ValueError(f"the aggregate posterior needs at least 2 points, got {num_points}")
    nesting = program.structure(*batches[0]).max_plate_nesting
    sites = guide_sites(program, *batches[0])
    with pyro.validation_enabled(False):
        own, draws = [], {name: [] for name in sites}
        for batch in batches:  # z_n ~ q(z | x_n) and log q(z_n | x_n)
            with pyro.plate(PARTICLE_PLATE, 1, dim=-(nesting + 1)):
                trace = poutine.trace(program.guide).get_trace(*batch)
            own.append(trace_log_prob(_only(trace, sites), nesting, False).reshape(-1))
            for name in sites:
                value = trace.nodes[name]["value"]
                draws[name].append(value.reshape(batch[0].shape[0], *value.shape[nesting + 1:]))
        z = {name: torch.cat(values) for name, values in draws.items()}
        log_aggregate = []
        for start in range(0, num_points, chunk_size):
            count = min(chunk_size, num_points - start)
            running = None
            for batch in batches:  # log q(z_n | x_m) for this chunk of n and batch of m
                size = batch[0].shape[0]
                values = {name: _pairwise(z[name][start:start + count], size, nesting)
                          for name in sites}
                with pyro.plate(PARTICLE_PLATE, count, dim=-(nesting + 1)):
                    trace = poutine.trace(poutine.condition(program.guide, data=values)) \
                        .get_trace(*batch)
                chunk = torch.logsumexp(trace_log_prob(_only(trace, sites), nesting, False)
                                        .reshape(count, size), dim=1)
                running = chunk if running is None else torch.logaddexp(running, chunk)
            log_aggregate.append(running - math.log(num_points))
    return float((torch.cat(own) - torch.cat(log_aggregate)).double().mean())


def _only(trace: poutine.Trace, sites: Sequence[str]) -> poutine.Trace:
    """The trace's nodes of ``sites`` alone (a guide may sample discrete sites besides)."""
    kept = poutine.Trace()
    for name in sites:
        kept.add_node(name, **trace.nodes[name])
    return kept


def _pairwise(values: torch.Tensor, num_points: int, nesting: int) -> torch.Tensor:
    """``(M, *event)`` draws to ``(M, [1...], num_points, *event)``: each draw at every point."""
    event = values.shape[1:]
    shaped = values.reshape(values.shape[0], *([1] * nesting), *event)
    return shaped.expand(values.shape[0], *([1] * (nesting - 1)), num_points, *event)


@dataclass(frozen=True)
class LatentUsage:
    """Active units, KL per dimension and I(x; z) of a program on some data; see the module.

    :ivar variances: ``{site: (L_site,)}`` Var_x(E_q[z_u | x]).
    :ivar kl: ``{site: SiteKL}`` in nats.
    :ivar mutual_information: I(x; z) under q in nats (None if not computed).
    :ivar mutual_information_points: the N of its aggregate posterior.
    :ivar threshold: the variance above which a unit is active.
    """

    variances: dict[str, torch.Tensor]
    kl: dict[str, SiteKL]
    mutual_information: float | None
    mutual_information_points: int
    threshold: float = ACTIVE_UNIT_THRESHOLD

    def active(self, site: str) -> torch.Tensor:
        """``(L_site,)`` bool: which dimensions of ``site`` are active."""
        return self.variances[site] > self.threshold

    @property
    def num_active(self) -> int:
        return sum(int(self.active(site).sum()) for site in self.variances)

    @property
    def latent_dim(self) -> int:
        return sum(v.numel() for v in self.variances.values())

    def summary(self) -> dict[str, Any]:
        """Numbers for ``report.json``: per site, dimensions in their own order, and the KL
        per dimension sorted (largest first) with the order it came in."""
        sites = {}
        for name, variance in self.variances.items():
            kl = self.kl[name]
            entry: dict[str, Any] = {
                "latent_dim": variance.numel(),
                "active_units": int(self.active(name).sum()),
                "posterior_mean_variance": variance.tolist(),
                "kl_total": kl.total,
                "kl_per_dimension": None if kl.per_dimension is None else kl.per_dimension.tolist(),
                "kl_note": kl.note,
            }
            if kl.per_dimension is not None:
                order = torch.argsort(kl.per_dimension, descending=True)
                entry["kl_per_dimension_sorted"] = kl.per_dimension[order].tolist()
                entry["kl_sorted_dimensions"] = order.tolist()
            sites[name] = entry
        mi_max = (math.log(self.mutual_information_points)
                  if self.mutual_information_points > 1 else None)
        return {"threshold": self.threshold, "active_units": self.num_active,
                "latent_dim": self.latent_dim, "posterior_collapsed": self.num_active == 0,
                "kl_total": (None if any(kl.total is None for kl in self.kl.values())
                             else sum(kl.total for kl in self.kl.values() if kl.total is not None)),
                "mutual_information": self.mutual_information,
                "mutual_information_points": self.mutual_information_points,
                "mutual_information_max": mi_max,
                "mutual_information_estimator": MUTUAL_INFORMATION_ESTIMATOR,
                "sites": sites}

    def plot(self, path: str | Path) -> None:
        """Save, per site, its KL per dimension sorted (bars; active units coloured) over
        the variance of the posterior means (log scale, the threshold dashed) as a PNG."""
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt
        from matplotlib.patches import Patch
        from matplotlib.ticker import MaxNLocator

        names = list(self.variances)
        figure, axes = plt.subplots(2, len(names), figsize=(5.5 * len(names) + 1, 6.4),
                                    squeeze=False)
        for column, name in enumerate(names):
            variance, kl, active = self.variances[name], self.kl[name], self.active(name)
            key = kl.per_dimension if kl.per_dimension is not None else variance
            order = torch.argsort(key, descending=True)
            positions = range(len(order))
            colours = ["C0" if bool(active[i]) else "C7" for i in order]
            top, bottom = axes[0][column], axes[1][column]
            if kl.per_dimension is not None:
                top.bar(positions, kl.per_dimension[order].numpy(), color=colours)
                top.set_ylabel("KL(q(z_u|x) || p(z_u)) (nats)")
            else:
                top.text(0.5, 0.5, "no KL per dimension:\n" + (kl.note or ""), ha="center",
                         va="center", wrap=True, fontsize=8, transform=top.transAxes)
            total = "" if kl.total is None else f", KL {kl.total:.2f} nats"
            top.set_title(f"{name}: {int(active.sum())} of {len(order)} units active{total}")
            floor = self.threshold / 100  # inactive units' variances can be 0: drawn here
            bottom.bar(positions, variance[order].clamp(min=floor).numpy(), color=colours)
            bottom.set_yscale("log")
            bottom.set_ylim(bottom=floor)
            bottom.axhline(self.threshold, color="C3", linestyle="--",
                           label=f"active above {self.threshold}")
            bottom.set_ylabel("Var_x(E_q[z_u | x])")
            bottom.set_xlabel("latent dimension, sorted" + (" by KL" if kl.per_dimension
                                                              is not None else ""))
            for axis in (top, bottom):
                axis.xaxis.set_major_locator(MaxNLocator(integer=True))
            bottom.legend(handles=[*bottom.get_legend_handles_labels()[0],
                                   Patch(color="C0", label="active"),
                                   Patch(color="C7", label="inactive")], loc="upper right")
        if self.mutual_information is not None:
            figure.suptitle(f"I(x; z) under q: {self.mutual_information:.2f} nats "
                            f"(N={self.mutual_information_points}, at most "
                            f"{math.log(self.mutual_information_points):.2f})")
        figure.tight_layout()
        figure.savefig(path, dpi=120)
        plt.close(figure)


@evaluates
def latent_usage(program: Any, x: torch.Tensor | Sequence[torch.Tensor], *,
                 batch_size: int = 100, threshold: float = ACTIVE_UNIT_THRESHOLD,
                 mutual_information_points: int | None = MUTUAL_INFORMATION_POINTS
                 ) -> LatentUsage:
    """Active units and KL per dimension on all of ``x``; I(x; z) on its first
    ``mutual_information_points`` points (``None``: all; 0: not computed).

    :returns: a :class:`LatentUsage`.

    Example::

        usage = latent_usage(vae, x_test)
        usage.num_active, usage.summary()["sites"]["z"]["kl_per_dimension_sorted"]
    """
    program = as_program(program)
    args = as_data(x)
    variances = posterior_mean_variances(program, args, batch_size=batch_size)
    kl = kl_per_dimension(program, args, batch_size=batch_size)
    count = args[0].shape[0] if mutual_information_points is None else \
        min(mutual_information_points, args[0].shape[0])
    information = None
    if count >= 2:
        information = mutual_information(program, tuple(a[:count] for a in args),
                                         batch_size=batch_size)
    return LatentUsage(variances, kl, information, count, threshold)
