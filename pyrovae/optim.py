"""Adam with the settings published VAE protocols use, and the decoder's output-bias start.

Burda et al. (2016) train with Adam at beta1 = 0.99, beta2 = 0.999, epsilon = 1e-4 and the
second moment started at 1 instead of 0; with the bias correction this makes the first
steps small (an implicit warm-up).  Tomczak & Welling (2018) train with "AdamNormGrad":
Adam on each parameter tensor's gradient divided by its L2 norm
(:func:`normalize_gradients_`).  :class:`AdamSettings` holds those choices and
:func:`make_adam` builds a ``torch.optim.Adam`` that follows them.

References:

1. Kingma, Ba (2015). Adam: A Method for Stochastic Optimization. ICLR.
2. Burda, Grosse, Salakhutdinov (2016). Importance Weighted Autoencoders. ICLR.
3. Tomczak, Welling (2018). VAE with a VampPrior. AISTATS.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from pyrovae.errors import ConfigError

#: how the decoder's output bias starts (:func:`init_output_bias`)
OUTPUT_BIAS_INITS = ("zero", "data_mean")


@dataclass(frozen=True)
class AdamSettings:
    """Adam's hyperparameters other than the learning rate.

    :param betas: decay rates of the first and second moment estimates.
    :param eps: added to the square root of the bias-corrected second moment.
    :param second_moment_init: the value the second moment starts at (torch and the Adam
        paper: 0; Burda et al.: 1).
    :param normalize_gradients: divide each parameter tensor's gradient by its L2 norm
        before the update (:func:`normalize_gradients_`; Tomczak & Welling's AdamNormGrad).
    """

    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    second_moment_init: float = 0.0
    normalize_gradients: bool = False

    def __post_init__(self) -> None:
        for name, beta in zip(("beta1", "beta2"), self.betas, strict=True):
            if not 0.0 <= beta < 1.0:
                raise ConfigError(f"adam {name} must be in [0, 1), got {beta}")
        if not self.eps > 0:
            raise ConfigError(f"adam eps must be positive, got {self.eps}")
        if not self.second_moment_init >= 0:
            raise ConfigError(f"adam second_moment_init must be >= 0, got {self.second_moment_init}")


#: added to each gradient's norm before dividing by it, as the VampPrior authors' code does
GRADIENT_NORM_EPS = 1e-7


@torch.no_grad()
def normalize_gradients_(parameters: Iterable[torch.Tensor],
                         eps: float = GRADIENT_NORM_EPS) -> torch.Tensor | None:
    """Divide each parameter's gradient, in place, by its own L2 norm plus ``eps``: every
    tensor then moves by a step whose size Adam alone decides, however large its raw
    gradient.  Parameters without a gradient are left alone.

    :returns: the norms before dividing, one per gradient (``None`` without gradients), so
        the caller can refuse a non-finite one: a NaN or infinite gradient would otherwise
        become NaN (or, past the float range, silently 0).
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return None
    norms = torch._foreach_norm(grads)
    found = torch.stack(norms)
    torch._foreach_add_(norms, eps)
    torch._foreach_div_(grads, norms)
    return found


def make_adam(parameters: Iterable[torch.Tensor], *, lr: float,
              settings: AdamSettings | None = None, fused: bool = False) -> torch.optim.Adam:
    """``torch.optim.Adam`` over ``parameters`` with ``settings``.

    :param fused: torch's fused kernel (one call for all parameters instead of several per
        parameter: the same update, less host time per step).

    A nonzero ``second_moment_init`` fills each parameter's state before the first step
    (torch creates the state lazily only where it finds none), so the state saves and
    reloads with ``state_dict`` like any Adam state.
    """
    settings = settings or AdamSettings()
    parameters = list(parameters)
    optimizer = torch.optim.Adam(parameters, lr=lr, betas=settings.betas, eps=settings.eps,
                                 fused=fused or None)
    if settings.second_moment_init:
        for parameter in parameters:
            optimizer.state[parameter] = {
                # torch's own layout: a float32 step, on the parameter's device when fused
                "step": torch.zeros((), dtype=torch.float32,
                                    device=parameter.device if fused else None),
                "exp_avg": torch.zeros_like(parameter, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.full_like(parameter, settings.second_moment_init,
                                              memory_format=torch.preserve_format),
            }
    return optimizer


def _last_linear(decoder: nn.Module) -> nn.Linear | None:
    linears = [module for module in decoder.modules() if isinstance(module, nn.Linear)]
    return linears[-1] if linears else None


@torch.no_grad()
def init_output_bias(decoder: nn.Module, bias: torch.Tensor) -> None:
    """Set the bias of the decoder's output layer (its last ``nn.Linear``) to ``bias``.

    :param bias: ``(data_dim,)``, in the units of the decoder's output (logits for a
        Bernoulli likelihood).
    :raises ConfigError: the decoder has no final linear layer of that width.
    """
    layer = _last_linear(decoder)
    if layer is None or layer.bias is None or layer.bias.shape != bias.shape:
        raise ConfigError(
            f"the decoder ({type(decoder).__name__}) has no output bias of shape "
            f"{tuple(bias.shape)} to start from the data mean; use --output-bias-init zero")
    layer.bias.copy_(bias.to(layer.bias))


def logit_of_mean(x: torch.Tensor, *, clip: float = 1e-3) -> torch.Tensor:
    """The logit of the per-pixel mean of ``x`` ``(N, D)`` in [0, 1], clipped to
    ``[clip, 1 - clip]`` so that pixels that are always 0 (or 1) get a finite bias: ``(D,)``."""
    mean = x.double().mean(0).clamp(clip, 1 - clip)
    return torch.log(mean / (1 - mean)).to(x.dtype)
