"""parameters_owned: the training loop's step skips re-registering parameters, nothing else."""

from __future__ import annotations

import contextlib

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceEnum_ELBO
from pyro.poutine.messenger import Messenger

from pyrovae import TrainConfig, build_vae
from pyrovae.config import apply_label_settings
from pyrovae.data import DataSplits
from pyrovae.registration import ignores_module_parameters, parameters_owned
from pyrovae.train import TrainingLoop


def _binary(n: int = 8, data_dim: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.bernoulli(torch.full((n, data_dim), 0.3),
                           generator=torch.Generator().manual_seed(seed))


def _program(kind: str):
    """(program, arguments, elbo) of one of pyrovae's models on 12-pixel binary data."""
    torch.manual_seed(0)
    x = _binary()
    if kind in ("semi_supervised", "conditional"):
        y = torch.arange(8) % 3
        data = DataSplits.from_tensors(x, x[:4], train_labels=y, test_labels=y[:4])
        config, data = apply_label_settings(
            TrainConfig(model=kind, hidden_dims=(6,), latent_dim=2,
                        labelled=4 if kind == "semi_supervised" else None), data)
        model = build_vae(config, data_dim=12)
        elbo = TraceEnum_ELBO(max_plate_nesting=1) if kind == "semi_supervised" else Trace_ELBO()
        return model, (x, data.train_labels), elbo
    config = {"vae": TrainConfig(hidden_dims=(6,), latent_dim=3),
              "vamp_iaf": TrainConfig(hidden_dims=(6,), latent_dim=3, prior="vamp",
                                      num_components=4, guide="iaf"),
              # a prior with PyroParams, which stay Pyro statements
              "mog": TrainConfig(hidden_dims=(6,), latent_dim=3, prior="mog", num_components=3),
              "hierarchical": TrainConfig(hidden_dims=(6,), latent_dims=(4, 2))}[kind]
    return build_vae(config, data_dim=12), (x,), Trace_ELBO()


def _param_sites(fn, *args) -> set[str]:
    trace = poutine.trace(fn).get_trace(*args)
    return {name for name, site in trace.nodes.items() if site["type"] == "param"}


KINDS = ["vae", "vamp_iaf", "mog", "hierarchical", "conditional", "semi_supervised"]


@pytest.mark.parametrize("kind", KINDS)
def test_owned_parameters_give_the_same_loss_and_gradient_without_param_sites(kind):
    program, args, elbo = _program(kind)
    announced = _param_sites(program.guide, *args) | _param_sites(program.model, *args)
    # PyroParam attributes (the mixture prior's) stay Pyro statements
    pyro_params = {name.removesuffix("_unconstrained").rsplit(".", 1)[-1]
                   for name, _ in program.named_parameters() if name.endswith("_unconstrained")}
    assert len(announced) > len(pyro_params)
    results = []
    for owned in (False, True):
        program.zero_grad(set_to_none=True)
        with parameters_owned() if owned else contextlib.nullcontext():
            if owned:
                assert _param_sites(program.guide, *args) | _param_sites(program.model, *args) \
                    == {name for name in announced if name.rsplit(".", 1)[-1] in pyro_params}
            pyro.set_rng_seed(3)
            loss = elbo.differentiable_loss(program.model, program.guide, *args)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in program.parameters()
                                         if p.grad is not None]))
    (loss_pyro, grads_pyro), (loss_owned, grads_owned) = results
    assert torch.isfinite(loss_pyro)
    assert torch.equal(loss_pyro, loss_owned)
    assert len(grads_pyro) == len(grads_owned) == sum(1 for _ in program.parameters())
    for pyro_grad, owned_grad in zip(grads_pyro, grads_owned, strict=True):
        assert torch.equal(pyro_grad, owned_grad)


def test_a_parameter_only_trace_still_finds_every_parameter():
    vae, (x,), elbo = _program("vae")
    with parameters_owned(), poutine.trace(param_only=True) as capture:
        elbo.differentiable_loss(vae.model, vae.guide, x)
    found = {id(site["value"].unconstrained()) for site in capture.trace.nodes.values()}
    assert found == {id(p) for p in vae.parameters()}


def test_lift_still_turns_the_decoder_weights_into_random_variables():
    vae, (x,), _ = _program("vae")
    lifted = poutine.lift(vae.model, prior=dist.Normal(0.0, 1.0))
    outside = poutine.trace(lifted).get_trace(x)
    with parameters_owned():
        inside = poutine.trace(lifted).get_trace(x)
    decoder_sites = {name for name in outside.nodes if name.startswith(vae._pyro_name + ".decoder")}
    assert decoder_sites and all(outside.nodes[name]["type"] == "sample" for name in decoder_sites)
    assert {name for name in inside.nodes if name.startswith(vae._pyro_name + ".decoder")} \
        == decoder_sites
    # global weights: drawn outside the data plate, one value for all points
    assert all(not outside.nodes[name]["cond_indep_stack"] for name in decoder_sites)


class _CountParams(Messenger):
    """Counts the param messages that reach it (a handler pyrovae does not know)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def _pyro_param(self, msg) -> None:
        self.count += 1


@ignores_module_parameters
class _BlindCounter(_CountParams):
    """The same, declared to do nothing with module parameters: it sees what is still sent."""


def test_an_unknown_handler_on_the_stack_still_gets_every_message():
    vae, (x,), elbo = _program("vae")
    with parameters_owned(), _CountParams() as counter:
        elbo.differentiable_loss(vae.model, vae.guide, x)
    assert counter.count == sum(1 for _ in vae.parameters())  # each where it is used
    with parameters_owned(), _BlindCounter() as blind:
        elbo.differentiable_loss(vae.model, vae.guide, x)
    assert blind.count == 0


@pytest.mark.parametrize("kind", KINDS)
def test_through_the_elbos_own_handlers_no_module_parameter_is_announced(kind):
    program, args, elbo = _program(kind)
    module_parameters = sum(1 for _ in program.parameters())
    with _BlindCounter() as outside:
        elbo.differentiable_loss(program.model, program.guide, *args)
    with parameters_owned(), _BlindCounter() as inside:
        elbo.differentiable_loss(program.model, program.guide, *args)
    # each parameter is announced where it is used, some in both model and guide
    assert outside.count >= module_parameters - inside.count > 0
    pyro_params = sum(1 for name, _ in program.named_parameters() if name.endswith("_unconstrained"))
    assert inside.count == (pyro_params if kind == "mog" else 0)


def test_the_training_step_sends_no_param_messages_and_still_trains():
    torch.manual_seed(0)
    x = _binary(40)
    vae = build_vae(TrainConfig(hidden_dims=(6,), latent_dim=3, kl_warmup_epochs=2),
                    data_dim=12)
    loop = TrainingLoop(vae, DataSplits.from_tensors(x, x[:10]), epochs=1, batch_size=10,
                        kl_warmup_epochs=2, progress=False)
    store = pyro.get_param_store()
    registered = {name: store[name] for name in store.keys()
                  if name.startswith(vae._pyro_name + ".")}
    assert {id(v) for v in registered.values()} == {id(p) for p in vae.parameters()}
    with _BlindCounter() as outside_the_loop:  # the same program under Pyro's own ELBO
        Trace_ELBO().differentiable_loss(vae.model, vae.guide, x[:10])
    assert outside_the_loop.count == len(registered)
    before = [p.detach().clone() for p in vae.parameters()]
    with _BlindCounter() as in_the_loop:
        losses = [loop.train_step(x[:10]) for _ in range(30)]
    assert in_the_loop.count == 0
    assert losses[-1] < losses[0]
    assert all(not torch.equal(a, p) for a, p in zip(before, vae.parameters(), strict=True))
    assert all(store[name] is value for name, value in registered.items())
