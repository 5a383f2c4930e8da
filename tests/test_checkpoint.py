"""Checkpoints: safe loading, corrupted files, incompatible configs, atomic writes."""

from __future__ import annotations

import pickle
import random

import pytest
import torch

from pyrovae import TrainConfig, build_vae
from pyrovae.checkpoint import (
    atomic_torch_save,
    capture_rng_state,
    load_vae,
    read_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from pyrovae.errors import CheckpointError


def saved_run(tmp_path, **config_values):
    config = TrainConfig(hidden_dims=(8,), latent_dim=2, **config_values)
    vae = build_vae(config, data_dim=6)
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, vae, None, epoch=3, config=config)
    return vae, config, path


class _CreatesFile:
    """Unpickling this calls os.system-like code: it creates a marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_round_trip(tmp_path):
    vae, config, path = saved_run(tmp_path)
    loaded, loaded_config, checkpoint = load_vae(path)
    assert loaded_config == config and checkpoint["epoch"] == 3
    for (name, value), (_, other) in zip(vae.state_dict().items(), loaded.state_dict().items(),
                                         strict=True):
        assert torch.equal(value, other), name


def test_a_malicious_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format_version": 1, "payload": _CreatesFile(str(marker))}, path)
    with pytest.raises(CheckpointError, match="refusing to load"):
        read_checkpoint(path)
    assert not marker.exists()
    # a raw pickle (not a torch zip) too
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(_CreatesFile(str(marker))))
    with pytest.raises(CheckpointError):
        read_checkpoint(raw)
    assert not marker.exists()


def test_truncated_and_corrupted_files_give_a_clear_error(tmp_path):
    _, _, path = saved_run(tmp_path)
    data = path.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        read_checkpoint(truncated)
    garbage = tmp_path / "garbage.pt"
    for seed in range(20):  # random bytes, and random damage inside a real checkpoint
        garbage.write_bytes(random.Random(seed).randbytes(1000))
        with pytest.raises(CheckpointError):
            read_checkpoint(garbage)
        damaged = bytearray(data)
        for index in random.Random(seed).sample(range(len(damaged)), 50):
            damaged[index] ^= 0xFF
        garbage.write_bytes(bytes(damaged))
        try:
            read_checkpoint(garbage)
        except CheckpointError:
            pass  # what must not happen is any other exception
    not_ours = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, not_ours)
    with pytest.raises(CheckpointError, match="not a pyrovae checkpoint"):
        read_checkpoint(not_ours)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        read_checkpoint(tmp_path / "absent.pt")


def test_an_incompatible_config_is_named(tmp_path):
    _, _, path = saved_run(tmp_path)
    other = TrainConfig(hidden_dims=(8,), latent_dim=5)
    with pytest.raises(CheckpointError, match="does not match the config \\(latent_dim=5"):
        load_vae(path, config=other)
    other_prior = TrainConfig(hidden_dims=(8,), latent_dim=2, prior="mog")
    with pytest.raises(CheckpointError, match="prior=mog"):
        load_vae(path, config=other_prior)


def test_a_crash_during_a_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    _, _, path = saved_run(tmp_path)
    before = path.read_bytes()

    def crash_half_way(obj, handle):
        handle.write(b"partial")
        raise KeyboardInterrupt  # as if killed during the write

    monkeypatch.setattr(torch, "save", crash_half_way)
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({"x": 1}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert read_checkpoint(path)["epoch"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary left


def test_rng_state_round_trips_through_a_safe_load(tmp_path):
    state = capture_rng_state()
    expected = (torch.rand(3), __import__("numpy").random.rand(3), __import__("random").random())
    atomic_torch_save(state, tmp_path / "rng.pt")
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (torch.rand(3), __import__("numpy").random.rand(3), __import__("random").random())
    assert torch.equal(expected[0], again[0])
    assert (expected[1] == again[1]).all() and expected[2] == again[2]


def trained_checkpoint(tmp_path):
    """A checkpoint as the training loop writes it: optimizer moments and a position."""
    config = TrainConfig(hidden_dims=(8,), latent_dim=2)
    vae = build_vae(config, data_dim=6)
    optimizer = torch.optim.Adam(vae.parameters())
    sum(parameter.sum() for parameter in vae.parameters()).backward()
    optimizer.step()
    progress = {"epoch": 2, "batch": 0, "step": 2, "total_loss": 0.0, "seen": 0, "lr": 1e-3,
                "epoch_generator_state": torch.Generator().get_state(), "best_elbo": -5.0,
                "rollbacks": 0, "history": []}
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, vae, optimizer, 1, config, progress=progress)
    return vae, path


@pytest.mark.parametrize("change, message", [
    (lambda c: c.pop("model"), "has no 'model'"),
    (lambda c: c["progress"].pop("lr"), "the training position has no 'lr'"),
    (lambda c: c["progress"].update(epoch="2"), "progress\\['epoch'\\] should be int, got str"),
    (lambda c: c["rng"].update(torch=torch.zeros(3, dtype=torch.uint8)),
     "the random number generator state is malformed"),
    (lambda c: c["rng"].update(python=(3, (1, 2), None)),
     "the random number generator state is malformed"),
    (lambda c: c["config"].update(latent_dim="2"),
     "its config is invalid: config key 'latent_dim' should be int"),
    (lambda c: c["optimizer"]["state"][0].update(exp_avg=torch.zeros(3, 3)),
     "the optimizer's exp_avg of parameter 0 has shape \\(3, 3\\) and the parameter \\(8, 6\\)"),
    (lambda c: c["model"].update({"encoder.body.0.weight": torch.zeros(8, 7)}),
     "encoder.body.0.weight has shape \\(8, 7\\) in the checkpoint and \\(8, 6\\) in the model"),
])
def test_a_broken_checkpoint_is_refused_before_anything_is_loaded(tmp_path, change, message):
    import copy

    from pyrovae.checkpoint import check_resumable

    vae, path = trained_checkpoint(tmp_path)
    check_resumable(path, vae)  # as written, it passes
    checkpoint = copy.deepcopy(read_checkpoint(path))
    change(checkpoint)
    torch.save(checkpoint, path)
    before = {name: value.clone() for name, value in vae.state_dict().items()}
    rng = torch.get_rng_state()
    with pytest.raises(CheckpointError, match=message):
        check_resumable(path, vae)
    assert torch.equal(torch.get_rng_state(), rng)  # the trial restore was undone
    for name, value in vae.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_an_unsafe_pickle_says_what_it_found_and_not_how_to_load_it_anyway(tmp_path):
    import os

    class System:
        def __reduce__(self):
            return (os.system, ("true",))

    path = tmp_path / "evil.pt"
    torch.save({"format_version": 1, "payload": System()}, path)
    with pytest.raises(CheckpointError) as error:
        read_checkpoint(path)
    message = str(error.value)
    assert "posix.system" in message and "weights_only" not in message
    assert "\n" not in message and "\x1b" not in message


def test_a_text_file_is_not_called_a_pickle(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("these are my notes\n")
    with pytest.raises(CheckpointError, match="is not a checkpoint: torch.save writes a zip"):
        read_checkpoint(path)


def test_history_copies_sort_by_epoch_number_and_skip_temporaries(tmp_path):
    from pyrovae.checkpoint import history_checkpoints, keep_history

    _, _, path = saved_run(tmp_path)
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for epoch in (9998, 9999):
        (folder / f"epoch-{epoch:04d}.pt").write_bytes(b"old")
    (folder / "epoch-10001.pt.abc.tmp").write_bytes(b"partial")
    keep_history(tmp_path, 10000, keep_last=2)
    assert [p.name for p in history_checkpoints(tmp_path)] == ["epoch-9999.pt", "epoch-10000.pt"]


# --- what torch.save never writes is refused before the tensors are read (issue 39) -------


@pytest.fixture
def values_never_read(monkeypatch):
    """Fail the test if read_checkpoint copies any tensor out of the file."""
    import pyrovae.checkpoint

    def copied(*args, **kwargs):
        raise AssertionError("the tensors were read before the checkpoint was refused")

    monkeypatch.setattr(pyrovae.checkpoint, "_materialized", copied, raising=False)


def _rewritten(path, compress_type=None, extra=None):
    """Re-write the zip archive at ``path`` entry by entry: compressed, or with ``extra``
    entries ``{name: bytes}`` added beside the tensors."""
    import zipfile

    source = path.read_bytes()
    import io

    with zipfile.ZipFile(io.BytesIO(source)) as archive, zipfile.ZipFile(path, "w") as out:
        prefix = archive.namelist()[0].split("/")[0]
        for info in archive.infolist():
            data = archive.read(info)
            if compress_type is not None:
                info.compress_type = compress_type
            out.writestr(info, data)
        for name, data in (extra or {}).items():
            out.writestr(f"{prefix}/{name}", data)


def test_a_compressed_checkpoint_is_refused_before_anything_is_unpacked(tmp_path,
                                                                        values_never_read):
    import zipfile

    _, _, path = saved_run(tmp_path)
    _rewritten(path, compress_type=zipfile.ZIP_DEFLATED)
    with pytest.raises(CheckpointError, match="its entry [a-z]+/data.pkl is compressed \\(zip "
                                              "method 8\\), which torch.save never does"):
        read_checkpoint(path)


def test_tensor_data_beyond_what_the_tensors_take_is_refused(tmp_path, values_never_read):
    _, _, path = saved_run(tmp_path)
    _rewritten(path, extra={"data/999": bytes(2**20)})
    with pytest.raises(CheckpointError, match="holds [0-9,]+ bytes of tensor data and its "
                                              "tensors take [0-9,]+; torch.save writes nothing "
                                              "else"):
        read_checkpoint(path)


@pytest.mark.parametrize("change, message", [
    (lambda c: c.update(extra=torch.zeros(10)), "it has keys that pyrovae never writes \\(extra\\)"),
    (lambda c: c["rng"]["numpy"].update(keys=torch.zeros(100_000, dtype=torch.int64)),
     "rng\\['numpy'\\]\\['keys'\\] holds 800,000 bytes, and a random number generator state "
     "never more than 65,536"),
    (lambda c: c["model"].update({"encoder.body.0.weight": torch.zeros(8, 60_000)}),
     "encoder.body.0.weight has shape \\(8, 60000\\) in the checkpoint and \\(8, 6\\)"),
    (lambda c: c["model"].update({"encoder.body.0.weight": torch.zeros(8, 6).to_sparse()}),
     "model\\['encoder.body.0.weight'\\] is a torch.sparse_coo tensor; a checkpoint holds only "
     "dense ones"),
    (lambda c: c["model"].update({"encoder.body.0.weight": torch.zeros(8, 6, device="meta")}),
     "model tensor 'encoder.body.0.weight' holds no values \\(it was saved from the meta "
     "device\\)"),
    (lambda c: c["model"].update({"encoder.body.0.weight": torch.zeros(8, 6,
                                                                       dtype=torch.float64)}),
     "encoder.body.0.weight is torch.float64 in the checkpoint and torch.float32 in the model"),
    (lambda c: c.update(data_dim=-1),
     "data_dim should be a positive integer of at most 2147483647, got -1"),
    (lambda c: c.update(data_dim=10**12),
     "data_dim should be a positive integer of at most 2147483647, got 1000000000000"),
    (lambda c: c.update(data_dim=7), "does not match the config \\(latent_dim=2, prior=normal, "
                                     "guide=diagonal, net=mlp\\) and data_dim 7: "),
    (lambda c: c.update(image_shape=[1, 2, 2]),
     "image_shape \\[1, 2, 2\\] holds 4 values per data point and data_dim says 6"),
    (lambda c: c["config"].update(hidden_dims=[[[[[[[[[[[[[[[[[[8]]]]]]]]]]]]]]]]]]),
     "config\\['hidden_dims'\\]\\[0\\].* nests lists or dicts deeper than 16 levels"),
])
def test_load_vae_refuses_what_no_model_has_in_one_line_naming_the_key(tmp_path, change,
                                                                       message,
                                                                       values_never_read):
    _, _, path = saved_run(tmp_path)
    checkpoint = torch.load(path, weights_only=True)
    change(checkpoint)
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match=message) as error:
        load_vae(path)
    assert "\n" not in str(error.value)


def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path):
    _, _, path = saved_run(tmp_path)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["model"]["decoder.body.0.bias"][[0, 3]] = float("nan")
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match="model tensor 'decoder.body.0.bias' holds 2 "
                                              "non-finite values \\(NaN\\)"):
        load_vae(path)


def test_evaluate_and_sample_refuse_nan_weights_with_exit_2(tmp_path, capsys):
    from pyrovae.cli import main

    _, _, path = saved_run(tmp_path, dataset="npy:absent.npy")
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["model"]["decoder.body.0.weight"].fill_(float("nan"))
    checkpoint["image_shape"] = [1, 2, 3]
    torch.save(checkpoint, path)
    for argv in (["evaluate", str(path), "-o", str(tmp_path / "e.json")],
                 ["sample", str(path), "-o", str(tmp_path / "s.png")]):
        assert main([*argv, "--device", "cpu"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "holds 16 non-finite values (NaN)" in err[0], err
    assert not (tmp_path / "s.png").exists() and not (tmp_path / "e.json").exists()


def test_resume_refuses_a_checkpoint_of_another_data_dim(tmp_path):
    from pyrovae.checkpoint import check_resumable

    vae, path = trained_checkpoint(tmp_path)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["data_dim"] = 7
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match="data_dim is 7 and the data have 6 values per "
                                              "point"):
        check_resumable(path, vae)


def test_one_flipped_byte_is_corruption_not_an_attack(tmp_path):
    import zipfile

    _, _, path = saved_run(tmp_path)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        pickle_entry = next(info for info in archive.infolist()
                            if info.filename.endswith("data.pkl"))
        tensor_entry = next(info for info in archive.infolist()
                            if info.filename.endswith("data/0"))
    for entry, offset in ((pickle_entry, 200), (tensor_entry, 40)):
        # an entry's data follow its 30-byte local header, its name and its extra field
        start = entry.header_offset
        name_length, extra_length = (int.from_bytes(data[start + at:start + at + 2], "little")
                                     for at in (26, 28))
        damaged = bytearray(data)
        damaged[start + 30 + name_length + extra_length + offset] ^= 4
        path.write_bytes(bytes(damaged))
        with pytest.raises(CheckpointError) as error:
            load_vae(path)
        assert "truncated or corrupted (BadZipFile: Bad CRC-32 for file" in str(error.value)
        assert "could run code" not in str(error.value)


def test_a_bare_pickle_is_refused_unread(tmp_path):
    marker = tmp_path / "pwned"
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(_CreatesFile(str(marker))))
    with pytest.raises(CheckpointError, match="it is a bare pickle, not the zip archive "
                                              "torch.save writes"):
        read_checkpoint(raw)
    assert not marker.exists()


def test_evaluate_and_sample_refuse_a_compressed_checkpoint_with_exit_2(tmp_path, capsys):
    import zipfile

    from pyrovae.cli import main

    _, _, path = saved_run(tmp_path, dataset="npy:absent.npy")
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["image_shape"] = [1, 2, 3]
    torch.save(checkpoint, path)
    _rewritten(path, compress_type=zipfile.ZIP_DEFLATED)
    for argv in (["evaluate", str(path), "-o", str(tmp_path / "e.json")],
                 ["sample", str(path), "-o", str(tmp_path / "s.png")]):
        assert main([*argv, "--device", "cpu"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is compressed (zip method 8)" in err[0], err
    assert not (tmp_path / "s.png").exists() and not (tmp_path / "e.json").exists()
