"""Your own Pyro program as a first-class run: ``fit(program, data, run_dir=...)`` checkpoints
and resumes it bit for bit, ``load_program_state`` loads a run back into the program object,
and ``pyrovae train/evaluate/sample --program FILE.py:NAME`` run it from the command line,
never importing code because a run directory names it."""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from pyrovae import fit, load_program_state, log_marginal_likelihood
from pyrovae.checkpoint import read_checkpoint
from pyrovae.cli import main
from pyrovae.data import DataSplits
from pyrovae.errors import ConfigError
from pyrovae.plotting import program_samples
from pyrovae.program_spec import ProgramSpec, load_program
from pyrovae.programs import ProgramError
from pyrovae.train import read_metrics

#: a program in the style of Pyro's examples/vae/vae.py: an nn.Module registering its networks
#: with pyro.module, plus pyro.param sites of its own (one with a constraint)
PROGRAM = textwrap.dedent('''
    import pyro
    import pyro.distributions as dist
    import torch
    from pyro.distributions import constraints
    from torch import nn


    class TinyVAE(nn.Module):
        def __init__(self, x_dim=16, z_dim=2, hidden=8):
            super().__init__()
            self.z_dim = z_dim
            self.encoder = nn.Sequential(nn.Linear(x_dim, hidden), nn.Tanh(),
                                         nn.Linear(hidden, 2 * z_dim))
            self.decoder = nn.Sequential(nn.Linear(z_dim, hidden), nn.Tanh(),
                                         nn.Linear(hidden, x_dim))

        def model(self, x):
            pyro.module("decoder", self.decoder)
            bias = pyro.param("bias", torch.zeros(x.shape[-1]))
            scale = pyro.param("prior_scale", torch.ones(self.z_dim),
                               constraint=constraints.positive)
            with pyro.plate("data", x.shape[0]):
                z = pyro.sample("z", dist.Normal(torch.zeros(self.z_dim), scale).to_event(1))
                pyro.sample("x", dist.Bernoulli(logits=self.decoder(z) + bias).to_event(1),
                            obs=x)

        def guide(self, x):
            pyro.module("encoder", self.encoder)
            with pyro.plate("data", x.shape[0]):
                loc, scale = self.encoder(x).chunk(2, -1)
                pyro.sample("z", dist.Normal(loc, nn.functional.softplus(scale) + 1e-3)
                            .to_event(1))


    def make_pair(x_dim=16):
        weight = torch.zeros(x_dim)

        def model(x):
            loc = pyro.param("loc", weight)
            with pyro.plate("data", x.shape[0]):
                z = pyro.sample("z", dist.Normal(0.0, 1.0))
                pyro.sample("x", dist.Bernoulli(logits=loc + z.unsqueeze(-1)).to_event(1), obs=x)

        def guide(x):
            q = pyro.param("q", torch.tensor(0.5), constraint=constraints.positive)
            with pyro.plate("data", x.shape[0]):
                pyro.sample("z", dist.Normal(0.0, q))

        return model, guide


    not_a_program = 3
''')

#: what a tampered config.json may name: importing it writes a marker file
BOOBY_TRAP = textwrap.dedent('''
    from pathlib import Path
    Path(__file__).with_name("imported.marker").write_text("code ran")

    class Evil:
        def model(self, x): ...
        def guide(self, x): ...
''')

TRAIN = ["--binarize", "none", "--batch-size", "20", "--eval-samples", "0", "--no-progress",
         "--checkpoint-every", "3", "--seed", "3"]


def write_files(tmp_path: Path) -> Path:
    (tmp_path / "prog.py").write_text(PROGRAM)
    (tmp_path / "evil.py").write_text(BOOBY_TRAP)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "images.npz",
             train=(rng.random((200, 1, 4, 4)) < 0.3).astype(np.float32),
             test=(rng.random((40, 1, 4, 4)) < 0.3).astype(np.float32))
    return tmp_path


@pytest.fixture
def files(tmp_path: Path) -> Path:
    """A folder with the program, the booby trap and 16-pixel binary images (1 x 4 x 4)."""
    return write_files(tmp_path)


def train_flags(files: Path, *extra: str) -> list[str]:
    return ["--program", f"{files / 'prog.py'}:TinyVAE", "--dataset",
            f"npz:{files / 'images.npz'}", *TRAIN, *extra]


def tiny_data() -> DataSplits:
    grey = torch.rand(120, 16, generator=torch.Generator().manual_seed(0))
    return DataSplits.from_tensors(grey, grey[:30], binarize="static")


def user_program(files: Path, name: str = "TinyVAE", **args):
    return load_program(ProgramSpec.parse(f"{files / 'prog.py'}:{name}"), args)


def store_values() -> dict[str, torch.Tensor]:
    store = pyro.get_param_store()
    return {name: store[name].detach().clone() for name in store.keys()}


def assert_same(first: dict, second: dict) -> None:
    assert list(first) == list(second)
    for name, value in first.items():
        assert torch.equal(value, second[name]), name


# --- from Python ------------------------------------------------------------------------------

def test_fit_resumes_a_program_with_pyro_params_bit_identical(files):
    data = tiny_data()
    torch.manual_seed(1)
    reference = user_program(files)
    fit(reference, data, epochs=3, batch_size=16, seed=5, progress=False, run_dir=files / "a")
    expected_module, expected_store = reference.state_dict(), store_values()
    pyro.clear_param_store()
    torch.manual_seed(1)
    fit(user_program(files), data, epochs=1, batch_size=16, seed=5, progress=False,
        run_dir=files / "b")
    pyro.clear_param_store()
    torch.manual_seed(99)  # whatever it starts from, the checkpoint overrides it
    resumed = user_program(files)
    history = fit(resumed, data, epochs=3, batch_size=16, seed=5, progress=False,
                  run_dir=files / "b", resume=True)
    assert [record.epoch for record in history] == [1, 2, 3]
    assert_same(resumed.state_dict(), expected_module)
    # the pyro.param sites outside the module: bias and the constrained prior scale
    assert sorted(name for name in expected_store if "$$$" not in name) == \
        ["bias", "prior_scale"]
    assert_same(store_values(), expected_store)
    assert [r.train_elbo for r in read_metrics(files / "b" / "metrics.csv")] == \
        [r.train_elbo for r in read_metrics(files / "a" / "metrics.csv")]
    checkpoint = read_checkpoint(files / "b")
    assert checkpoint["program"]["type"].endswith("TinyVAE")
    assert checkpoint["param_store"]["constraints"] == {"bias": "real",
                                                        "prior_scale": "positive"}


def test_a_finished_run_loads_back_into_a_fresh_program_object(files):
    data = tiny_data()
    trained = user_program(files)
    fit(trained, data, epochs=2, batch_size=16, seed=5, progress=False, run_dir=files / "run")
    expected_module, expected_store = trained.state_dict(), store_values()
    expected = log_marginal_likelihood(trained, data.test, num_samples=20, seed=0)

    pyro.clear_param_store()  # as in a new process: the store is empty
    fresh = user_program(files)
    checkpoint = load_program_state(fresh, files / "run")
    assert checkpoint["epoch"] == 2 and not fresh.training
    assert_same(fresh.state_dict(), expected_module)
    assert_same({name: value for name, value in store_values().items() if "$$$" not in name},
                {name: value for name, value in expected_store.items() if "$$$" not in name})
    assert torch.equal(log_marginal_likelihood(fresh, data.test, num_samples=20, seed=0),
                       expected)


def test_a_program_of_two_functions_resumes_bit_identical(files):
    data = tiny_data()
    fit(user_program(files, "make_pair"), data, epochs=2, batch_size=16, seed=5,
        progress=False, run_dir=files / "a")
    expected = store_values()
    pyro.clear_param_store()
    fit(user_program(files, "make_pair"), data, epochs=1, batch_size=16, seed=5,
        progress=False, run_dir=files / "b")
    pyro.clear_param_store()
    fit(user_program(files, "make_pair"), data, epochs=2, batch_size=16, seed=5,
        progress=False, run_dir=files / "b", resume=True)
    assert sorted(expected) == ["loc", "q"]
    assert_same(store_values(), expected)


def test_a_program_of_another_shape_is_refused_before_loading(files):
    data = tiny_data()
    fit(user_program(files), data, epochs=1, batch_size=16, seed=5, progress=False,
        run_dir=files / "run")
    other = user_program(files, hidden=5)
    before = {name: value.clone() for name, value in other.state_dict().items()}
    with pytest.raises(Exception, match=r"encoder\.0\.weight has shape \(8, 16\) in the "
                                        r"checkpoint and \(5, 16\) in the model"):
        load_program_state(other, files / "run")
    assert_same(other.state_dict(), before)


# --- naming and building a program ------------------------------------------------------------

def test_specs_parse_without_importing_and_compare_by_file(files, monkeypatch):
    monkeypatch.chdir(files)
    spec = ProgramSpec.parse("evil.py:Evil")
    assert spec == ProgramSpec.parse(f"{files}/./evil.py:Evil")
    assert str(spec) == f"{files / 'evil.py'}:Evil" and spec.is_file
    assert ProgramSpec.parse("package.module:Name.inner") == \
        ProgramSpec("package.module", "Name.inner", False)
    assert not (files / "imported.marker").exists()
    with pytest.raises(ConfigError, match="names no object"):
        ProgramSpec.parse("evil.py")
    with pytest.raises(ConfigError, match="is not a Python name"):
        ProgramSpec.parse("evil.py:not-a-name")


def test_classes_factories_and_objects_build_the_program(files):
    vae = user_program(files, z_dim=3)
    assert vae.z_dim == 3
    model, guide = user_program(files, "make_pair", x_dim=4)
    assert callable(model) and callable(guide)
    with pytest.raises(ProgramError, match="unexpected keyword argument 'depth'"):
        user_program(files, depth=2)
    with pytest.raises(ProgramError, match="not_a_program is a int"):
        user_program(files, "not_a_program")
    with pytest.raises(ProgramError, match=r"has no 'Missing' \(it defines TinyVAE, make_pair\)"):
        user_program(files, "Missing")


def test_an_importable_module_names_a_program_and_import_errors_are_one_line(files,
                                                                             monkeypatch):
    monkeypatch.syspath_prepend(str(files))
    model, guide = load_program("prog:make_pair", {"x_dim": 4})
    assert model.__qualname__ == "make_pair.<locals>.model"
    (files / "broken.py").write_text("import torch\n\nraise ValueError('no data here')\n")
    with pytest.raises(ProgramError, match=rf"^--program: importing {files / 'broken.py'} "
                                           r"failed at line 3: ValueError: no data here$"):
        load_program(f"{files / 'broken.py'}:VAE")
    with pytest.raises(ProgramError, match="no module named 'no_such_package'"):
        load_program("no_such_package.models:VAE")
    with pytest.raises(ProgramError, match="no such file"):
        load_program(f"{files / 'missing.py'}:VAE")


def test_a_program_draws_x_from_its_model_or_its_sample_method(files):
    vae = user_program(files)
    # E[x | z] of the Bernoulli observation: probabilities, one row per draw
    images = program_samples(vae, 6, 16)
    assert images.shape == (6, 16) and 0 < images.min() and images.max() < 1
    vae.sample = lambda n: torch.full((n, 1, 4, 4), 0.25)
    assert torch.equal(program_samples(vae, 3, 16), torch.full((3, 16), 0.25))

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("total", dist.Normal(z, 1.0), obs=x.sum(-1))

    with pytest.raises(ProgramError, match="no observed sites of x's size; give the program a "
                                           r"sample\(num_samples\) method"):
        program_samples((model, model), 3, 16)


# --- the command line -----------------------------------------------------------------------

def test_train_evaluate_report_and_sample_a_program_file(files, capsys):
    run = files / "run"
    assert main(["train", *train_flags(files, "--epochs", "2", "--eval-samples", "30",
                                       "--program-args", '{"hidden": 6}'),
                 "--out-dir", str(run)]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["program"] == f"{files / 'prog.py'}:TinyVAE"
    assert config["program_args"] == {"hidden": 6}
    results = json.loads((run / "results.json").read_text())
    assert results["num_samples"] == 30 and results["fraction_khat_above_threshold"] is not None
    assert (run / "samples.png").is_file()
    assert read_checkpoint(run)["model"]["encoder.0.weight"].shape == (6, 16)

    program = ["--program", f"{files / 'prog.py'}:TinyVAE"]
    assert main(["evaluate", str(run), *program, "-k", "30", "--no-progress", "--seed", "3"]) == 0
    evaluation = json.loads((run / "evaluation.json").read_text())
    # the same checkpoint, seed and K as the final evaluation: the same numbers
    assert evaluation["log_marginal_likelihood"] == results["log_marginal_likelihood"]
    assert main(["evaluate", str(run), *program, "--report", "--ks", "1,10",
                 "--ais-temperatures", "0", "--test-size", "20"]) == 0
    bounds = json.loads((run / "report.json").read_text())["bounds"]
    assert [row["label"] for row in bounds] == ["ELBO (K=10)", "IWAE (K=1)", "IWAE (K=10)"]
    assert bounds[0]["mean"] < bounds[2]["mean"]
    assert main(["sample", str(run), *program, "-n", "4"]) == 0
    assert (run / "samples-1.png").is_file()
    capsys.readouterr()


def test_built_in_model_flags_beside_a_program_are_refused(files, capsys):
    assert main(["train", *train_flags(files), "--latent-dim", "3",
                 "--out-dir", str(files / "run")]) == 2
    assert capsys.readouterr().err.strip() == (
        "pyrovae: error: --latent-dim is a flag of the built-in model; with --program the "
        "program is the model: pass its settings in --program-args")
    assert not (files / "run").exists()


def test_runs_of_a_program_need_it_named_again_and_never_import_what_a_run_names(files, capsys):
    run = files / "run"
    assert main(["train", *train_flags(files, "--epochs", "1"), "--out-dir", str(run)]) == 0
    capsys.readouterr()
    good = f"{files / 'prog.py'}:TinyVAE"

    assert main(["evaluate", str(run), "-k", "5"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"pyrovae: error: {run} holds a run of your program {good}; pyrovae imports no code "
        f"that a run directory names: name it again, pyrovae evaluate {run} --program {good}")
    assert main(["sample", str(run), "--program", f"{files / 'prog.py'}:make_pair"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"pyrovae: error: --program {files / 'prog.py'}:make_pair is not the program {run} was "
        f"trained with ({good}); name that one")
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 2
    assert "name it again, pyrovae train --resume" in capsys.readouterr().err

    # a tampered config.json naming a booby-trapped file: nothing of it ever runs
    config = json.loads((run / "config.json").read_text())
    config["program"] = f"{files / 'evil.py'}:Evil"
    (run / "config.json").write_text(json.dumps(config))
    commands = [["evaluate", str(run), "-k", "5"], ["evaluate", str(run), "--report"],
                ["sample", str(run)], ["train", "--resume", str(run), "--epochs", "2"],
                ["evaluate", str(run), "--program", good],
                ["train", "--resume", str(run), "--program", good, "--epochs", "2"]]
    for command in commands:
        assert main(command) == 2, command
        assert "evil.py:Evil" in capsys.readouterr().err
    assert not (files / "imported.marker").exists()
    # a built-in run refuses a --program
    assert main(["train", "--dataset", f"npz:{files / 'images.npz'}", *TRAIN, "--epochs", "1",
                 "--hidden-dims", "4", "--latent-dim", "2", "--out-dir", str(files / "vae")]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(files / "vae"), "--program", good]) == 2
    assert "holds a run of the built-in model" in capsys.readouterr().err


def pyrovae_train(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "pyrovae", "train", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


#: long enough that a signal at a random moment after the first checkpoint lands mid-run on an
#: idle machine too (3 epochs could finish before it)
KILL_TEST_EPOCHS = "40"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, dict]:
    """The program files, and the checkpoint of a run that nothing interrupted."""
    files = write_files(tmp_path_factory.mktemp("program"))
    assert main(["train", *train_flags(files, "--epochs", KILL_TEST_EPOCHS),
                 "--out-dir", str(files / "whole")]) == 0
    return files, read_checkpoint(files / "whole")


# SIGTERM's checkpoint-and-exit is the built-in runs' own path (tests/test_resume.py); a
# program's run differs in what the checkpoint holds, which kill -9 tests on every default run
@pytest.mark.parametrize("signal_number", [
    signal.SIGKILL, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)])
def test_a_killed_program_run_resumes_bit_identical(uninterrupted, signal_number, capsys):
    files, expected = uninterrupted
    run = files / f"run-{signal_number}"
    rng = random.Random(signal_number)
    for _ in range(5):
        process = pyrovae_train(*train_flags(files, "--epochs", KILL_TEST_EPOCHS), "--out-dir",
                                str(run),
                                "--overwrite")
        while not (run / "checkpoint.pt").exists() and process.poll() is None:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.5))
        process.send_signal(signal_number)
        _, stderr = process.communicate(timeout=120)
        # a signal after the last checkpoint interrupts nothing: try again
        if (process.returncode != 0 and read_checkpoint(run)["progress"]["step"]
                < expected["progress"]["step"]):
            break
    else:
        pytest.fail("the run finished before every interruption")
    if signal_number == signal.SIGTERM:
        assert process.returncode == 128 + signal.SIGTERM
        assert "SIGTERM at epoch" in stderr and "Traceback" not in stderr
    assert main(["train", "--resume", str(run), "--program", str(files / "prog.py") +
                 ":TinyVAE"]) == 0
    assert read_checkpoint(run)["progress"]["step"] == expected["progress"]["step"]
    resumed = read_checkpoint(run)
    assert_same(resumed["model"], expected["model"])
    assert_same(resumed["param_store"]["values"], expected["param_store"]["values"])
    assert sorted(resumed["param_store"]["values"]) == ["bias", "prior_scale"]
    capsys.readouterr()


@pytest.mark.slow  # about 40 s: two launches of two processes
def test_nproc_trains_and_resumes_a_program(files, capsys):
    run = files / "run"
    program = ["--program", f"{files / 'prog.py'}:TinyVAE"]
    launched = subprocess.run([sys.executable, "-m", "pyrovae", "train", "--nproc", "2",
                               *train_flags(files, "--epochs", "1"), "--out-dir", str(run)],
                              capture_output=True, text=True, timeout=300)
    assert launched.returncode == 0, launched.stderr
    resumed = subprocess.run([sys.executable, "-m", "pyrovae", "train", "--nproc", "2",
                              "--resume", str(run), *program, "--epochs", "2"],
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    checkpoint = read_checkpoint(run)
    assert checkpoint["progress"]["epoch"] == 3 and checkpoint["progress"]["step"] == 20
    assert sorted(checkpoint["param_store"]["values"]) == ["bias", "prior_scale"]
    # the pyro.param sites were trained too: gradients summed over the processes
    assert not torch.equal(checkpoint["param_store"]["values"]["bias"], torch.zeros(16))
    assert [record.epoch for record in read_metrics(run / "metrics.csv")] == [1, 2]


def test_encode_and_reconstruct_a_program_run(files, capsys):
    run = files / "run"
    assert main(["train", *train_flags(files, "--epochs", "1"), "--out-dir", str(run)]) == 0
    capsys.readouterr()
    good = f"{files / 'prog.py'}:TinyVAE"
    for command in ("encode", "reconstruct"):
        assert main([command, str(run)]) == 2
        assert capsys.readouterr().err.strip() == (
            f"pyrovae: error: {run} holds a run of your program {good}; pyrovae imports no "
            f"code that a run directory names: name it again, pyrovae {command} {run} "
            f"--program {good}")

    assert main(["encode", str(run), "--program", good, "-n", "3"]) == 0
    capsys.readouterr()
    program = user_program(files)
    load_program_state(program, run)
    # the (40, 1, 4, 4) array is read channels last: 1 x 4 images of 4 channels
    images = np.load(files / "images.npz")["test"]
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).reshape(40, 16))
    with torch.no_grad():
        loc, scale = program.encoder(x).chunk(2, -1)
    with np.load(run / "encoding_test.npz") as encoding:
        assert torch.allclose(torch.from_numpy(encoding["z_loc"]), loc, atol=1e-6)
        assert torch.allclose(torch.from_numpy(encoding["z_scale"]),
                              torch.nn.functional.softplus(scale) + 1e-3, atol=1e-6)
        assert encoding["z_samples"].shape == (3, 40, 2)
        assert str(encoding["z_moments"]) == "exact"

    assert main(["reconstruct", str(run), "--program", good, "-n", "6", "--columns", "3"]) == 0
    assert "6 test images and their reconstructions written to" in capsys.readouterr().out
    from PIL import Image
    with Image.open(run / "reconstructions.png") as image:
        assert image.size == (3 * 6 + 2, 4 * 3 + 2)  # 2 row pairs of 3 1x4 images, padded
    assert main(["reconstruct", str(run), "--program", good, "--decode", "mean"]) == 2
    assert capsys.readouterr().err.strip() == (
        "pyrovae: error: --decode mean is for the built-in models (their decoder at E[z|x]); "
        "your program's run reconstructs with --decode sample")


def test_a_programs_reconstruction_is_its_likelihood_mean_at_a_guide_draw(files):
    from pyrovae.encoding import program_reconstructions

    program = user_program(files)
    x = (torch.rand(5, 16, generator=torch.Generator().manual_seed(1)) < 0.5).float()
    pyro.set_rng_seed(7)
    reconstructions = program_reconstructions(program, x)
    pyro.set_rng_seed(7)
    with torch.no_grad():
        loc, scale = program.encoder(x).chunk(2, -1)
        z = dist.Normal(loc, torch.nn.functional.softplus(scale) + 1e-3).rsample()
        expected = torch.sigmoid(program.decoder(z) + pyro.param("bias"))
    assert reconstructions.shape == (5, 16)
    assert torch.allclose(reconstructions, expected, atol=1e-6)


def test_a_program_that_fails_on_the_data_is_one_line_naming_its_own_line(files, capsys):
    # built for 9 values per point, given 16: the guide's first layer cannot take them
    assert main(["train", *train_flags(files, "--epochs", "1"), "--program-args",
                 '{"x_dim": 9}', "--out-dir", str(files / "run")]) == 2
    line = PROGRAM.splitlines().index(
        "            loc, scale = self.encoder(x).chunk(2, -1)") + 1
    # the first trace is of one point or of a batch: either way, N rows of 16 values
    assert re.fullmatch(
        rf"pyrovae: error: the program's guide failed on data of shape \((\d+), 16\) \(prog.py, "
        rf"line {line}, in guide\): RuntimeError: mat1 and mat2 shapes cannot be multiplied "
        rf"\(\1x16 and 9x8\)", capsys.readouterr().err.strip().splitlines()[-1])
    # from Python the program's own error stays attached
    with pytest.raises(ProgramError) as raised:
        fit(user_program(files, x_dim=9), tiny_data(), epochs=1)
    assert isinstance(raised.value.__cause__, RuntimeError)
