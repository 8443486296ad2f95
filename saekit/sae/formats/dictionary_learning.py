"""dictionary_learning (saprmarks) files: `ae.pt` (a state dict) + `config.json` ({"trainer": {...}}).

`ae.pt` is read with `torch.load(weights_only=True)`: tensors only, never arbitrary pickled objects. The
class is `config.json`'s trainer.dict_class (or, without a config, inferred from the tensor names):

    AutoEncoder         relu(encoder(x - bias)), decoder(f) + bias               -> relu
    AutoEncoderTopK     top-k of relu(encoder(x - b_dec)), decoder(f) + b_dec     -> topk
    BatchTopKSAE        inference: relu(pre) kept where > threshold (a scalar)   -> topk, batch_topk, threshold
    JumpReluAutoEncoder relu(pre * 1[pre > threshold]), pre = x @ W_enc + b_enc   -> jumprelu (no b_dec on input)
    MatryoshkaBatchTopKSAE  as BatchTopKSAE, W_enc/W_dec named as JumpReLU's     -> topk, batch_topk, threshold
    GatedAutoEncoder    gate 1[enc(x - b) + gate_bias > 0] * ReLU(exp(r_mag) enc(x - b) + mag_bias) -> gated

Why BatchTopK is never read as plain ReLU (a bug another library shipped): its inference threshold is
kept as saekit's BatchTopK threshold, and a threshold that was never estimated (< 0), with which
dictionary_learning would keep every positive latent, is refused. The trainer config (lm_name, layer,
submodule_name, learning rates, `norm_factor`, which trainSAE folds into the saved weights) is metadata.
"""

from __future__ import annotations

from pathlib import Path

import torch

from saekit.artifacts import read_json
from saekit.errors import ConfigError, CorruptArtifactError
from saekit.sae.base import SparseAutoencoder
from saekit.sae.formats.common import SAEMetadata, build, dtype_name, refuse

WEIGHTS_FILE = "ae.pt"
CONFIG_FILE = "config.json"
CLASSES = ("AutoEncoder", "AutoEncoderTopK", "BatchTopKSAE", "JumpReluAutoEncoder", "MatryoshkaBatchTopKSAE",
           "GatedAutoEncoder")


def is_dictionary_learning(path: Path) -> bool:
    return (path.is_file() and path.name.endswith(".pt")) or (path / WEIGHTS_FILE).is_file()


def read(path: Path, device: str | torch.device = "cpu", strict: bool = True) -> SparseAutoencoder:
    file = path if path.is_file() else path / WEIGHTS_FILE
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)  # noqa: TID251 - tensors only
    except Exception as e:  # weights_only refuses pickled objects: say so instead of a pickle traceback
        raise CorruptArtifactError(f"{file}: expected a state dict of tensors readable with "
                                   f"torch.load(weights_only=True), could not read it ({e})") from e
    cfg_file = file.parent / CONFIG_FILE
    config = read_json(cfg_file) if cfg_file.is_file() else {}
    trainer = dict(config.get("trainer") or {})
    dict_class = trainer.get("dict_class") or _class_from_keys(state, str(file))
    if dict_class not in CLASSES:
        raise refuse("dictionary_learning", "dict_class", dict_class, f"one of {list(CLASSES)}", str(file))
    arch, tensors, kw = _convert(dict_class, state, str(file))
    kw |= _metadata_fields(trainer)
    meta = SAEMetadata("dictionary_learning", str(file), {"dict_class": dict_class} | config)
    return build(arch, kw, tensors, meta, device)


def _class_from_keys(state: dict, source: str) -> str:
    keys = set(state)
    if {"W_enc", "group_sizes"} <= keys:
        return "MatryoshkaBatchTopKSAE"
    if {"W_enc", "threshold"} <= keys:
        return "JumpReluAutoEncoder"
    if {"encoder.weight", "gate_bias", "mag_bias"} <= keys:
        return "GatedAutoEncoder"
    if {"encoder.weight", "bias"} <= keys:
        return "AutoEncoder"
    if {"encoder.weight", "k", "threshold"} <= keys:
        raise ConfigError(f"{source}: a top-k state dict without config.json: expected config.json's "
                          f"trainer.dict_class to tell AutoEncoderTopK from BatchTopKSAE, found none")
    raise ConfigError(f"{source}: expected the tensors of one of {list(CLASSES)}, found {sorted(keys)}")


def _convert(dict_class: str, s: dict, source: str) -> tuple[str, dict, dict]:
    if dict_class == "JumpReluAutoEncoder":
        d_in, d_sae = s["W_enc"].shape
        tensors = {k: s[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")}
        return "jumprelu", tensors, _dims(d_in, d_sae, s["W_dec"]) | {"apply_b_dec_to_input": False}
    if dict_class == "MatryoshkaBatchTopKSAE":  # all groups active once loaded: a BatchTopK SAE
        d_in, d_sae = s["W_enc"].shape
        enc = {k: s[k] for k in ("W_enc", "b_enc", "W_dec")}
        return _batch_topk(enc, s, _dims(d_in, d_sae, s["b_dec"]) | {"k": int(s["k"])}, source)
    d_sae, d_in = s["encoder.weight"].shape
    if dict_class == "GatedAutoEncoder":
        tensors = {"W_enc": s["encoder.weight"].T, "W_dec": s["decoder.weight"].T, "b_dec": s["decoder_bias"],
                   "b_gate": s["gate_bias"], "b_mag": s["mag_bias"], "r_mag": s["r_mag"]}
        return "gated", tensors, _dims(d_in, d_sae, s["decoder_bias"]) | {"apply_b_dec_to_input": True}
    enc = {"W_enc": s["encoder.weight"].T, "b_enc": s["encoder.bias"], "W_dec": s["decoder.weight"].T}
    if dict_class == "AutoEncoder":
        return "relu", enc | {"b_dec": s["bias"]}, _dims(d_in, d_sae, s["bias"]) | {"apply_b_dec_to_input": True}
    kw = _dims(d_in, d_sae, s["b_dec"]) | {"k": int(s["k"]), "apply_b_dec_to_input": True}
    if dict_class == "AutoEncoderTopK":  # its default encode is the row-wise top-k; the threshold is unused
        return "topk", enc | {"b_dec": s["b_dec"]}, kw
    return _batch_topk(enc, s, kw, source)


def _batch_topk(enc: dict, s: dict, kw: dict, source: str) -> tuple[str, dict, dict]:
    threshold = s["threshold"].reshape(())
    if float(threshold) < 0:
        raise refuse("dictionary_learning", "threshold", float(threshold), "an estimated BatchTopK inference "
                     "threshold >= 0 (dictionary_learning would keep every positive latent)", source)
    tensors = enc | {"b_dec": s["b_dec"], "threshold": threshold.to(torch.float32)}
    return "topk", tensors, kw | {"apply_b_dec_to_input": True, "batch_topk": True}


def _dims(d_in: int, d_sae: int, like: torch.Tensor) -> dict:
    return {"d_in": int(d_in), "d_sae": int(d_sae), "dtype": dtype_name(like)}


def _metadata_fields(trainer: dict) -> dict:
    out = {}
    if trainer.get("lm_name"):
        out["model_name"] = str(trainer["lm_name"])
    if trainer.get("submodule_name"):
        out["hook_name"] = str(trainer["submodule_name"])
    if isinstance(trainer.get("layer"), int):
        out["hook_layer"] = trainer["layer"]
    return out
