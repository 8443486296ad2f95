"""Make tiny SAE files with the peers' own code, plus the peers' own outputs on fixed inputs.

Run by scripts/make_interop_fixtures.sh inside a throwaway venv that has sae-lens, eai-sparsify and
dictionary-learning (they cannot share saekit's venv). Nothing here is imported by saekit.

Layout written under OUT (default tests/fixtures/interop):
    saelens/<name>/            cfg.json + sae_weights.safetensors, written by SAELens save_model /
                               save_inference_model
    sparsify/<name>/<hookpoint>/  cfg.json + sae.safetensors, written by SparseCoder.save_to_disk
    dictionary_learning/<name>/   ae.pt + config.json, written as dictionary_learning.training does
    gemmascope/<name>/params.npz  numpy arrays in Gemma Scope's layout
    reference/<name>.safetensors  x [N, d_in], codes [N, d_sae] (dense), recon [N, d_in]: the peer's
                               encode(x) and decode(encode(x)) after loading the files with the peer's
                               own loader
    index.json                 name -> folder, format, expectations, peer versions
    saelens_roundtrip.json     written by `check-roundtrip`: whether SAELens loads saekit-written files
"""

from __future__ import annotations

import importlib.metadata as md
import json
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

D_IN, D_SAE, K, N = 16, 32, 4, 24
OUT = Path(sys.argv[2]) if len(sys.argv) > 2 else Path("tests/fixtures/interop")
GEN = torch.Generator().manual_seed(0)
INDEX: dict[str, dict] = {}


def rnd(*shape, scale=1.0):
    return torch.randn(*shape, generator=GEN) * scale


def inputs() -> torch.Tensor:
    return torch.randn(N, D_IN, generator=torch.Generator().manual_seed(123)) * 2.0


@torch.no_grad()
def randomise_(module: torch.nn.Module, thresholds=("threshold",)) -> None:
    """Non-trivial weights: random matrices, random biases, positive thresholds so some latents are off."""
    for name, p in module.named_parameters():
        leaf = name.split(".")[-1]
        if leaf in thresholds:
            p.copy_(rnd(*p.shape).abs() * 0.6 + 0.2)
        elif p.ndim >= 2:
            p.copy_(rnd(*p.shape, scale=0.4))
        else:
            p.copy_(rnd(*p.shape, scale=0.3))


def save_reference(name: str, x: torch.Tensor, codes: torch.Tensor, recon: torch.Tensor) -> None:
    (OUT / "reference").mkdir(parents=True, exist_ok=True)
    save_file({"x": x.contiguous(), "codes": codes.contiguous(), "recon": recon.contiguous()},
              str(OUT / "reference" / f"{name}.safetensors"))


# -- SAELens ----------------------------------------------------------------------------------------
def saelens_fixtures() -> None:
    from sae_lens import SAE
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.gated_sae import GatedSAE, GatedSAEConfig
    from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
    from sae_lens.saes.matryoshka_batchtopk_sae import (MatryoshkaBatchTopKTrainingSAE,
                                                        MatryoshkaBatchTopKTrainingSAEConfig)
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    def meta():
        return SAEMetadata(model_name="toy-model", hook_name="blocks.1.hook_resid_post", hook_layer=1,
                           context_size=16, prepend_bos=True,
                           model_from_pretrained_kwargs={"center_writing_weights": False})

    def base(**kw):
        return {"d_in": D_IN, "d_sae": D_SAE, "metadata": meta()} | kw

    made = {
        "standard": (StandardSAE(StandardSAEConfig(**base())), "relu", False),
        "standard_no_bdec": (StandardSAE(StandardSAEConfig(**base(apply_b_dec_to_input=False))), "relu", False),
        "topk": (TopKSAE(TopKSAEConfig(**base(k=K))), "topk", False),
        "topk_rescaled": (TopKSAE(TopKSAEConfig(**base(k=K, rescale_acts_by_decoder_norm=True))), "topk", False),
        "jumprelu": (JumpReLUSAE(JumpReLUSAEConfig(**base())), "jumprelu", False),
        "gated": (GatedSAE(GatedSAEConfig(**base())), "gated", False),
        "batchtopk": (BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(**base(k=K))), "jumprelu", True),
        "matryoshka_batchtopk": (MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(
            **base(k=K, matryoshka_widths=[8, D_SAE]))), "jumprelu", True),
        "standard_layer_norm": (StandardSAE(StandardSAEConfig(**base(normalize_activations="layer_norm"))),
                                None, False),
    }
    for name, (sae, arch, training) in made.items():
        randomise_(sae)
        if training:  # the BatchTopK inference threshold is a buffer; give it a real positive value
            sae.topk_threshold.fill_(0.5)
        folder = OUT / "saelens" / name
        (sae.save_inference_model if training else sae.save_model)(folder)
        loaded = SAE.load_from_disk(str(folder))
        x = inputs()
        with torch.no_grad():
            codes = loaded.encode(x)
            recon = loaded.decode(codes)
        save_reference(f"saelens_{name}", x, codes, recon)
        INDEX[f"saelens_{name}"] = {"format": "saelens", "path": f"saelens/{name}", "saekit_architecture": arch,
                                    "peer_class": type(sae).__name__, "refused_key": None if arch else
                                    "normalize_activations"}


# -- sparsify ---------------------------------------------------------------------------------------
def sparsify_fixtures() -> None:
    from sparsify import SparseCoder, SparseCoderConfig

    def make(folder: Path, hookpoint: str, **cfg) -> SparseCoder:
        sae = SparseCoder(D_IN, SparseCoderConfig(num_latents=D_SAE, k=K, **cfg), device="cpu")
        randomise_(sae)
        sae.save_to_disk(folder / hookpoint)
        return sae

    root = OUT / "sparsify" / "toy"
    for hookpoint in ("layers.0", "layers.1"):
        make(root, hookpoint)
    for name, coders in SparseCoder.load_many(str(root), local=True).items():
        x = inputs()
        with torch.no_grad():
            top_acts, top_idx, _ = coders.encode(x)
            codes = torch.zeros(N, D_SAE).scatter_(1, top_idx, top_acts)
            recon = coders.decode(top_acts, top_idx)
        save_reference(f"sparsify_{name}", x, codes, recon)
        INDEX[f"sparsify_{name}"] = {"format": "sparsify", "path": f"sparsify/toy/{name}", "saekit_architecture":
                                     "topk", "hookpoint": name, "refused_key": None}
    for key in ("skip_connection", "transcode"):
        make(OUT / "sparsify" / key, "layers.0", **{key: True})
        INDEX[f"sparsify_{key}"] = {"format": "sparsify", "path": f"sparsify/{key}/layers.0",
                                    "saekit_architecture": None, "refused_key": key}


# -- dictionary_learning -----------------------------------------------------------------------------
def dictionary_learning_fixtures() -> None:
    """Trained for a few steps by dictionary_learning's own trainSAE (which writes ae.pt + config.json),
    then biases and thresholds randomised (re-saved the same way) so that nothing is at its init."""
    from dictionary_learning.dictionary import AutoEncoder, GatedAutoEncoder, JumpReluAutoEncoder
    from dictionary_learning.trainers.batch_top_k import BatchTopKSAE, BatchTopKTrainer
    from dictionary_learning.trainers.gdm import GatedSAETrainer
    from dictionary_learning.trainers.jumprelu import JumpReluTrainer
    from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKSAE, MatryoshkaBatchTopKTrainer
    from dictionary_learning.trainers.standard import StandardTrainer
    from dictionary_learning.trainers.top_k import AutoEncoderTopK, TopKTrainer
    from dictionary_learning.training import trainSAE

    common = {"activation_dim": D_IN, "dict_size": D_SAE, "layer": 1, "lm_name": "toy-model", "device": "cpu",
              "submodule_name": "resid_post_layer_1"}
    configs = {
        "relu": ({"trainer": StandardTrainer, "dict_class": AutoEncoder, "lr": 1e-3, "l1_penalty": 0.1,
                  "warmup_steps": 1, "sparsity_warmup_steps": 1, "resample_steps": None}, AutoEncoder, "relu"),
        "topk": ({"trainer": TopKTrainer, "dict_class": AutoEncoderTopK, "k": K, "threshold_start_step": 0,
                  "warmup_steps": 1}, AutoEncoderTopK, "topk"),
        "batchtopk": ({"trainer": BatchTopKTrainer, "dict_class": BatchTopKSAE, "k": K, "threshold_start_step": 0,
                       "warmup_steps": 1}, BatchTopKSAE, "topk"),
        "jumprelu": ({"trainer": JumpReluTrainer, "dict_class": JumpReluAutoEncoder, "lr": 1e-3,
                      "warmup_steps": 1, "sparsity_warmup_steps": 1}, JumpReluAutoEncoder, "jumprelu"),
        "matryoshka_batchtopk": ({"trainer": MatryoshkaBatchTopKTrainer, "dict_class": MatryoshkaBatchTopKSAE,
                                  "k": K, "group_fractions": [0.25, 0.75], "threshold_start_step": 0,
                                  "warmup_steps": 1}, MatryoshkaBatchTopKSAE, "topk"),
        "gated": ({"trainer": GatedSAETrainer, "dict_class": GatedAutoEncoder, "lr": 1e-3, "warmup_steps": 1,
                   "sparsity_warmup_steps": 1}, GatedAutoEncoder, "gated"),
    }
    steps = 20
    data = (torch.randn(64, D_IN, generator=torch.Generator().manual_seed(s)) for s in range(10_000))
    for name, (tcfg, cls, arch) in configs.items():
        folder = OUT / "dictionary_learning" / name
        tcfg = common | {"steps": steps} | tcfg
        trainSAE(data=data, trainer_configs=[tcfg], steps=steps, save_dir=str(folder), device="cpu")
        run = folder / "trainer_0"
        state = torch.load(run / "ae.pt", weights_only=True)  # noqa: TID251 - tensors only
        for key in ("b_dec", "bias", "encoder.bias", "b_enc", "decoder_bias", "gate_bias", "mag_bias", "r_mag"):
            if key in state:
                state[key] = state[key] + rnd(*state[key].shape, scale=0.3)
        if name == "jumprelu":
            state["threshold"] = rnd(D_SAE).abs() * 0.6 + 0.2
        if name in ("topk", "batchtopk", "matryoshka_batchtopk"):
            state["threshold"] = torch.tensor(max(float(state["threshold"]), 0.1))
        torch.save(state, run / "ae.pt")
        ae = _dl_load(cls, run / "ae.pt")
        x = inputs()
        with torch.no_grad():
            codes = ae.encode(x, use_threshold=True) if "batchtopk" in name else ae.encode(x)
            recon = ae.decode(codes)
        save_reference(f"dictionary_learning_{name}", x, codes, recon)
        INDEX[f"dictionary_learning_{name}"] = {"format": "dictionary_learning", "path":
                                                f"dictionary_learning/{name}/trainer_0", "saekit_architecture":
                                                arch, "peer_class": cls.__name__, "refused_key": None}


def _dl_load(cls, path: Path):
    """dictionary_learning's from_pretrained, except AutoEncoder's default of renormalising the decoder
    (which changes the weights on load) is turned off so the reference is the file as saved."""
    from dictionary_learning.dictionary import AutoEncoder

    if cls is AutoEncoder:
        return cls.from_pretrained(str(path), normalize_decoder=False)
    return cls.from_pretrained(str(path))


# -- Gemma Scope -----------------------------------------------------------------------------------------
def gemmascope_fixture() -> None:
    """params.npz in Gemma Scope's layout; the reference is SAELens's JumpReLU SAE built from the same
    arrays (apply_b_dec_to_input=False, as SAELens's own Gemma Scope loader sets)."""
    from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig

    params = {"W_enc": rnd(D_IN, D_SAE, scale=0.4), "W_dec": rnd(D_SAE, D_IN, scale=0.4),
              "b_enc": rnd(D_SAE, scale=0.3), "b_dec": rnd(D_IN, scale=0.3),
              "threshold": rnd(D_SAE).abs() * 0.6 + 0.2}
    folder = OUT / "gemmascope" / "layer_1_width_32_average_l0_5"
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "params.npz", **{k: v.numpy().astype(np.float32) for k, v in params.items()})
    loaded = {k: torch.from_numpy(v) for k, v in np.load(folder / "params.npz").items()}
    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE, apply_b_dec_to_input=False))
    sae.load_state_dict(loaded)
    x = inputs()
    with torch.no_grad():
        codes = sae.encode(x)
        recon = sae.decode(codes)
    save_reference("gemmascope", x, codes, recon)
    INDEX["gemmascope"] = {"format": "gemmascope", "path": "gemmascope/layer_1_width_32_average_l0_5",
                           "saekit_architecture": "jumprelu", "refused_key": None}


def versions() -> dict:
    return {p: md.version(p) for p in ("torch", "sae-lens", "eai-sparsify", "dictionary-learning", "numpy")}


def make() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)  # the peers initialise from the global generator: same files on every run
    saelens_fixtures()
    sparsify_fixtures()
    dictionary_learning_fixtures()
    gemmascope_fixture()
    index = {"d_in": D_IN, "d_sae": D_SAE, "n_rows": N, "peer_versions": versions(), "fixtures": INDEX}
    (OUT / "index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def check_roundtrip(folder: Path) -> None:
    """Load each saekit-written SAELens folder under `folder` with SAELens, compare with the peer reference
    stored next to it (reference.safetensors: x, codes, recon) and record the result."""
    from sae_lens import SAE

    results = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        ref = load_file(str(sub / "reference.safetensors"))
        try:
            sae = SAE.load_from_disk(str(sub / "sae"))
            with torch.no_grad():
                codes = sae.encode(ref["x"])
                recon = sae.decode(codes)
            err = max(float((codes - ref["codes"]).abs().max()), float((recon - ref["recon"]).abs().max()))
            results[sub.name] = {"loaded": True, "sae_lens_class": type(sae).__name__, "max_abs_err": err,
                                 "ok": err <= 1e-5}
        except Exception as e:  # recorded, not hidden: the JSON says which file SAELens refused and why
            results[sub.name] = {"loaded": False, "error": f"{type(e).__name__}: {e}", "ok": False}
    out = {"sae_lens_version": md.version("sae-lens"), "results": results}
    (OUT / "saelens_roundtrip.json").write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    cmd = sys.argv[1] if len(sys.argv) > 1 else "make"
    if cmd == "make":
        make()
    elif cmd == "check-roundtrip":
        check_roundtrip(Path(sys.argv[3]))
    else:
        raise SystemExit(f"usage: {sys.argv[0]} make|check-roundtrip [OUT] [FOLDER]")
