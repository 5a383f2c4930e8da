"""torch.compile of the networks: the same training under a seed, checkpoints unchanged."""

from __future__ import annotations

import pytest
import torch

from pyrovae import TrainConfig, build_vae, fit
from pyrovae.checkpoint import load_vae
from pyrovae.compilation import compilable_networks, compile_networks, is_compiled
from pyrovae.data import DataSplits
from pyrovae.errors import PyrovaeError
from pyrovae.train import FitOptions


def _data() -> DataSplits:
    generator = torch.Generator().manual_seed(0)
    x = torch.bernoulli(torch.full((96, 12), 0.3), generator=generator)
    return DataSplits.from_tensors(x[:64], x[64:])


def test_the_networks_are_compiled_and_the_pyro_parts_are_not():
    vae = build_vae(TrainConfig(hidden_dims=(8,), latent_dims=(4, 2)), data_dim=12)
    names = [name for name, _ in compilable_networks(vae)]
    # the Gaussian layers of a ModuleList, not the list; nothing from the prior or likelihood
    assert names == ["guide_layers.0", "guide_layers.1", "prior_layers.0", "decoder"]
    assert not is_compiled(vae)
    assert compile_networks(vae) == names
    assert is_compiled(vae)
    with pytest.raises(ValueError, match="compile mode"):
        compile_networks(vae, mode="fastest")


def test_the_networks_inside_flows_and_a_plain_module_are_found():
    flow = build_vae(TrainConfig(hidden_dims=(8,), latent_dim=3, prior="flow", guide="iaf"),
                     data_dim=12)
    names = [name for name, _ in compilable_networks(flow)]
    # a flow is called through Pyro's Transform.__call__ or .condition(): its networks are
    assert "prior.flows.0.arn" in names and "guide_family.flows.0.nn" in names
    assert not any(name.endswith(("flows.0", "flows.1")) for name in names)

    class Program(torch.nn.Module):  # model and guide methods: the root itself never runs
        def __init__(self) -> None:
            super().__init__()
            self.encoder, self.decoder = torch.nn.Linear(4, 2), torch.nn.Linear(2, 4)

        def model(self, x): ...

        def guide(self, x): ...

    assert [name for name, _ in compilable_networks(Program())] == ["encoder", "decoder"]


# dynamo reads .grad of non-leaf inputs while it traces (a torch-internal warning)
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
def test_compiled_training_gives_the_eager_losses_and_a_checkpoint_eager_code_loads(tmp_path):
    config = TrainConfig(hidden_dims=(16,), latent_dim=3, epochs=2, batch_size=16)
    runs = {}
    for mode in ("off", "default"):
        torch.manual_seed(0)
        vae = build_vae(config, data_dim=12)
        run_dir = tmp_path / mode
        history = fit(vae, _data(), FitOptions(epochs=2, batch_size=16, seed=0, progress=False,
                                               compile=mode), run_dir=run_dir, config=config)
        runs[mode] = (history, vae, run_dir)
    eager, compiled = runs["off"][0], runs["default"][0]
    assert is_compiled(runs["default"][1]) and not is_compiled(runs["off"][1])
    for a, b in zip(eager, compiled, strict=True):
        assert b.train_elbo == pytest.approx(a.train_elbo, rel=1e-5)
        assert b.test_elbo == pytest.approx(a.test_elbo, rel=1e-5)
    eager_state = runs["off"][1].state_dict()
    compiled_state = runs["default"][1].state_dict()
    assert list(compiled_state) == list(eager_state)  # no _orig_mod. keys
    for key, value in eager_state.items():
        assert torch.allclose(compiled_state[key], value, atol=1e-5), key
    reloaded, _, _ = load_vae(runs["default"][2])
    assert not is_compiled(reloaded)
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, compiled_state[key]), key


def test_an_unknown_compile_mode_is_refused():
    with pytest.raises(PyrovaeError, match="compile must be off or one of"):
        FitOptions(compile="fast")
