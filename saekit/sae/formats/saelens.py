"""SAELens folders: `cfg.json` + `sae_weights.safetensors` (optional `sparsity.safetensors`).

Read: SAELens 6 files (`architecture` standard | topk | jumprelu | gated, with a nested `metadata`) and the
flat cfg.json of SAELens <= 5 (`activation_fn_str`, `model_name`, ... at the top level). SAELens saves
BatchTopK and Matryoshka-BatchTopK SAEs for inference as `jumprelu` with the BatchTopK threshold copied
to every latent, so they load as saekit `jumprelu` with that threshold. Mapping:

    standard -> relu    topk -> topk    jumprelu -> jumprelu    gated -> gated

`rescale_acts_by_decoder_norm` (top-k on pre-activations times decoder norms) is honoured by folding the
norms into the weights, exactly as SAELens's own inference export does. Per-input normalisations
(`layer_norm`, `constant_norm_rescale`, `covariance_whitening`) and `finetuning_scaling_factor` change the
computation in ways the saekit SAE does not model, and are refused naming the key.

Write: the same layout, SAELens 6 style, for relu, topk (BatchTopK as jumprelu, the way SAELens
saves it), jumprelu, gated and matryoshka. A matryoshka SAE is written as SAELens writes its
`matryoshka_batchtopk` for inference: `jumprelu` with the threshold (BatchTopK) or `topk` (row-wise top-k),
the widths in `metadata.training_architecture_details.matryoshka_widths`; a `topk` folder with that record
and `metadata.training_architecture = "matryoshka_topk"` reads back as saekit `matryoshka`, its levels kept.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from saekit.artifacts import atomic_dir, atomic_write_json, load_tensors, read_json, save_tensors
from saekit.errors import ConfigError
from saekit.sae.base import SparseAutoencoder
from saekit.sae.formats.common import SAEMetadata, build, dtype_name, refuse, unknown_keys

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
ARCHITECTURES = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu", "gated": "gated"}
# top-level keys that describe where the SAE came from or how it was trained, never how it computes
METADATA_KEYS = {
    "metadata", "reshape_activations", "model_name", "hook_name", "hook_layer", "hook_head_index", "context_size",
    "dataset_path", "dataset_trust_remote_code", "prepend_bos", "sae_lens_version", "sae_lens_training_version",
    "model_from_pretrained_kwargs", "seqpos_slice", "neuronpedia_id", "device", "model_class_name",
    "use_sparse_activations", "exclude_special_tokens", "decoder_init_norm", "l1_coefficient", "lp_norm",
    "l1_warm_up_steps", "aux_loss_coefficient", "topk_threshold_lr", "matryoshka_widths",
    "use_matryoshka_aux_loss", "jumprelu_init_threshold", "jumprelu_bandwidth", "jumprelu_sparsity_loss_mode",
    "l0_coefficient", "l0_warm_up_steps", "pre_act_loss_coefficient", "jumprelu_tanh_scale",
    "jumprelu_ste_to_input", "normalize_sae_decoder", "noise_scale", "decoder_orthogonal_init",
    "init_encoder_as_decoder_transpose", "scale_sparsity_penalty_by_decoder_norm", "sae_lens_training_version",
}
HANDLED_KEYS = {"architecture", "d_in", "d_sae", "dtype", "apply_b_dec_to_input", "normalize_activations", "k",
                "rescale_acts_by_decoder_norm", "activation_fn_str", "activation_fn_kwargs",
                "finetuning_scaling_factor"}
SAEKIT_META = ("model_name", "hook_name", "hook_layer", "context_size", "dataset_path")
HONOURED_NORMS = ("none", "expected_average_only_in")
MATRYOSHKA_TOPK = "matryoshka_topk"  # saekit's name for a row-wise top-k matryoshka (SAELens trains BatchTopK only)  # SAELens inference applies no per-input map for these


def is_saelens(path: Path) -> bool:
    return (path / CFG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


def read(path: Path, device: str | torch.device = "cpu", strict: bool = True) -> SparseAutoencoder:
    cfg = read_json(path / CFG_FILE)
    tensors = load_tensors(path / WEIGHTS_FILE)
    source = str(path)
    arch = _architecture(cfg, tensors, source)
    _check_computation_keys(cfg, source)
    extra = {k: cfg[k] for k in cfg if k in METADATA_KEYS}
    extra |= unknown_keys("SAELens", {k: v for k, v in cfg.items() if k not in METADATA_KEYS | HANDLED_KEYS},
                          source, strict)
    if (path / "sparsity.safetensors").is_file():
        extra["log_feature_sparsity"] = load_tensors(path / "sparsity.safetensors").get("sparsity")
    kw = _saekit_config(cfg, arch, tensors)
    if cfg.get("rescale_acts_by_decoder_norm"):
        tensors = fold_decoder_norms(tensors)
    return build(arch, kw, tensors, SAEMetadata("saelens", source, extra), device)


def _architecture(cfg: dict, tensors: dict, source: str) -> str:
    name = cfg.get("architecture", "standard")
    if name == "standard" and cfg.get("activation_fn_str", "relu") == "topk":
        return "topk"  # SAELens <= 5 wrote top-k SAEs as 'standard' with activation_fn_str='topk'
    if name in ("batchtopk", "matryoshka_batchtopk") and "threshold" in tensors:
        return "jumprelu"
    if name == "topk" and _matryoshka_widths(cfg) is not None:
        return "matryoshka"
    if name not in ARCHITECTURES:
        raise refuse("SAELens", "architecture", name, f"one of {sorted(ARCHITECTURES)} (BatchTopK saved for "
                     "inference, i.e. as jumprelu)", source)
    act = cfg.get("activation_fn_str", "relu")
    if name in ("standard", "jumprelu", "gated") and act != "relu":
        raise refuse("SAELens", "activation_fn_str", act, "'relu'", source)
    return ARCHITECTURES[name]


def _check_computation_keys(cfg: dict, source: str) -> None:
    norm = cfg.get("normalize_activations", "none")
    if norm not in HONOURED_NORMS:
        raise refuse("SAELens", "normalize_activations", norm, f"one of {list(HONOURED_NORMS)}", source)
    if cfg.get("finetuning_scaling_factor"):
        raise refuse("SAELens", "finetuning_scaling_factor", cfg["finetuning_scaling_factor"], "false", source)


def _saekit_config(cfg: dict, arch: str, tensors: dict) -> dict[str, Any]:
    meta = dict(cfg) | dict(cfg.get("metadata") or {})
    kw: dict[str, Any] = {"d_in": cfg["d_in"], "d_sae": cfg["d_sae"], "dtype": dtype_name(tensors["W_dec"]),
                          "apply_b_dec_to_input": bool(cfg.get("apply_b_dec_to_input", True))}
    for key in SAEKIT_META:
        if meta.get(key) is not None:
            kw[key] = meta[key]
    if arch in ("topk", "matryoshka"):
        kw["k"] = int(cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k"))
    if arch == "matryoshka":
        kw["matryoshka_widths"] = _matryoshka_widths(cfg)
    return kw


def _matryoshka_widths(cfg: dict) -> list[int] | None:
    """The widths of a row-wise top-k matryoshka SAE saekit wrote (None for anything else)."""
    meta = cfg.get("metadata") or {}
    if meta.get("training_architecture") != MATRYOSHKA_TOPK:
        return None
    return (meta.get("training_architecture_details") or {}).get("matryoshka_widths")


def fold_decoder_norms(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SAELens top-k with rescale_acts_by_decoder_norm: pre * |W_dec_j| selects the top k and decode divides
    by |W_dec_j|; multiplying W_enc's columns and b_enc by the norms and dividing W_dec's rows gives the same
    codes and reconstruction with a plain top-k (SAELens's own `_fold_norm_topk`)."""
    n_F = tensors["W_dec"].norm(dim=-1).clamp(min=1e-8)
    out = dict(tensors)
    out["W_enc"] = tensors["W_enc"] * n_F
    out["b_enc"] = tensors["b_enc"] * n_F
    out["W_dec"] = tensors["W_dec"] / n_F[:, None]
    return out


# -- writing ---------------------------------------------------------------------------------------------
def write(sae: SparseAutoencoder, path: Path) -> Path:
    """Write a folder SAELens 6 loads with `SAE.load_from_disk` (normalisation folded first)."""
    model = sae.folded_copy() if sae.supports_folding else sae
    name, tensors, extra_cfg = _saelens_state(model)
    cfg = model.cfg
    meta = dict(getattr(getattr(sae, "metadata", None), "extra", {}).get("metadata") or {})
    meta |= _training_record(model)
    for key in SAEKIT_META:
        value = getattr(cfg, key, None)
        if value not in (None, "", -1, 0) or key not in meta:
            meta[key] = value
    out = {"architecture": name, "d_in": cfg.d_in, "d_sae": cfg.d_sae, "dtype": cfg.dtype, "device": "cpu",
           "apply_b_dec_to_input": bool(getattr(cfg, "apply_b_dec_to_input", True)),
           "normalize_activations": "none", "reshape_activations": _reshape(sae), "metadata": meta} | extra_cfg
    with atomic_dir(path) as tmp:
        atomic_write_json(tmp / CFG_FILE, out)
        save_tensors(tmp / WEIGHTS_FILE, {k: v.detach().contiguous() for k, v in tensors.items()})
    return path


def _training_record(sae: SparseAutoencoder) -> dict[str, Any]:
    """SAELens's record of how an exported SAE was trained, for matryoshka SAEs (their widths)."""
    if sae.architecture != "matryoshka":
        return {}
    name = "matryoshka_batchtopk" if sae.cfg.batch_topk else MATRYOSHKA_TOPK
    return {"training_architecture": name,
            "training_architecture_details": {"k": sae.cfg.k, "matryoshka_widths": sae.cfg.widths}}


def _reshape(sae: SparseAutoencoder) -> str:
    return getattr(getattr(sae, "metadata", None), "extra", {}).get("reshape_activations", "none")


def _saelens_state(sae: SparseAutoencoder) -> tuple[str, dict[str, torch.Tensor], dict[str, Any]]:
    arch = sae.architecture
    state = {k: v for k, v in sae.state_dict().items()}
    if arch == "relu":
        return "standard", state, {}
    if arch == "jumprelu":
        return "jumprelu", state, {}
    if arch == "gated":
        return "gated", state, {}
    if arch in ("topk", "matryoshka") and not sae.cfg.batch_topk:
        return "topk", state, {"k": sae.cfg.k, "rescale_acts_by_decoder_norm": False}
    if arch in ("topk", "matryoshka"):
        thr = float(state.pop("threshold"))
        if thr < 0:
            raise ConfigError(f"{arch}: expected a BatchTopK SAE with an estimated inference threshold (>= 0) "
                              f"to write as SAELens jumprelu, found threshold={thr}")
        state["threshold"] = torch.full_like(state["b_enc"], thr)  # as SAELens saves BatchTopK for inference
        return "jumprelu", state, {}
    raise ConfigError(f"format 'saelens': expected an architecture SAELens has (relu, topk, jumprelu, gated, "
                      f"matryoshka), found '{arch}'")
