"""A Pyro model and guide taken together: what :func:`~pyrovae.train.fit` and every estimator run.

pyrovae evaluates the program it is given, never a re-derivation of it.  A program is
anything with a model and a guide:

- a :class:`~pyrovae.models.VAE` (or a subclass that overrides ``model``/``guide``),
- any object with ``model`` and ``guide`` methods, such as a ``PyroModule``,
- two callables ``(model, guide)``.

The contract, read from the traces rather than assumed: the model and guide take the same
positional arguments, every one a tensor with the data points along dimension 0 (labels,
one-hot labels, masks, targets, lengths); every sample site lies in one plate over the data
points at ``dim=-1`` (of any name); sites may sit in further plates nested inside it.  Sites
of the model marked ``infer={"enumerate": "parallel"}`` and absent from the guide are summed
out exactly.  The structure is read from a trace on the arguments training (or the
estimator) calls the program with, so the first call of a lazily built guide (a Pyro
autoguide) builds it for those points.

- **The fast path.**  Estimators draw their K samples in one trace, inside a plate of K at
  the dimension left of the program's plates (``dim=-2`` for one plate): a program on it
  must broadcast over that dimension (``Normal(loc, scale)`` of ``(K, N, L)`` draws,
  networks applied to the last dimension, ``...`` indexing).  A program that does not
  (boolean-mask indexing over points and pixels, a ``view(N, -1)``) is sampled one trace
  at a time instead, with one :class:`~pyrovae.evaluation.SequentialSamplingWarning`:
  the same estimate, about K times slower.
- **Subsampled plates** (``pyro.plate("data", N, subsample_size=B)``) train as Pyro's
  ``SVI`` trains them; estimators switch subsampling off (:func:`every_point`) and score
  every point.
- **Autoguides.**  ``AutoNormal`` and an ``AutoGuideList`` of guides that keep the model's
  plates are guides with a parameter per data point: they train on the whole training set
  at every step (``batch_size`` = N, in order), and are evaluated on those points.  A
  guide that draws all points' latents as one vector (``AutoDiagonalNormal``,
  ``AutoLowRankMultivariateNormal``, ``AutoMultivariateNormal``) has no estimate per point
  and is refused in one line naming its site.

Example::

    def model(x):
        with pyro.plate("points", x.shape[0]):
            z2 = pyro.sample("z2", dist.Normal(0., 1.).expand([8]).to_event(1))
            z1 = pyro.sample("z1", dist.Normal(z2 @ A, 1.).to_event(1))
            pyro.sample("x", dist.Normal(z1 @ W, 0.1).to_event(1), obs=x)

    program = as_program((model, guide))
    log_px = log_marginal_likelihood(program, x, num_samples=1000)   # (N,) nats
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.poutine.subsample_messenger import SubsampleMessenger
from pyro.poutine.util import site_is_subsample
from torch import nn

from pyrovae.devices import first_device
from pyrovae.errors import InvalidDataError, PyrovaeError

#: the dimension every program keeps its data points in
DATA_DIM = -1


class ProgramError(PyrovaeError):
    """A model/guide pair outside what pyrovae can evaluate; the message names the site."""


@dataclass(frozen=True)
class Structure:
    """What a trace of the program shows about it.

    :ivar data_plate: the name of the plate at ``dim=-1``.
    :ivar max_plate_nesting: the number of plate dimensions, the data plate included.
    :ivar latent_sites: names of the model's unobserved sample sites, in program order.
    :ivar observed_sites: names of the model's observed sites.
    :ivar enumerated_sites: latent sites of the model summed out by enumeration.
    :ivar non_reparameterized_sites: guide sites without ``rsample``.
    :ivar guide_enumerated_sites: guide sites marked ``infer={"enumerate": "parallel"}``,
        which ``TraceEnum_ELBO`` sums over in training (importance sampling draws them).
    :ivar local_parameters: parameters with a value per point of the data plate (read in it
        with an ``event_dim``: an ``AutoNormal``'s ``locs`` and ``scales`` of a latent in it), so they
        describe the points the guide was built on, as a whole and in their order.
    """

    data_plate: str
    max_plate_nesting: int
    latent_sites: tuple[str, ...]
    observed_sites: tuple[str, ...]
    enumerated_sites: tuple[str, ...]
    non_reparameterized_sites: tuple[str, ...]
    guide_enumerated_sites: tuple[str, ...] = ()
    local_parameters: tuple[str, ...] = ()

    @property
    def enumerates(self) -> bool:
        """Whether training should sum discrete sites out (``TraceEnum_ELBO``)."""
        return bool(self.enumerated_sites or self.guide_enumerated_sites)

    def merged(self, other: Structure) -> Structure:
        """What both traces show: sites seen in either (some appear only on some points, such
        as a semi-supervised model's enumerated label on unlabelled ones)."""
        def union(first: tuple[str, ...], second: tuple[str, ...]) -> tuple[str, ...]:
            return first + tuple(name for name in second if name not in first)

        if other.data_plate != self.data_plate:
            raise ProgramError(f"the data plate is {self.data_plate!r} on some points and "
                               f"{other.data_plate!r} on others")
        return Structure(self.data_plate, max(self.max_plate_nesting, other.max_plate_nesting),
                         union(self.latent_sites, other.latent_sites),
                         union(self.observed_sites, other.observed_sites),
                         union(self.enumerated_sites, other.enumerated_sites),
                         union(self.non_reparameterized_sites, other.non_reparameterized_sites),
                         union(self.guide_enumerated_sites, other.guide_enumerated_sites),
                         union(self.local_parameters, other.local_parameters))


@dataclass
class Program:
    """A Pyro model and its guide, with the module holding their parameters if there is one.

    :param model: the generative model, ``model(*args)``.
    :param guide: the guide, ``guide(*args)``, with the same arguments.
    :param module: the ``nn.Module`` that owns the networks (a :class:`~pyrovae.models.VAE`),
        or ``None`` for plain callables whose parameters live in Pyro's parameter store.
    """

    model: Callable[..., Any]
    guide: Callable[..., Any]
    module: nn.Module | None = None
    _structure: dict[tuple[Any, ...], Structure] = field(default_factory=dict, repr=False)

    @property
    def device(self) -> torch.device:
        """Where the parameters live: the module's first tensor, else the parameter store's."""
        owned: Any = () if self.module is None else itertools.chain(self.module.parameters(),
                                                                    self.module.buffers())
        return first_device(itertools.chain(owned, pyro.get_param_store().values())) or \
            torch.device("cpu")

    def check_data(self, args: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Validate the data arguments; the module's own check (a VAE's shape, dtype and
        support checks) runs on the first one where it has one."""
        args = as_data(args)
        check = getattr(self.module, "check_data", None)
        if callable(check):
            check(args[0])
        else:
            for index, tensor in enumerate(args):
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    raise InvalidDataError(f"data argument {index} holds NaN or infinite values")
        return args

    def structure(self, *args: torch.Tensor, rows: int | None = None) -> Structure:
        """The program's :class:`Structure`, read from one trace on the first ``rows`` data
        points (``None``: all of them; cached per argument shape after the first).

        The first call of a lazily built guide (a Pyro autoguide) builds it: reading on
        the arguments it is called with, not on fewer points, keeps it what it would be."""
        if rows is None:
            rows = args[0].shape[0] if args and torch.is_tensor(args[0]) and args[0].dim() else 1
        key = (rows, *(tuple(a.shape[1:]) if torch.is_tensor(a) else type(a) for a in args))
        if key not in self._structure:
            self._structure[key] = read_structure(self.model, self.guide,
                                                  tuple(_first_rows(a, rows) for a in args))
        return self._structure[key]

    def train(self, mode: bool = True) -> None:
        """Set the training mode of every module the program holds (:meth:`modules`)."""
        for module in self.modules():
            module.train(mode)

    def modules(self) -> list[nn.Module]:
        """The ``nn.Module`` objects the program reaches: its module, and the model and guide
        where they are modules (an autoguide) or methods of one."""
        found: dict[int, nn.Module] = {}
        for owner in (self.module, self.model, self.guide,
                      getattr(self.model, "__self__", None), getattr(self.guide, "__self__", None)):
            if isinstance(owner, nn.Module):
                found.setdefault(id(owner), owner)
        return list(found.values())

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """Run the block with every module of the program in eval mode, then give each
        submodule back the mode it had: a module in training mode may add training-only
        terms (a classifier's loss on observed labels), which are no part of p(x)."""
        modes = [(module, module.training) for owner in self.modules()
                 for module in owner.modules()]
        self.train(False)
        try:
            yield
        finally:
            for module, mode in modes:
                module.training = mode


def as_program(program: Any, guide: Callable[..., Any] | None = None) -> Program:
    """Take a :class:`Program`, an object with ``model`` and ``guide``, a ``(model, guide)``
    pair, or a model with ``guide`` given separately.

    :raises ProgramError: ``program`` is none of these.
    """
    if isinstance(program, Program):
        return program
    if guide is not None:
        return Program(program, guide, program if isinstance(program, nn.Module) else None)
    if isinstance(program, tuple) and len(program) == 2 and all(map(callable, program)):
        return Program(program[0], program[1])
    model, guide = getattr(program, "model", None), getattr(program, "guide", None)
    if callable(model) and callable(guide):
        return Program(model, guide, program if isinstance(program, nn.Module) else None)
    raise ProgramError(f"{type(program).__name__} is not a program: pass an object with model and "
                       f"guide methods (a VAE, a PyroModule) or a (model, guide) pair")


def evaluates(function: Callable[..., Any]) -> Callable[..., Any]:
    """Make an estimator ``function(program, ...)`` take anything :func:`as_program` takes and
    run it with the program in eval mode (:meth:`Program.evaluating`) and its plates
    unsubsampled (:func:`every_point`)."""
    @functools.wraps(function)
    def in_eval_mode(program: Any, *args: Any, **kwargs: Any) -> Any:
        program = as_program(program)
        with program.evaluating(), every_point():
            return function(program, *args, **kwargs)

    return in_eval_mode


def as_data(data: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The program's positional data arguments as a tuple, each with the points along dim 0."""
    # a named tuple (a PackedSequence) is one argument, not a sequence of them
    single = torch.is_tensor(data) or hasattr(data, "_fields") or \
        not isinstance(data, Sequence)
    args = (data,) if single else tuple(data)
    if not args:
        raise InvalidDataError("data must be a tensor or a sequence of tensors")
    for position, argument in enumerate(args):
        if not torch.is_tensor(argument) or argument.dim() == 0:
            raise InvalidDataError(
                f"data argument {position} is a {type(argument).__name__}, not a tensor with a "
                f"value per data point along dimension 0; pass per-point tensors (pad "
                f"sequences and pass their lengths as a tensor)")
    sizes = {a.shape[0] if a.dim() else None for a in args}
    if len(sizes) != 1 or None in sizes:
        raise InvalidDataError(f"every data argument needs the same number of points along "
                               f"dimension 0, got shapes {[tuple(a.shape) for a in args]}")
    return args


def _untouched_rng() -> Any:
    """A context whose draws leave torch's random streams as they were: reading a program's
    structure must not change what the run that follows draws."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    return torch.random.fork_rng(devices=[torch.cuda.current_device()] if cuda else [])


def _first_rows(tensor: Any, count: int) -> Any:
    return tensor[:count] if torch.is_tensor(tensor) and tensor.dim() else tensor


def is_sample_site(site: dict[str, Any]) -> bool:
    """A ``pyro.sample`` statement of the program (not a plate's subsample node)."""
    return site["type"] == "sample" and not site_is_subsample(site)


def observed_site_of_size(trace: poutine.Trace, size: int, purpose: str,
                          advice: str = "") -> str:
    """The name of the one observed sample site of ``trace`` holding ``size`` values: the
    model's x, for a caller that must ``purpose`` (refused in one line naming the candidates
    when there is none or more than one).

    :param size: the number of values of x for the traced batch.
    :param advice: appended to the refusal.
    """
    observed = [name for name, site in trace.nodes.items()
                if site["type"] == "sample" and site["is_observed"]
                and site["value"].numel() == size]
    if len(observed) != 1:
        raise ProgramError(f"the program cannot {purpose}: its model has "
                           f"{len(observed) or 'no'} observed sites of x's size"
                           f"{' (' + ', '.join(observed) + ')' if observed else ''}{advice}")
    return observed[0]


def is_real_support(support: Any) -> bool:
    """Whether a site's support is the real line (of any event shape): what HMC moves on and
    what a Gaussian summary of its draws describes."""
    while isinstance(support, torch.distributions.constraints.independent):
        support = support.base_constraint
    return support is torch.distributions.constraints.real


def _plate_dims(site: dict[str, Any]) -> dict[int, str]:
    return {frame.dim: frame.name for frame in site["cond_indep_stack"]
            if frame.vectorized and frame.dim is not None}


#: the folders of the libraries a program runs through, not the program's own code
_LIBRARY_FOLDERS = tuple(Path(module.__file__).resolve().parent
                         for module in (torch, pyro, contextlib))


def _program_frame(error: BaseException) -> str:
    """`` (FILE, line N)``: the last frame of ``error``'s traceback in the program's own
    code (outside torch, Pyro, pyrovae and the standard library), or ``""``."""
    package = Path(__file__).resolve().parent
    for frame in reversed(traceback.extract_tb(error.__traceback__)):
        path = Path(frame.filename).resolve()
        if frame.filename.startswith("<") or path.is_relative_to(package) or \
                any(path.is_relative_to(folder) for folder in _LIBRARY_FOLDERS):
            continue
        return f" ({path.name}, line {frame.lineno}, in {frame.name})"
    return ""


def read_structure(model: Callable[..., Any], guide: Callable[..., Any],
                   args: tuple[Any, ...]) -> Structure:
    """Trace ``guide`` and ``model`` (replayed) once on ``args`` and read their plates and sites.

    :raises ProgramError: a sample site outside a plate at ``dim=-1``, or two names for it;
        the program raising on ``args`` (one line naming the error and the line of the
        program's code, the original error chained).
    """
    # values are not checked here: the run that follows checks (and names) bad ones
    owner = "guide"
    try:
        with torch.no_grad(), poutine.block(), _untouched_rng(), pyro.validation_enabled(False):
            guide_trace = poutine.trace(guide).get_trace(*args)
            _check_local_size(guide_trace, args)
            owner = "model"
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args)
    except PyrovaeError:
        raise
    except Exception as error:  # the user's code can fail in any way; say where in one line
        shapes = ", ".join(str(tuple(a.shape)) for a in args if torch.is_tensor(a))
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ProgramError(f"the program's {owner} failed on data of shape {shapes}"
                           f"{_program_frame(error)}: {type(error).__name__}: {message}"
                           ) from error
    data_plates: set[str] = set()
    nesting = 1
    sizes: dict[str, set[int]] = {"guide": set(), "model": set()}
    local: list[str] = []
    for owner, trace in (("guide", guide_trace), ("model", model_trace)):
        for name, site in trace.nodes.items():
            if _is_local_parameter(site) and name not in local:
                local.append(name)
            if not is_sample_site(site):
                continue
            dims = _plate_dims(site)
            if DATA_DIM not in dims:
                raise ProgramError(
                    f"sample site {name!r} of the {owner} is outside a plate over the data at "
                    f"dim=-1; put it inside one (pyro.plate(..., x.shape[0], dim=-1))"
                    + _joint_guide_hint(name, owner))
            data_plates.add(dims[DATA_DIM])
            nesting = max(nesting, -min(dims))
            sizes[owner].update(_full_size(frame) for frame in site["cond_indep_stack"]
                                if frame.vectorized and frame.dim == DATA_DIM)
    if len(data_plates) > 1:
        raise ProgramError(f"the sites use different plates at dim=-1: {sorted(data_plates)}; "
                           f"one plate over the data points is expected")
    if not data_plates:
        raise ProgramError("the model has no sample sites")
    if sizes["guide"] and sizes["model"] and sizes["guide"] != sizes["model"]:
        plate = next(iter(data_plates))
        guide_size, model_size = max(sizes["guide"]), max(sizes["model"])
        why = (f"the guide keeps parameters for each of {guide_size} points "
               f"({', '.join(local)}), so it must be called with all of them (batch_size >= "
               f"{guide_size}, the points it was built on)" if local else
               "the model and guide must draw the same points")
        raise ProgramError(f"plate {plate!r} covers {guide_size} points in the guide and "
                           f"{model_size} in the model: {why}")
    latent, observed, enumerated = [], [], []
    for name, site in model_trace.nodes.items():
        if not is_sample_site(site):
            continue
        if site["is_observed"]:
            observed.append(name)
            continue
        latent.append(name)
        if name not in guide_trace.nodes:
            if site["infer"].get("enumerate") != "parallel":
                raise ProgramError(
                    f"latent site {name!r} of the model is neither in the guide nor marked "
                    f"infer={{'enumerate': 'parallel'}} to be summed out")
            enumerated.append(name)
    guide_sites = [(name, site) for name, site in guide_trace.nodes.items()
                   if is_sample_site(site) and not site["is_observed"]]
    non_reparameterized = [name for name, site in guide_sites
                           if not getattr(site["fn"], "has_rsample", False)]
    guide_enumerated = [name for name, site in guide_sites
                        if site["infer"].get("enumerate") == "parallel"]
    return Structure(data_plates.pop(), nesting, tuple(latent), tuple(observed),
                     tuple(enumerated), tuple(non_reparameterized), tuple(guide_enumerated),
                     tuple(local))


def _local_parameters(trace: poutine.Trace) -> list[str]:
    """The parameters a trace reads inside the data plate, in order."""
    return list(dict.fromkeys(name for name, site in trace.nodes.items()
                              if _is_local_parameter(site)))


def _is_local_parameter(site: dict[str, Any]) -> bool:
    """A ``pyro.param`` with one value per point of the data plate: read inside it with an
    ``event_dim`` and a batch dimension there (what a plate subsamples, as Pyro does)."""
    if site["type"] != "param" or DATA_DIM not in _plate_dims(site):
        return False
    event_dim = site["kwargs"].get("event_dim")
    shape = getattr(site.get("value"), "shape", ())
    if event_dim is None:
        return False
    dim = DATA_DIM - event_dim
    return len(shape) >= -dim and shape[dim] != 1


def _check_local_size(guide_trace: poutine.Trace, args: tuple[Any, ...]) -> None:
    """Refuse a guide with a parameter per point called on other points than it keeps (before
    the model runs into an index error of its own)."""
    local = _local_parameters(guide_trace)
    rows = args[0].shape[0] if args and torch.is_tensor(args[0]) and args[0].dim() else None
    sizes = {_full_size(frame) for site in guide_trace.nodes.values() if is_sample_site(site)
             for frame in site["cond_indep_stack"] if frame.vectorized and frame.dim == DATA_DIM}
    if local and rows is not None and sizes and sizes != {rows}:
        raise ProgramError(f"the guide keeps parameters for each of {max(sizes)} points "
                           f"({', '.join(local)}) and is called on {rows}: call it with all of "
                           f"them (batch_size >= {max(sizes)}, the points it was built on)")


def _full_size(frame: Any) -> int:
    """The number of points a plate frame stands for (its size before subsampling)."""
    return int(getattr(frame, "full_size", None) or frame.size)


def _joint_guide_hint(name: str, owner: str) -> str:
    """A hint for a site outside the data plate drawn by an autoguide of one joint vector
    (``AutoDiagonalNormal``, ``AutoLowRankMultivariateNormal``, ...: site ``_<name>_latent``)."""
    if owner != "guide" or not (name.startswith("_") and name.endswith("_latent")):
        return ""
    return ("; this autoguide draws the latents of all points as one vector, so no estimate "
            "per data point can be read from it: use AutoNormal (one site per model site, in "
            "the model's plates), or AutoGuideList of guides that keep the plates")


@contextlib.contextmanager
def every_point() -> Iterator[None]:
    """Run the block with every ``pyro.plate`` drawing all its indices, ``subsample_size``
    ignored (so with scale 1).

    Subsampling a plate is a training device, like a site's scale: an estimate per data
    point needs every point's sites.  Pyro checks a plate's ``subsample_size`` against its
    drawn indices inside ``SubsampleMessenger._subsample``, so that one function is swapped
    for the block (not thread-safe: one estimator at a time per process)."""
    original = SubsampleMessenger.__dict__["_subsample"]

    def whole(name: str, size: int | None = None, subsample_size: int | None = None,
              subsample: torch.Tensor | None = None, use_cuda: bool | None = None,
              device: str | None = None) -> Any:
        if size is not None and subsample is None:
            subsample_size = None
        return original.__func__(name, size, subsample_size, subsample, use_cuda, device)

    SubsampleMessenger._subsample = staticmethod(whole)  # type: ignore[method-assign]
    try:
        yield
    finally:
        SubsampleMessenger._subsample = original  # type: ignore[method-assign]


def program_parameters(program: Program, *args: torch.Tensor) -> list[torch.Tensor]:
    """Every tensor the program optimises: the module's parameters and the unconstrained
    values of the ``pyro.param`` sites its model and guide reach (as Pyro's ``SVI`` finds
    them), each once."""
    with torch.no_grad(), _untouched_rng(), every_point(), \
            poutine.trace(param_only=True) as capture:
        guide_trace = poutine.trace(program.guide).get_trace(*args)
        poutine.replay(program.model, trace=guide_trace)(*args)
    found: dict[int, torch.Tensor] = {}
    if program.module is not None:
        for parameter in program.module.parameters():
            if parameter.requires_grad:
                found.setdefault(id(parameter), parameter)
    for site in capture.trace.nodes.values():
        value = site["value"].unconstrained() if hasattr(site["value"], "unconstrained") \
            else site["value"]
        if value.requires_grad:
            found.setdefault(id(value), value)
    return list(found.values())
