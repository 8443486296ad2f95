"""The preflight: before an SAE reads a store (or steers a model), check that it was made for them.

Why: an SAE applied to activations it was not trained on computes numbers that look like results — a
dictionary_learning SAE on the wrong layer, a SAELens SAE on another model, an SAE that expects inputs
scaled to a fixed norm. Peers' users were hurt by exactly this, silently. So whenever an SAE meets a
store or a model (eval, probe, steer, analyze), four facts are checked, each failure a named error that
names both sides:

    d_in        SAE cfg.d_in == store d_in                  always (DInMismatchError, a ShapeMismatchError)
    model       SAE model_name ~ store's source model       ModelMismatchError; `force` accepts an alias
    hook        SAE hook_name ~ store hook                  HookMismatchError (same (layer, site) in another
                                                            naming convention agrees: see sources.hooks)
    first FVU   FVU of the SAE on the store's first rows    InputMismatchError when > 1 (worse than the mean)

A name the SAE does not carry (a Gemma Scope npz has no model or hook) is a warning, not a refusal: the
FVU still guards the inputs. `force` never skips d_in or the FVU, and what it overrode is recorded in the
returned `Preflight`, which the stages put into their reports.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from saekit.errors import DInMismatchError, HookMismatchError, InputMismatchError, ModelMismatchError
from saekit.eval.reconstruction import fvu
from saekit.sae.base import SparseAutoencoder, inference_mode
from saekit.sources.hooks import hook_site
from saekit.store.reader import ActivationStore

log = logging.getLogger(__name__)

PREFLIGHT_ROWS = 2048
"""Rows from the start of the store the first FVU is measured on (enough for a stable estimate, cheap)."""
MAX_FVU = 1.0


@dataclass
class Preflight:
    """What the preflight compared and found; `forced` lists the checks `force` overrode."""

    sae: str
    store: str
    d_in: int
    sae_model: str
    store_model: str
    sae_hook: str
    store_hook: str
    hook_match: str
    rows: int
    fvu: float | None
    warnings: list[str] = field(default_factory=list)
    forced: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """One line for the CLI: the first FVU, and what was warned about or forced."""
        fvu_text = "n/a" if self.fvu is None else f"{self.fvu:.4g}"
        line = f"preflight: FVU {fvu_text} on the first {self.rows} rows of {self.store}; hook {self.hook_match}"
        if self.forced:
            line += f"; FORCED past: {', '.join(self.forced)}"
        return line + "".join(f"\n  warning: {w}" for w in self.warnings)


def describe(sae: SparseAutoencoder) -> str:
    """How the messages name an SAE: its origin (format and path) when loaded from another tool's files."""
    meta = getattr(sae, "metadata", None)
    if meta is not None:
        return f"{meta.format} SAE {meta.source}"
    return f"{sae.architecture} SAE"


def preflight(sae: SparseAutoencoder, store: ActivationStore, force: bool = False,
              rows: int = PREFLIGHT_ROWS) -> Preflight:
    """Check `sae` against `store` (d_in, model, hook, first FVU); raise a named error or return the record."""
    check_d_in(sae, store)
    record = Preflight(sae=describe(sae), store=str(store.path), d_in=store.d_in,
                       sae_model=sae.cfg.model_name, store_model=str(store.manifest.source.get("model") or ""),
                       sae_hook=sae.cfg.hook_name, store_hook=store.hook, hook_match="", rows=0, fvu=None)
    check_model(record, force)
    check_hook(record, sae.cfg.hook_layer)
    first_fvu(sae, store, record, rows)
    for w in record.warnings:
        log.warning("preflight: %s", w)
    return record


def check_d_in(sae: SparseAutoencoder, store: ActivationStore) -> None:
    if sae.cfg.d_in != store.d_in:
        raise DInMismatchError(f"preflight: the {describe(sae)} expects d_in={sae.cfg.d_in} (its cfg.d_in), the "
                                 f"store {store.path} holds d_in={store.d_in} (hook '{store.hook}', model "
                                 f"'{store.manifest.source.get('model')}'); an SAE only reads activations of its width")


def same_model(a: str, b: str) -> bool:
    """Equal names, or the same last path component (a hub id `org/name` and a local folder `.../name`)."""
    key = lambda s: Path(str(s).rstrip("/")).name.lower()  # noqa: E731
    return a == b or key(a) == key(b)


def check_model(record: Preflight, force: bool) -> None:
    """The SAE's model against the store's (or the loaded model's) name; `force` accepts an alias."""
    if not record.sae_model:
        record.warnings.append(f"the {record.sae} names no model; cannot check it was made for "
                               f"'{record.store_model}' (the first FVU still checks the inputs)")
        return
    if not record.store_model or same_model(record.sae_model, record.store_model):
        return
    if force:
        record.forced.append(f"model '{record.sae_model}' (SAE) vs '{record.store_model}' (store)")
        return
    raise ModelMismatchError(f"preflight: the {record.sae} was made for model '{record.sae_model}' (its model_name), "
                             f"the store {record.store} holds activations of model '{record.store_model}' (its "
                             f"manifest's source.model); if both name the same model, pass --force (force=True)")


def check_hook(record: Preflight, sae_layer: int = -1) -> None:
    """The SAE's hook against the store's: equal, or the same (layer, site) under two naming conventions."""
    sae_hook, store_hook = record.sae_hook, record.store_hook
    store_site = hook_site(store_hook) if store_hook else None
    if sae_hook and sae_hook == store_hook:
        record.hook_match = "same name"
        return
    if not sae_hook or not store_hook:
        record.hook_match = _layer_only(record, sae_layer, store_site)
        return
    sae_site = hook_site(sae_hook)
    if sae_site is not None and sae_site == store_site:
        record.hook_match = f"same activation (layer {sae_site[0]} {sae_site[1]})"
        return
    raise HookMismatchError(f"preflight: the {record.sae} reads hook '{sae_hook}' ({_site_text(sae_site)}), the "
                            f"store {record.store} holds hook '{store_hook}' ({_site_text(store_site)}); cache the "
                            f"SAE's hook point, or open the store of that hook")


def check_model_hook(record: Preflight, hook: str) -> None:
    """A hook the SAE is about to be applied at in a model (steering's `--hook`) against the hook it was
    checked for: its own hook name, or the store's when it names none (where the first FVU was measured)."""
    checked = record.sae_hook or record.store_hook
    site = hook_site(checked) if checked else None
    if not checked or hook == checked or (site is not None and site == hook_site(hook)):
        return
    raise HookMismatchError(f"preflight: the {record.sae} was checked for hook '{checked}' ({_site_text(site)}), "
                            f"it would be applied in the model at '{hook}' ({_site_text(hook_site(hook))}); "
                            f"leave the hook out to use the SAE's own")


def _layer_only(record: Preflight, sae_layer: int, store_site: tuple[int, str] | None) -> str:
    """No hook name on one side: compare the SAE's layer when both sides know one, else warn."""
    if sae_layer >= 0 and store_site is not None and sae_layer != store_site[0]:
        raise HookMismatchError(f"preflight: the {record.sae} was made for layer {sae_layer} (its hook_layer; it names "
                                f"no hook), the store {record.store} holds hook '{record.store_hook}' "
                                f"(layer {store_site[0]})")
    side = "store" if record.sae_hook else record.sae
    record.warnings.append(f"the {side} names no hook point; cannot check that the SAE reads "
                           f"'{record.store_hook or record.sae_hook}' (the first FVU still checks the inputs)")
    return "unchecked (no hook name)"


def _site_text(site: tuple[int, str] | None) -> str:
    return f"layer {site[0]} {site[1]}" if site else "naming convention not recognised"


def first_fvu(sae: SparseAutoencoder, store: ActivationStore, record: Preflight, rows: int) -> None:
    """FVU of the SAE on the store's first rows; > 1 (worse than predicting their mean) raises."""
    n = min(rows, len(store))
    record.rows = n
    if n < 2:
        record.warnings.append(f"the store holds {n} rows; no first FVU measured")
        return
    param = next(sae.parameters(), None)
    x_ND = store[:n].to(device=param.device if param is not None else "cpu",
                        dtype=sae.cfg.torch_dtype)
    with inference_mode(sae):
        recon_ND = sae(x_ND).recon
    value = fvu(x_ND.float().cpu(), recon_ND.float().cpu())
    record.fvu = None if math.isnan(value) and _constant(x_ND) else value
    if record.fvu is None:
        record.warnings.append(f"the first {n} rows of the store have no variance; no first FVU measured")
        return
    if not value <= MAX_FVU:
        raise InputMismatchError(
            f"preflight: the {record.sae} reconstructs the first {n} rows of the store {record.store} with FVU "
            f"{value:.4g} (> {MAX_FVU:g}: worse than predicting their mean). It probably expects other inputs: "
            f"another hook (SAE '{record.sae_hook or '?'}', store '{record.store_hook}'), an input normalisation "
            f"the store does not apply (e.g. activations scaled to a fixed norm), or another model (SAE "
            f"'{record.sae_model or '?'}', store '{record.store_model}')")


def _constant(x_ND: torch.Tensor) -> bool:
    return bool((x_ND == x_ND[:1]).all())


def format_preflight(record: dict) -> str:
    """The CLI line of a preflight record as stored in a report (`Preflight.to_dict()`)."""
    return Preflight(**record).summary()
