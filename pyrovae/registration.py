"""When pyrovae's modules announce their networks' parameters to Pyro, and when they need not.

Inside a running ``PyroModule`` method, every read of a plain ``nn.Module`` child calls
``pyro.module``: one ``param`` message per parameter, which registers it in Pyro's parameter
store and shows it to the handlers on the stack.  That is how Pyro's ``SVI`` finds what to
optimise, and how ``poutine.lift`` turns a network's weights into random variables.  A
training loop that optimises the module's parameters itself needs neither, yet the default
VAE pays 14 such messages on every step, as much host time as its forward pass at a
minibatch of 20.

:func:`parameters_owned` is the caller's statement that it optimises the program's
parameters itself.  Inside it, a :class:`LeanPyroModule` hands out its plain ``nn.Module``
children and ``nn.Parameter`` attributes directly, without the messages, as long as every
handler on Pyro's stack is one that does nothing with a module's parameters
(:func:`ignores_module_parameters`).  With any other handler on the stack (``lift``,
``substitute``, a parameter-only trace, a handler of the user's own) the messages are sent
as always.  The parameters are the same tensors either way, so the loss and its gradient
are unchanged; the messages only cost time.
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
    # a trace records the param sites, which no ELBO reads; a parameter-only trace is there
    # to find them
    TraceMessenger: lambda messenger: not messenger.param_only,
    ReplayMessenger: lambda messenger: messenger.params is None,
    # plates slice only parameters declared with an event_dim (local parameters)
    plate: _always, PlateMessenger: _always, SubsampleMessenger: _always,
    BroadcastMessenger: _always, ScaleMessenger: _always, MaskMessenger: _always,
    BlockMessenger: _always, EnumMessenger: _always, ConditionMessenger: _always,
    SeedMessenger: _always,
}


def ignores_module_parameters(messenger_type: MessengerType) -> MessengerType:
    """Declare that instances of ``messenger_type`` do nothing with a module's parameter
    messages, so that they do not make :class:`LeanPyroModule` send them.  Usable as a
    class decorator; returns the type."""
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

    Example::

        with parameters_owned():
            loss = elbo.differentiable_loss(vae.model, vae.guide, x)
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
    """

    def __getattr__(self, name: str) -> Any:
        if _parameters_owned.get():
            # nn.Module keeps children and parameters in these dicts, so plain attribute
            # lookup misses them and lands here, where PyroModule would announce them
            child = self.__dict__["_modules"].get(name)
            if child is None:
                child = self.__dict__["_parameters"].get(name)
                lean = isinstance(child, nn.Parameter) and not name.endswith("_unconstrained")
            else:
                lean = not isinstance(child, PyroModule)
            if lean and _stack_ignores_module_parameters():
                return child
        return super().__getattr__(name)
