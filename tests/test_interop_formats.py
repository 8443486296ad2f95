"""Bring your own SAE (issue 15): other tools' files load exactly, and saekit writes files they read.

The fixtures under tests/fixtures/interop were made by the peers' own code (scripts/make_interop_fixtures.sh:
SAELens, sparsify, dictionary_learning in a throwaway venv), together with the peers' own encode/decode
outputs on fixed inputs. Every fixture must load with `saekit.load_sae` and reproduce those outputs to 1e-5.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import saekit
from saekit.artifacts import MANIFEST
from saekit.errors import ConfigError, CorruptArtifactError
from saekit.sae.formats import SAEMetadata, detect, load_many, save_sae
from saekit.sae.registry import create

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "interop"
INDEX = json.loads((FIXTURES / "index.json").read_text())
ENTRIES = INDEX["fixtures"]
LOADABLE = sorted(n for n, e in ENTRIES.items() if not e["refused_key"])
REFUSED = sorted(n for n, e in ENTRIES.items() if e["refused_key"])
ATOL = 1e-5


def _reference(name: str) -> dict[str, torch.Tensor]:
    return load_file(FIXTURES / "reference" / f"{name}.safetensors")


def _assert_matches(sae, ref: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        code = sae.encode(ref["x"])
        recon = sae.decode(code)
        out = sae(ref["x"])
    torch.testing.assert_close(code.dense(), ref["codes"], rtol=0, atol=ATOL)
    torch.testing.assert_close(recon, ref["recon"], rtol=0, atol=ATOL)
    torch.testing.assert_close(out.recon, ref["recon"], rtol=0, atol=ATOL)


def test_fixtures_cover_every_peer_architecture():
    classes = {e.get("peer_class") for e in ENTRIES.values()}
    assert {"StandardSAE", "TopKSAE", "JumpReLUSAE", "GatedSAE", "BatchTopKTrainingSAE",
            "MatryoshkaBatchTopKTrainingSAE", "AutoEncoder", "AutoEncoderTopK", "BatchTopKSAE",
            "JumpReluAutoEncoder", "MatryoshkaBatchTopKSAE", "GatedAutoEncoder"} <= classes
    assert {e["format"] for e in ENTRIES.values()} == {"saelens", "sparsify", "dictionary_learning", "gemmascope"}
    for name in ENTRIES:  # the fixtures are not trivial: some latents on, some off
        codes = _reference(name)["codes"] if name in LOADABLE else None
        if codes is not None:
            l0 = (codes != 0).sum(1).float()
            assert 0 < l0.mean() < codes.shape[1], name


@pytest.mark.parametrize("name", LOADABLE)
def test_fixture_loads_and_matches_the_peer(name):
    entry = ENTRIES[name]
    sae = saekit.load_sae(FIXTURES / entry["path"])
    assert sae.architecture == entry["saekit_architecture"]
    assert isinstance(sae.metadata, SAEMetadata) and sae.metadata.format == entry["format"]
    _assert_matches(sae, _reference(name))


@pytest.mark.parametrize("name", REFUSED)
def test_computation_changing_keys_are_refused_naming_the_key(name):
    entry = ENTRIES[name]
    with pytest.raises(ConfigError, match=f"'{entry['refused_key']}'"):
        saekit.load_sae(FIXTURES / entry["path"])


@pytest.mark.parametrize("name", LOADABLE)
@pytest.mark.parametrize("fmt", ["saelens", "saekit", "sparsify"])
def test_saekit_written_files_reproduce_the_peer(name, fmt, tmp_path):
    sae = saekit.load_sae(FIXTURES / ENTRIES[name]["path"])
    if fmt == "sparsify" and not (sae.architecture == "topk" and not sae.cfg.batch_topk
                                  and sae.cfg.apply_b_dec_to_input):
        with pytest.raises(ConfigError, match="sparsify"):
            save_sae(sae, tmp_path / "out", format=fmt)
        return
    save_sae(sae, tmp_path / "out", format=fmt)
    assert detect(tmp_path / "out") == fmt
    _assert_matches(saekit.load_sae(tmp_path / "out").eval(), _reference(name))


def test_saelens_loaded_every_saekit_written_file():
    """Recorded by the fixtures script: SAELens itself loaded saekit's SAELens files and reproduced the peer
    outputs to 1e-5."""
    record = json.loads((FIXTURES / "saelens_roundtrip.json").read_text())["results"]
    assert set(record) == set(LOADABLE)
    bad = {n: r for n, r in record.items() if not (r["ok"] and r["loaded"] and r["max_abs_err"] <= ATOL)}
    assert not bad, bad


def test_metadata_keys_are_kept_not_dropped_or_rejected():
    sae = saekit.load_sae(FIXTURES / "saelens" / "standard")
    extra = sae.metadata.extra
    assert extra["reshape_activations"] == "none"
    assert extra["metadata"]["model_from_pretrained_kwargs"] == {"center_writing_weights": False}
    assert sae.cfg.model_name == "toy-model" and sae.cfg.hook_name == "blocks.1.hook_resid_post"
    assert sae.cfg.hook_layer == 1 and sae.cfg.context_size == 16
    dl = saekit.load_sae(FIXTURES / ENTRIES["dictionary_learning_batchtopk"]["path"])
    assert dl.metadata.extra["trainer"]["threshold_beta"] == 0.999
    assert dl.cfg.model_name == "toy-model" and dl.cfg.hook_name == "resid_post_layer_1"


def test_metadata_survives_a_saelens_round_trip(tmp_path):
    sae = saekit.load_sae(FIXTURES / "saelens" / "jumprelu")
    save_sae(sae, tmp_path / "out", format="saelens")
    cfg = json.loads((tmp_path / "out" / "cfg.json").read_text())
    assert cfg["metadata"]["model_from_pretrained_kwargs"] == {"center_writing_weights": False}
    assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post"


def _copy(rel: str, tmp_path: Path) -> Path:
    dst = tmp_path / Path(rel).name
    shutil.copytree(FIXTURES / rel, dst)
    return dst


def test_unknown_saelens_key_is_refused_by_name_or_kept_when_not_strict(tmp_path):
    folder = _copy("saelens/topk", tmp_path)
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps(cfg | {"sparsity_gate_power": 2}))
    with pytest.raises(ConfigError, match="'sparsity_gate_power'"):
        saekit.load_sae(folder)
    sae = saekit.load_sae(folder, strict=False)
    assert sae.metadata.extra["sparsity_gate_power"] == 2
    _assert_matches(sae, _reference("saelens_topk"))


def test_finetuning_scaling_factor_is_refused(tmp_path):
    folder = _copy("saelens/standard", tmp_path)
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps(cfg | {"finetuning_scaling_factor": True}))
    with pytest.raises(ConfigError, match="'finetuning_scaling_factor'"):
        saekit.load_sae(folder)


def test_batchtopk_keeps_its_inference_threshold():
    state = torch.load(FIXTURES / ENTRIES["dictionary_learning_batchtopk"]["path"] / "ae.pt", weights_only=True)  # noqa: TID251 - tensors only
    sae = saekit.load_sae(FIXTURES / ENTRIES["dictionary_learning_batchtopk"]["path"])
    assert sae.cfg.batch_topk and float(sae.threshold) == float(state["threshold"]) > 0
    ref = _reference("dictionary_learning_batchtopk")
    assert (ref["codes"] != 0).sum(1).float().std() > 0  # a variable L0: read as row-wise top-k it would not match


def test_unestimated_batchtopk_threshold_is_refused(tmp_path):
    folder = _copy(ENTRIES["dictionary_learning_batchtopk"]["path"], tmp_path)
    state = torch.load(folder / "ae.pt", weights_only=True)  # noqa: TID251 - tensors only
    state["threshold"] = torch.tensor(-1.0)
    torch.save(state, folder / "ae.pt")
    with pytest.raises(ConfigError, match="'threshold'"):
        saekit.load_sae(folder)


class _NotATensor:
    pass


def test_ae_pt_with_pickled_objects_is_not_unpickled(tmp_path):
    folder = _copy(ENTRIES["dictionary_learning_relu"]["path"], tmp_path)
    state = torch.load(folder / "ae.pt", weights_only=True)  # noqa: TID251 - tensors only
    torch.save(state | {"payload": _NotATensor()}, folder / "ae.pt")
    with pytest.raises(CorruptArtifactError, match="weights_only=True"):
        saekit.load_sae(folder)


def test_sparsify_root_with_several_hookpoints(tmp_path):
    root = FIXTURES / "sparsify" / "toy"
    with pytest.raises(ConfigError, match="2 hookpoints"):
        saekit.load_sae(root)
    many = load_many(root)
    assert sorted(many) == ["layers.0", "layers.1"]
    for hookpoint, sae in many.items():
        assert sae.cfg.hook_name == hookpoint
        _assert_matches(sae, _reference(f"sparsify_{hookpoint}"))


def test_gemmascope_npz_file_or_folder_and_missing_arrays(tmp_path):
    folder = FIXTURES / ENTRIES["gemmascope"]["path"]
    _assert_matches(saekit.load_sae(folder / "params.npz"), _reference("gemmascope"))
    with np.load(folder / "params.npz") as npz:
        arrays = {k: npz[k] for k in npz.files if k != "threshold"}
    np.savez(tmp_path / "params.npz", **arrays)
    with pytest.raises(CorruptArtifactError, match="threshold"):
        saekit.load_sae(tmp_path)


def test_saekit_folders_are_still_saekit(tmp_path):
    sae = create({"architecture": "topk", "d_in": 8, "d_sae": 16, "k": 2})
    saekit.save_sae(sae, tmp_path / "sae")
    assert detect(tmp_path / "sae") == "saekit"
    (tmp_path / "sae" / MANIFEST).unlink()
    assert detect(tmp_path / "sae") == "saekit"  # every cfg key is a saekit field
    with pytest.raises(CorruptArtifactError, match=f"no {MANIFEST}.*verify=False"):
        saekit.load_sae(tmp_path / "sae")  # a saekit folder without its checksums is refused, not read as SAELens
    assert type(saekit.load_sae(tmp_path / "sae", verify=False)) is type(sae)


def test_writers_refuse_what_the_format_cannot_hold(tmp_path):
    relu = create({"architecture": "relu", "d_in": 8, "d_sae": 16})
    with pytest.raises(ConfigError, match="sparsify"):
        save_sae(relu, tmp_path / "a", format="sparsify")
    with pytest.raises(ConfigError, match="format"):
        save_sae(relu, tmp_path / "b", format="onnx")
    mp_archs = [a for a in saekit.sae.architectures() if a not in ("relu", "topk", "jumprelu", "gated", "matryoshka")]
    for arch in mp_archs:
        if arch.startswith("test_"):
            continue
        other = create({"architecture": arch, "d_in": 8, "d_sae": 16})
        with pytest.raises(ConfigError, match="saelens"):
            save_sae(other, tmp_path / arch, format="saelens")


def test_nothing_recognisable_names_what_was_expected(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(CorruptArtifactError, match="cfg.json"):
        saekit.load_sae(tmp_path)


def test_saekit_save_sae_takes_a_format(tmp_path):
    sae = saekit.load_sae(FIXTURES / "saelens" / "gated")
    saekit.save_sae(sae, tmp_path / "out", format="saelens")
    assert detect(tmp_path / "out") == "saelens"
    _assert_matches(saekit.load_sae(tmp_path / "out"), _reference("saelens_gated"))


def test_flat_cfg_of_saelens_5_reads_as_topk(tmp_path):
    """SAELens <= 5 wrote a flat cfg.json (no `metadata`) and top-k as 'standard' + activation_fn_str='topk'.
    Same weights as the SAELens 6 top-k fixture, so the same outputs are expected."""
    folder = _copy("saelens/topk", tmp_path)
    cfg = {"architecture": "standard", "d_in": 16, "d_sae": 32, "dtype": "float32", "device": "cpu",
           "model_name": "toy-model", "hook_name": "blocks.1.hook_resid_post", "hook_layer": 1,
           "hook_head_index": None, "context_size": 16, "prepend_bos": True, "dataset_path": "toy/corpus",
           "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 4}, "apply_b_dec_to_input": True,
           "finetuning_scaling_factor": False, "normalize_activations": "none", "sae_lens_training_version": "5.0",
           "model_from_pretrained_kwargs": {}, "neuronpedia_id": None}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    sae = saekit.load_sae(folder)
    assert sae.architecture == "topk" and sae.cfg.k == 4 and sae.cfg.dataset_path == "toy/corpus"
    _assert_matches(sae, _reference("saelens_topk"))
    cfg["activation_fn_str"] = "tanh-relu"
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="'activation_fn_str'"):
        saekit.load_sae(folder)


def test_hook_z_reshape_is_metadata(tmp_path):
    """SAELens's hook_z reshaping only flattens [..., n_heads, d_head] into [..., d_in] before the SAE; saekit
    works on the flattened activations, so the key is kept (and written back), not refused."""
    folder = _copy("saelens/standard", tmp_path)
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps(cfg | {"reshape_activations": "hook_z"}))
    sae = saekit.load_sae(folder)
    assert sae.metadata.extra["reshape_activations"] == "hook_z"
    _assert_matches(sae, _reference("saelens_standard"))
    save_sae(sae, tmp_path / "out", format="saelens")
    assert json.loads((tmp_path / "out" / "cfg.json").read_text())["reshape_activations"] == "hook_z"


def test_saekit_format_keeps_the_foreign_metadata(tmp_path):
    """Converting another tool's SAE to saekit's format keeps its metadata record (metadata.json, in the
    manifest); an altered record is detected."""
    sae = saekit.load_sae(FIXTURES / "saelens" / "jumprelu")
    saekit.save_sae(sae, tmp_path / "out")
    back = saekit.load_sae(tmp_path / "out")
    assert detect(tmp_path / "out") == "saekit" and back.metadata == sae.metadata
    assert back.metadata.extra["metadata"]["model_from_pretrained_kwargs"] == {"center_writing_weights": False}
    record = json.loads((tmp_path / "out" / "metadata.json").read_text())
    (tmp_path / "out" / "metadata.json").write_text(json.dumps(record | {"format": "sparsify"}))
    with pytest.raises(CorruptArtifactError, match="metadata.json"):
        saekit.load_sae(tmp_path / "out")
    plain = create({"architecture": "topk", "d_in": 8, "d_sae": 16, "k": 2})
    saekit.save_sae(plain, tmp_path / "plain")
    assert not (tmp_path / "plain" / "metadata.json").exists()


def test_a_saelens_reader_of_our_cfg_computes_what_the_trainer_trained(tmp_path):
    """Input normalisation is the trainer's alone: it is folded into the saved weights and cfg.json says
    'none' (SAELens semantics), so SAELens's reading of our folder gives the trained model's outputs on
    raw activations; an SAE config asking for normalisation is refused, pointing at train.*."""
    import json

    from train_helpers import make_data, make_setup

    from saekit.errors import ConfigError
    from saekit.sae.formats import saelens
    from saekit.train import train

    sae, batches, cfg = make_setup(arch="topk", total_steps=6, checkpoint_every=0,
                                   normalize_activations="expected_average_only_in")
    result = train(sae, batches, cfg, tmp_path / "run")
    assert abs(float(result.state.input_scale) - 1.0) > 0.1  # the trainer really rescaled
    folder = tmp_path / "run" / "final_sae"
    assert json.loads((folder / "cfg.json").read_text())["normalize_activations"] == "none"
    x = make_data(64)
    with torch.no_grad():
        want = sae.eval()(x).recon  # train() leaves the passed SAE folded: it takes raw inputs (issue 24)
        got = saelens.read(folder, "cpu", False).eval()(x).recon  # training-only keys kept as metadata
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="train.normalize_activations"):
        create({"architecture": "topk", "d_in": 8, "d_sae": 16, "k": 2, "normalize_activations": "constant_norm_rescale"})
