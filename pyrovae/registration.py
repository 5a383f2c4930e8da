"""When pyrovae's modules announce their networks' parameters to Pyro, and when they need not.

Inside a running ``PyroModule`` method, every read of a plain ``nn.Module`` child calls
``pyro.module``: one ``param`` message per parameter, which registers it in Pyro's parameter
store and shows it to the handlers on the stack.  That is how Pyro's ``SVI`` finds what to
optimise, and how ``poutine.lift`` finds what to give a prior.  A training loop that computes
a differentiable loss and optimises the module's parameters itself needs neither, yet pays
for the messages on every step.

:func:`parameters_owned` is that caller's statement.  Inside it, a :class:`LeanPyroModule`
hands out its plain ``nn.Module`` children and ``nn.Parameter`` attributes directly, without
the messages, as long as every handler on Pyro's stack is one that does nothing with a
module's parameters (:func:`ignores_module_parameters`).  With any other handler on the stack
(``lift``, ``substitute``, a parameter-only trace, a handler of the user's own) the messages
are sent as always.  The parameters are the same tensors either way, so a
``differentiable_loss`` and its gradient are unchanged; the messages only cost time.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from pyro.nn import PyroModule
from pyro.poutine.block_messenger import BlockMessenger
from pyro.poutine.broadcast_messenger import BroadcastMessenger
from pyro.poutine.condition_messenger import ConditionMessenger
from pyro.poutine.enum_messenger import EnumMessenger
from pyro.poutine.escape_messenger import EscapeMessenger
from pyro.poutine.mask_messenger import MaskMessenger
from pyro.poutine.messenger import Messenger
from pyro.poutine.plate_messenger import PlateMessenger
from pyro.poutine.replay_messenger import ReplayMessenger
from pyro.poutine.runtime import _PYRO_STACK
from pyro.poutine.scale_messenger import ScaleMessenger
from pyro.poutine.seed_messenger import SeedMessenger
from pyro.poutine.subsample_messenger import SubsampleMessenger
from pyro.poutine.trace_messenger import TraceMessenger
from pyro.primitives import plate
from torch import nn

MessengerType = TypeVar("MessengerType", bound=type[Messenger])

_parameters_owned: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "pyrovae_parameters_owned", default=False)


def _always(messenger: Messenger) -> bool:
    return True


#: messenger type -> whether an instance of it does nothing with a module's parameter
#: messages (no ``event_dim``, real constraint); exact types, since a subclass may differ
_IGNORES_MODULE_PARAMETERS: dict[type, Callable[[Any], bool]] = {
    # a trace records the param sites; what reads them is the caller's business (see
    # parameters_owned); a parameter-only trace is there to find them
    TraceMessenger: lambda messenger: not messenger.param_only,
    ReplayMessenger: lambda messenger: messenger.params is None,
    # plates slice only parameters declared with an event_dim (local parameters)
    plate: _always, PlateMessenger: _always, SubsampleMessenger: _always,
    BroadcastMessenger: _always, ScaleMessenger: _always, MaskMessenger: _always,
    BlockMessenger: _always, EnumMessenger: _always, ConditionMessenger: _always,
    SeedMessenger: _always,
    # poutine.queue's, around TraceEnum_ELBO's guide: it acts on sample sites only
    EscapeMessenger: _always,
}


def ignores_module_parameters(messenger_type: MessengerType) -> MessengerType:
    """Declare that instances of ``messenger_type`` do nothing with a module's parameter
    messages, so that having one on the stack does not make :class:`LeanPyroModule` send
    them.

    :param messenger_type: a ``Messenger`` subclass; only this exact type is declared, not
        its subclasses.
    :returns: ``messenger_type``, so that it serves as a class decorator.

    Example::

        @ignores_module_parameters
        class Tempered(Messenger):  # scales sample sites, never looks at params
            ...
    """
    _IGNORES_MODULE_PARAMETERS[messenger_type] = _always
    return messenger_type


def _stack_ignores_module_parameters() -> bool:
    for messenger in _PYRO_STACK:
        check = _IGNORES_MODULE_PARAMETERS.get(type(messenger))
        if check is None or not check(messenger):
            return False
    return True


@contextlib.contextmanager
def parameters_owned() -> Iterator[None]:
    """Inside, the caller optimises the program's parameters itself (it holds them, as a
    training loop's optimizer does), so :class:`LeanPyroModule` skips the ``param``
    messages that would only re-register them, where no handler on the stack uses them.

    For a caller that takes an ELBO's ``differentiable_loss`` and backpropagates it itself,
    as :class:`~pyrovae.train.TrainingLoop` does.  Not around Pyro's ``loss_and_grads``:
    ``Trace_ELBO``, ``TraceEnum_ELBO`` and ``RenyiELBO`` call ``backward`` there only when
    their traces hold a param site, and would find none.

    Example::

        with parameters_owned():
            loss = elbo.differentiable_loss(vae.model, vae.guide, x)
        loss.backward()  # then the caller's own optimizer steps
    """
    token = _parameters_owned.set(True)
    try:
        yield
    finally:
        _parameters_owned.reset(token)


class LeanPyroModule(PyroModule):
    """A ``PyroModule`` that skips re-registering its children's parameters inside
    :func:`parameters_owned`; everywhere else it is exactly a ``PyroModule``.

    The base of pyrovae's parts (priors, likelihoods, guide families) and models.  Only
    plain ``nn.Module`` children and ``nn.Parameter`` attributes are handed out directly:
    a ``PyroModule`` child keeps its own bookkeeping, and a ``PyroParam`` or ``PyroSample``
    attribute is always a Pyro statement, since its value may come from the parameter
    store or a sample.

    Example::

        class Scaled(LeanPyroModule):  # a part like pyrovae's own
            def __init__(self) -> None:
                super().__init__()
                self.net = nn.Linear(4, 4)  # read without param messages inside fit
    """

    def __getattr__(self, name: str) -> Any:
        if _parameters_owned.get():
            # nn.Module keeps children and parameters in these dicts, so plain attribute
            # lookup misses them and lands here, where PyroModule would announce them
            # .get: on a module whose nn.Module.__init__ has not run, fall through to
            # PyroModule's own AttributeError
            child = self.__dict__.get("_modules", {}).get(name)
            if child is None:
                child = self.__dict__.get("_parameters", {}).get(name)
                lean = isinstance(child, nn.Parameter) and not name.endswith("_unconstrained")
            else:
                lean = not isinstance(child, PyroModule)
            if lean and _stack_ignores_module_parameters():
                return child
        return super().__getattr__(name)
