"""Optional ``torch.compile`` of a program's networks, leaving the Pyro program eager.

Pyro's handlers (tracing, replay, plates, enumeration) run Python at every sample site, and
``torch.compile`` would break its graph at each of them; the networks between the sites are
plain tensor code that it compiles whole.  :func:`compile_networks` therefore compiles, in
place, every largest submodule of a program's module that holds parameters and no
``PyroModule`` (the encoders, decoders and heads; not priors or likelihoods whose
``pyro.param``/``PyroParam`` attributes go through Pyro).  ``nn.Module.compile`` keeps the
module's ``state_dict`` keys (no ``_orig_mod.`` prefix), so checkpoints written with and
without compilation load into each other.

The values are those of the eager networks up to floating-point reassociation; whether it is
faster depends on the device and the batch (on a GPU, ``mode="reduce-overhead"`` replays CUDA
graphs; on a CPU the compile time can outweigh what it saves), so it is off by default.
"""

from __future__ import annotations

from typing import Any

from pyro.nn import PyroModule
from torch import nn

#: ``torch.compile`` modes a run may ask for (``--compile MODE``)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


def _is_pyro(module: nn.Module) -> bool:
    return any(isinstance(part, PyroModule) for part in module.modules())


def _called_as_a_module(module: nn.Module) -> bool:
    """Whether calling ``module`` runs ``nn.Module.__call__`` into its own ``forward``: what
    ``nn.Module.compile`` replaces.  Containers (``ModuleList``, ``ModuleDict``) are never
    called; Pyro's transforms (flows) are called through ``Transform.__call__`` or
    ``.condition(...)``, so their compiled forward would never run."""
    return (type(module).__call__ is nn.Module.__call__
            and type(module).forward is not nn.Module.forward
            and not isinstance(module, (nn.ModuleList, nn.ModuleDict)))


def compilable_networks(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The largest submodules of ``module`` (never ``module`` itself, whose ``model`` and
    ``guide`` are what run) that hold parameters and no ``PyroModule`` and are called as
    modules (inside a flow, its networks; inside a container, its members), as
    ``(qualified name, module)`` in registration order."""
    found: list[tuple[str, nn.Module]] = []

    def visit(prefix: str, part: nn.Module) -> None:
        if prefix and not _is_pyro(part) and _called_as_a_module(part):
            if any(True for _ in part.parameters()):
                found.append((prefix, part))
            return
        for name, child in part.named_children():
            visit(f"{prefix}.{name}" if prefix else name, child)

    visit("", module)
    return found


def compile_networks(module: nn.Module, mode: str = "default", **options: Any) -> list[str]:
    """Compile ``module``'s networks in place (:func:`compilable_networks`); returns their
    names.  ``options`` go to ``torch.compile`` (e.g. ``dynamic=True``).

    :raises ValueError: an unknown ``mode``.
    """
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    networks = compilable_networks(module)
    for _, network in networks:
        network.compile(mode=mode, **options)
    return [name for name, _ in networks]


def is_compiled(module: nn.Module) -> bool:
    """Whether any submodule of ``module`` was compiled in place."""
    return any(getattr(part, "_compiled_call_impl", None) is not None for part in module.modules())


__all__ = ["COMPILE_MODES", "compilable_networks", "compile_networks", "is_compiled"]
