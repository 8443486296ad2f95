"""sparsify (EleutherAI) folders: one sub-folder per hookpoint, each `cfg.json` + `sae.safetensors`.

    pre = ReLU((x - b_dec) @ encoder.weight.T + encoder.bias);  top-k of pre;  x_hat = z @ W_dec + b_dec

which is saekit's `topk` with `W_enc = encoder.weight.T` (top-k then ReLU equals ReLU then top-k). The
hookpoint (the sub-folder's name) becomes `hook_name`. `skip_connection` (an extra linear path x @ W_skip),
`transcode` (the output is another activation) and the `groupmax` activation change the computation and are
refused. `multi_topk`, `normalize_decoder` and `expansion_factor` only shaped training: kept as metadata.
"""

from __future__ import annotations

from pathlib import Path

import torch

from saekit.artifacts import atomic_dir, atomic_write_json, load_tensors, read_json, save_tensors
from saekit.errors import ConfigError
from saekit.sae.base import SparseAutoencoder
from saekit.sae.formats.common import SAEMetadata, build, dtype_name, refuse, unknown_keys

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"
METADATA_KEYS = {"multi_topk", "normalize_decoder", "expansion_factor", "num_latents", "d_in", "k", "activation",
                 "skip_connection", "transcode"}
REFUSED = {"skip_connection": False, "transcode": False}


def is_sparsify(path: Path) -> bool:
    return (path / CFG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


def hookpoints(root: Path) -> list[str]:
    """Sub-folders of a sparsify root that hold one SAE each, in name order."""
    return sorted(p.name for p in root.iterdir() if p.is_dir() and is_sparsify(p)) if root.is_dir() else []


def read(path: Path, device: str | torch.device = "cpu", strict: bool = True) -> SparseAutoencoder:
    cfg = read_json(path / CFG_FILE)
    source = str(path)
    for key, ok in REFUSED.items():
        if cfg.get(key, ok) != ok:
            raise refuse("sparsify", key, cfg[key], repr(ok), source)
    if cfg.get("activation", "topk") != "topk":
        raise refuse("sparsify", "activation", cfg["activation"], "'topk'", source)
    extra = {k: v for k, v in cfg.items() if k in METADATA_KEYS}
    extra |= unknown_keys("sparsify", {k: v for k, v in cfg.items() if k not in METADATA_KEYS}, source, strict)
    raw = load_tensors(path / WEIGHTS_FILE)
    if "W_skip" in raw:
        raise refuse("sparsify", "W_skip", "present", "no skip connection", source)
    tensors = {"W_enc": raw["encoder.weight"].T, "b_enc": raw["encoder.bias"], "W_dec": raw["W_dec"],
               "b_dec": raw["b_dec"]}
    d_sae, d_in = raw["encoder.weight"].shape
    kw = {"d_in": d_in, "d_sae": d_sae, "k": int(cfg["k"]), "dtype": dtype_name(raw["W_dec"]),
          "hook_name": path.name, "apply_b_dec_to_input": True}
    return build("topk", kw, tensors, SAEMetadata("sparsify", source, extra), device)


def write(sae: SparseAutoencoder, path: Path) -> Path:
    """One hookpoint folder (`cfg.json` + `sae.safetensors`) that `SparseCoder.load_from_disk` reads; put
    several under one root, named by hookpoint, for `SparseCoder.load_many`."""
    model = sae.folded_copy() if sae.supports_folding else sae
    cfg = model.cfg
    if model.architecture != "topk" or cfg.batch_topk or not cfg.apply_b_dec_to_input:
        raise ConfigError(f"format 'sparsify': expected a row-wise top-k SAE with apply_b_dec_to_input=True "
                          f"(sparsify has no other architecture), found '{model.architecture}'"
                          f"{' with batch_topk' if getattr(cfg, 'batch_topk', False) else ''}")
    state = model.state_dict()
    tensors = {"encoder.weight": state["W_enc"].T.contiguous(), "encoder.bias": state["b_enc"],
               "W_dec": state["W_dec"], "b_dec": state["b_dec"]}
    out = {"activation": "topk", "expansion_factor": max(cfg.d_sae // cfg.d_in, 1), "normalize_decoder": True,
           "num_latents": cfg.d_sae, "k": cfg.k, "multi_topk": False, "skip_connection": False,
           "transcode": False, "d_in": cfg.d_in}
    with atomic_dir(path) as tmp:
        atomic_write_json(tmp / CFG_FILE, out)
        save_tensors(tmp / WEIGHTS_FILE, {k: v.detach().contiguous() for k, v in tensors.items()})
    return path
