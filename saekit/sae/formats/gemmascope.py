"""Gemma Scope `params.npz`: a JumpReLU SAE as numpy arrays W_enc [d_in, d_sae], W_dec [d_sae, d_in],
b_enc [d_sae], b_dec [d_in], threshold [d_sae].

    pre = x @ W_enc + b_enc;  z = pre * 1[pre > threshold] (ReLU'd);  x_hat = z @ W_dec + b_dec

No b_dec is subtracted from the input (as in the Gemma Scope release and SAELens's Gemma Scope loader), so
it loads as saekit `jumprelu` with apply_b_dec_to_input=False. The npz holds no model or hook name; the
folder path is kept in the metadata record. Read with numpy's allow_pickle=False: arrays only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from saekit.errors import CorruptArtifactError
from saekit.sae.base import SparseAutoencoder
from saekit.sae.formats.common import SAEMetadata, build, dtype_name

PARAMS_FILE = "params.npz"
KEYS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")


def is_gemmascope(path: Path) -> bool:
    return (path.is_file() and path.suffix == ".npz") or (path / PARAMS_FILE).is_file()


def read(path: Path, device: str | torch.device = "cpu", strict: bool = True) -> SparseAutoencoder:
    file = path if path.is_file() else path / PARAMS_FILE
    try:
        with np.load(file, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as e:
        raise CorruptArtifactError(f"{file}: expected a numpy .npz archive, could not read it ({e})") from e
    missing = [k for k in KEYS if k not in arrays]
    if missing:
        raise CorruptArtifactError(f"{file}: expected Gemma Scope arrays {list(KEYS)}, missing {missing}; "
                                   f"found {sorted(arrays)}")
    tensors = {k: torch.from_numpy(np.ascontiguousarray(arrays[k])) for k in KEYS}
    extra = {k: arrays[k].tolist() for k in arrays if k not in KEYS}
    d_in, d_sae = tensors["W_enc"].shape
    kw = {"d_in": d_in, "d_sae": d_sae, "dtype": dtype_name(tensors["W_dec"]), "apply_b_dec_to_input": False}
    return build("jumprelu", kw, tensors, SAEMetadata("gemmascope", str(file), extra), device)
