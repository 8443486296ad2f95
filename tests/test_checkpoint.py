"""Checkpoints: atomicity under kills and full disks, resume refusals, inference loading (docs/RELIABILITY.md 17-21)."""

from __future__ import annotations

import errno
import json
import shutil

import pytest
import torch
from train_helpers import OtherToy, Recorder, make_data, make_setup, run_script

import saekit.train.checkpoint as ck
from saekit.artifacts import verify_manifest
from saekit.errors import MissingCheckpointError, ResumeMismatchError
from saekit.train import latest_checkpoint, list_checkpoints, load_checkpoint_sae, read_checkpoint, train


def _tmp_leftovers(run_dir):
    return sorted(p.name for p in (run_dir / "checkpoints").glob(".*.tmp"))


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """A finished 10-step run with checkpoints at 5 and 10."""
    run_dir = tmp_path_factory.mktemp("short")
    sae, batches, cfg = make_setup(total_steps=10, checkpoint_every=5)
    train(sae, batches, cfg, run_dir)
    return run_dir


def test_resume_without_checkpoint_raises(tmp_path):
    sae, batches, cfg = make_setup()
    with pytest.raises(MissingCheckpointError, match="no complete checkpoint"):
        train(sae, batches, cfg, tmp_path, resume=True)
    (tmp_path / "checkpoints" / ".step-00000010.abcd1234.tmp").mkdir(parents=True)  # a killed save
    with pytest.raises(MissingCheckpointError):
        train(sae, batches, cfg, tmp_path, resume=True)
    with pytest.raises(MissingCheckpointError):
        read_checkpoint(tmp_path)


@pytest.mark.parametrize("change, key", [
    ({"sae_overrides": {"d_sae": 128}}, "sae.d_sae"),
    ({"sae_overrides": {"k": 2}}, "sae.k"),
    ({"sae_class": OtherToy}, "sae.architecture"),
    ({"total_steps": 20}, "train.total_steps"),
    ({"lr": 1e-3}, "train.lr"),
    ({"data": make_data(seed=7)}, "data fingerprint"),
    ({"data": make_data()[:, :8], "sae_overrides": {"d_in": 8}}, "sae.d_in"),
])
def test_resume_with_incompatible_config_raises(short_run, change, key):
    sae, batches, cfg = make_setup(**{"total_steps": 10, "checkpoint_every": 5, **change})
    with pytest.raises(ResumeMismatchError, match=key):
        train(sae, batches, cfg, short_run, resume=True)


def test_resume_may_change_logging_and_checkpoint_cadence(short_run):
    sae, batches, cfg = make_setup(total_steps=10, checkpoint_every=3, log_every=1, nonfinite="skip")
    assert train(sae, batches, cfg, short_run, resume=True).steps_run == 0


@pytest.mark.parametrize("exit_in, nth, expect_tmp", [
    ("save_tensors", 7, True),  # 2nd checkpoint: weights and buffers written, killed before the optimizer file
    ("write_manifest", 2, True),  # 2nd checkpoint: every file written, killed before its manifest
    ("atomic_write_bytes", 2, False),  # 2nd checkpoint renamed into place, killed before `latest` moved
])
def test_kill_during_checkpoint_write_keeps_previous_checkpoint(tmp_path, exit_in, nth, expect_tmp):
    proc = run_script({"run_dir": str(tmp_path), "exit_in": [exit_in, nth]})
    assert proc.returncode == 137, proc.stderr[-2000:]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-00000010"
    assert bool(_tmp_leftovers(tmp_path)) == expect_tmp
    good = latest_checkpoint(tmp_path)
    assert good.name == "step-00000010"
    verify_manifest(good)
    assert read_checkpoint(tmp_path).state.step == 10
    # resuming continues from the complete checkpoint `latest` names and cleans the leftovers
    sae, batches, cfg = make_setup()
    result = train(sae, batches, cfg, tmp_path, resume=True)
    assert result.start_step == 10 and result.steps_run == 30
    assert _tmp_leftovers(tmp_path) == []
    assert (tmp_path / "final_sae" / "cfg.json").exists()


def test_disk_full_during_save_propagates_and_keeps_previous(tmp_path, monkeypatch):
    real, calls = ck.save_tensors, {"n": 0}

    def full_disk(path, tensors, metadata=None):
        calls["n"] += 1
        if calls["n"] == 5:  # inside the 2nd checkpoint
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, tensors, metadata)

    monkeypatch.setattr(ck, "save_tensors", full_disk)
    sae, batches, cfg = make_setup()
    with pytest.raises(OSError, match="No space left"):
        train(sae, batches, cfg, tmp_path)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000010"]
    assert latest_checkpoint(tmp_path).name == "step-00000010"
    verify_manifest(tmp_path / "checkpoints" / "step-00000010")
    monkeypatch.setattr(ck, "save_tensors", real)
    sae, batches, cfg = make_setup()
    assert train(sae, batches, cfg, tmp_path, resume=True).start_step == 10
    assert _tmp_leftovers(tmp_path) == [] and not list(tmp_path.rglob("*.tmp"))


def test_keep_last_n(tmp_path):
    sae, batches, cfg = make_setup(total_steps=12, checkpoint_every=2, keep_checkpoints=2)
    train(sae, batches, cfg, tmp_path)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000010", "step-00000012"]


def test_latest_pointer_fallbacks(short_run, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(short_run, run)
    (run / "checkpoints" / "latest").unlink()
    assert latest_checkpoint(run).name == "step-00000010"
    (run / "checkpoints" / "step-00000010" / "optimizer.safetensors").write_bytes(b"garbage")
    assert latest_checkpoint(run).name == "step-00000005"  # damaged newest is skipped, with a warning
    (run / "checkpoints" / "latest").write_text("step-00000010\n")
    assert latest_checkpoint(run).name == "step-00000005"


@pytest.mark.parametrize("arch", ["toy", "topk"])
def test_every_checkpoint_loads_as_an_inference_sae(tmp_path, arch):
    raw = make_data(n=256, seed=3)
    expected = {}

    class Expect(Recorder):
        @torch.no_grad()
        def on_checkpoint(self, run, path):
            s = run.state.input_scale
            expected[path.name] = run.sae.decode(run.sae.encode(raw * s)) / s  # training model on raw rows

    sae, batches, cfg = make_setup(total_steps=20, checkpoint_every=5, arch=arch)
    result = train(sae, batches, cfg, tmp_path, callbacks=[Expect()])
    assert result.state.input_scale != pytest.approx(1.0, abs=0.05)  # the folding is really exercised
    assert sorted(expected) == [p.name for p in list_checkpoints(tmp_path)]
    for path in list_checkpoints(tmp_path):
        inference = load_checkpoint_sae(path)
        assert not inference.training
        torch.testing.assert_close(inference(raw).recon, expected[path.name], rtol=1e-5, atol=1e-5)
    from saekit.sae.registry import load_sae

    final = load_sae(tmp_path)  # the run folder's final_sae/
    torch.testing.assert_close(final(raw).recon, expected["step-00000020"], rtol=1e-5, atol=1e-5)
    unfolded = load_checkpoint_sae(tmp_path, fold=False)
    assert float(unfolded.input_scale) == pytest.approx(result.state.input_scale)


def test_checkpoint_files_are_json_and_safetensors(short_run):
    ckpt = read_checkpoint(short_run / "checkpoints" / "step-00000005")
    assert sorted(p.name for p in ckpt.path.iterdir()) == sorted(ck.FILES + ["saekit_manifest.json"])
    meta = json.loads((ckpt.path / "optimizer.json").read_text())
    assert meta["type"] == "Adam" and meta["param_groups"][0]["betas"] == [0.9, 0.999]
    assert ckpt.trainer["scheduler"]["step"] == 5 and ckpt.trainer["data_position"]["offset"] > 0


@pytest.mark.parametrize("name", ["sae_cfg.json", "sae_state.safetensors", "sae_buffers.safetensors",
                                  "optimizer.safetensors", "optimizer.json", "rng.safetensors", "trainer.json"])
@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_every_damaged_checkpoint_file_is_named(short_run, tmp_path, name, damage):
    """Promise 11 for checkpoints: one changed or cut byte in any file makes reading that checkpoint raise
    CorruptArtifactError naming the file (never partial state)."""
    from saekit.errors import CorruptArtifactError

    run = tmp_path / "copy"
    shutil.copytree(short_run, run)
    path = run / "checkpoints" / "step-00000010" / name
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
    else:
        data = data[:-1]
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptArtifactError, match=rf"{name}: sha256 mismatch"):
        read_checkpoint(run / "checkpoints" / "step-00000010")
