"""Steering: edit SAE features (or plain steering vectors) inside a model, and inside an embedding search.

Three uses, one vocabulary of edits (`FeatureEdit`):

    with steer(model, "model.layers.15", sae=sae, edits=[FeatureEdit(123, "add", alpha=8.0)]):
        logits = model(ids).logits                      # generation / logits with the feature pushed
    with steer(model, "blocks.15.hook_resid_post", vector=direction_D, alpha=4.0):
        ...                                              # RepE-style steering vector, same API
    generate_steered(model, tok, "I am flying to", "model.layers.15", sae=sae, edits=[...])
    steered_search(sae, query_D, corpus_ND, [FeatureEdit(7, "add", alpha=0.5)])   # embedding search

Why it is built this way:
* Every intervention goes through `saekit.sources.hooks.hook_point`, so HF module paths and
  TransformerLens hook names work alike and the hook is removed even when the body raises.
* Add-mode adds `alpha * W_dec[feature]` to the activation: no encode needed, and it works for
  every architecture (all have a dictionary).
* Clamp/ablate encode the activation, edit the code, decode, and add back the SAE's error term
  (`x + decode(edited) - decode(code)`), so the SAE's reconstruction error does not leak into the
  steered run: only the edited feature changes.
* A steer with nothing to do (alpha = 0 everywhere, no edits) installs no hook at all, so its
  logits are bitwise those of the unhooked model.
* Generation goes through Hugging Face `generate` (TransformerLens 4.x `generate` is wrong with the
  KV cache). A TransformerBridge rewires the HF model it wraps in place, so its hook points fire
  inside `original_model.generate`; the rewired model is also wrong with the KV cache (it degenerates
  into repeated dashes), so bridge generation runs with `use_cache=False` (correct, slower).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict, dataclass
from typing import Iterator, Literal, Sequence

import torch
from torch import Tensor

from saekit.errors import ConfigError, SaekitError, ShapeMismatchError
from saekit.sae.base import SparseAutoencoder, SparseCode, inference_mode
from saekit.sources.hooks import hook_point, is_lens_model

log = logging.getLogger(__name__)

MODES = ("add", "clamp", "ablate")
Positions = str | slice | Sequence[int]


@dataclass
class FeatureEdit:
    """One edit of one SAE feature.

    add:    activation += alpha * W_dec[feature]  (in an embedding search: code[feature] += alpha)
    clamp:  the feature's code value is set to `value` (encode → edit → decode, error term kept)
    ablate: clamp to 0
    """

    feature: int
    mode: Literal["add", "clamp", "ablate"] = "add"
    alpha: float = 0.0
    value: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"FeatureEdit: expected mode in {MODES}, found '{self.mode}'")
        if int(self.feature) < 0:
            raise ConfigError(f"FeatureEdit: expected a feature index >= 0, found {self.feature}")
        self.feature = int(self.feature)

    @property
    def target(self) -> float:
        """The code value a clamp/ablate edit sets."""
        return 0.0 if self.mode == "ablate" else float(self.value)


# -- building the intervention -------------------------------------------------------------------------


def check_features(sae: SparseAutoencoder | None, edits: Sequence[FeatureEdit]) -> None:
    if edits and sae is None:
        raise ConfigError("steer: feature edits need an SAE (sae=...); for a plain direction pass vector=")
    for e in edits:
        if e.feature >= sae.cfg.d_sae:
            raise ConfigError(f"FeatureEdit: expected a feature index < d_sae={sae.cfg.d_sae}, found {e.feature}")


def add_direction(sae: SparseAutoencoder | None, edits: Sequence[FeatureEdit], vector: Tensor | None,
                  alpha: float) -> Tensor | None:
    """The summed add-mode direction `Σ alpha_e W_dec[f_e] + alpha * vector` ([d_in]), or None if it is zero."""
    parts = []
    adds = [e for e in edits if e.mode == "add" and e.alpha != 0]
    if adds:
        W_dec_FD = sae.W_dec.detach()
        idx = torch.tensor([e.feature for e in adds], device=W_dec_FD.device)
        coef = torch.tensor([e.alpha for e in adds], dtype=W_dec_FD.dtype, device=W_dec_FD.device)
        parts.append(coef @ W_dec_FD[idx])
    if vector is not None and alpha != 0:
        parts.append(alpha * vector.detach().reshape(-1))
    if not parts:
        return None
    return torch.stack([p.float().cpu() for p in parts]).sum(0)


def clamp_code(code: SparseCode, edits: Sequence[FeatureEdit]) -> SparseCode:
    """The code with each clamp/ablate feature set to its target: its own slots zeroed, one slot appended."""
    idx, vals = code.indices, code.values
    for e in edits:
        vals = torch.where(idx == e.feature, torch.zeros_like(vals), vals)
    extra_i = torch.tensor([e.feature for e in edits], dtype=idx.dtype, device=idx.device)
    extra_v = torch.tensor([e.target for e in edits], dtype=vals.dtype, device=vals.device)
    lead = idx.shape[:-1]
    idx = torch.cat([idx, extra_i.expand(*lead, len(edits))], -1)
    vals = torch.cat([vals, extra_v.expand(*lead, len(edits))], -1)
    return SparseCode(idx, vals, code.d_sae)


def clamp_edit(sae: SparseAutoencoder, x_ND: Tensor, edits: Sequence[FeatureEdit]) -> Tensor:
    """`x + decode(edited code) - decode(code)`: the clamp applied with the SAE error term kept."""
    p = next(sae.parameters())
    with inference_mode(sae):
        code = sae.encode(x_ND.to(p.device, p.dtype))
        delta = sae.decode(clamp_code(code, edits)) - sae.decode(code)
    return x_ND + delta.to(x_ND.device, x_ND.dtype)


def _position_mask(positions: Positions, offset: int, T: int) -> Tensor | None:
    """Which of the T positions (absolute index offset..offset+T-1) to edit; None = all."""
    if isinstance(positions, str):
        if positions != "all":
            raise ConfigError(f"steer: expected positions 'all', a slice or a list of ints, found '{positions}'")
        return None
    absolute = torch.arange(offset, offset + T)
    if isinstance(positions, slice):
        if any(v is not None and v < 0 for v in (positions.start, positions.stop)):  # relative to this forward
            return torch.zeros(T, dtype=torch.bool).index_fill_(0, torch.arange(T)[positions], True)
        start, step = positions.start or 0, positions.step or 1
        ok = (absolute >= start) & ((absolute - start) % step == 0)
        return ok & (absolute < positions.stop) if positions.stop is not None else ok
    wanted = torch.tensor([int(p) for p in positions], dtype=torch.long)
    return torch.isin(absolute, wanted)


class ActivationEdit:
    """One activation edit, position-blind: the SAE clamps (error term kept), then the added direction.

    Shared by `steer` (which chooses positions) and `steer_conditional` (which gates on a detector
    latent), so both apply exactly the same arithmetic to the positions they pick.
    """

    def __init__(self, sae, direction_D: Tensor | None, clamps: list[FeatureEdit]):
        self.sae, self.direction_D, self.clamps = sae, direction_D, clamps

    def __call__(self, x: Tensor) -> Tensor:
        if self.clamps:
            x = clamp_edit(self.sae, x, self.clamps)
        if self.direction_D is not None:
            x = x + self.direction_D.to(dtype=x.dtype, device=x.device)
        return x


class _Editor:
    """The hook function: applies an `ActivationEdit` at the chosen positions.

    With a KV cache, the first forward sees the whole prompt and later ones one token each; the
    editor counts positions across those calls (a forward longer than one token starts a new
    sequence) so list/slice positions are absolute token positions.
    """

    def __init__(self, edit: ActivationEdit, positions: Positions):
        self._edit, self.positions = edit, positions
        self.seen = 0

    def __call__(self, acts: Tensor) -> Tensor:
        if acts.dim() < 3:  # [batch, d] (embeddings, pooled outputs): no sequence to choose from
            return self._edit(acts)
        T = acts.shape[1]
        if T > 1:
            self.seen = 0
        mask_T = _position_mask(self.positions, self.seen, T)
        self.seen += T
        if mask_T is None:
            return self._edit(acts)
        if not bool(mask_T.any()):
            return acts
        out = acts.clone()
        sel = mask_T.nonzero().squeeze(1).to(acts.device)
        out[:, sel] = self._edit(acts[:, sel])
        return out


@contextlib.contextmanager
def steer(model, hook: str, *, sae: SparseAutoencoder | None = None, edits: Sequence[FeatureEdit] = (),
          vector: Tensor | None = None, alpha: float = 0.0, positions: Positions = "all") -> Iterator[None]:
    """Edit the activation at `hook` for the duration of the block.

    add-mode edits and `alpha * vector` are summed into one direction added at every chosen
    position; clamp/ablate edits go through the SAE with its error term kept. `positions` is "all",
    a slice or a list of absolute token positions (negative slice bounds count from the end of each
    forward). With nothing to do, no hook is installed: the model runs bitwise unchanged.
    """
    edits = [e if isinstance(e, FeatureEdit) else FeatureEdit(**e) for e in edits]
    check_features(sae, edits)
    if vector is not None and sae is not None and vector.shape[-1] != sae.cfg.d_in:
        raise ShapeMismatchError(f"steer: expected vector [d_in={sae.cfg.d_in}], found {tuple(vector.shape)}")
    direction_D = add_direction(sae, edits, vector, alpha)
    clamps = [e for e in edits if e.mode != "add"]
    if direction_D is None and not clamps:
        yield  # an exact no-op: nothing installed
        return
    _position_mask(positions, 0, 1)  # validate before installing anything
    with hook_point(model, hook, _Editor(ActivationEdit(sae, direction_D, clamps), positions)):
        yield


# -- generation and logits -----------------------------------------------------------------------------


def hf_model(model):
    """The Hugging Face model to generate with (a TransformerBridge wraps and rewires one in place)."""
    if is_lens_model(model):
        inner = getattr(model, "original_model", None)
        if inner is None:
            raise SaekitError("generate_steered: this TransformerLens model wraps no HF model (TransformerLens 3.x "
                              "HookedTransformer); load the HF model with load_lm and steer its module path instead")
        return inner
    return model


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def _generate(model, tokenizer, prompt: str, max_new_tokens: int, seed: int, do_sample: bool,
              temperature: float) -> str:
    hf = hf_model(model)
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(_device(hf))
    kw = {"do_sample": do_sample, "max_new_tokens": max_new_tokens,
          "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id}
    if do_sample:
        kw.update(temperature=temperature, top_k=0, top_p=1.0)
    if is_lens_model(model):
        kw["use_cache"] = False  # the bridge's rewired modules go wrong with the KV cache; without it they match HF
    with torch.random.fork_rng(devices=[] if ids.device.type == "cpu" else [ids.device]):
        torch.manual_seed(seed)
        out = hf.generate(ids, **kw)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def generate_steered(model, tokenizer, prompt: str, hook: str, *, sae: SparseAutoencoder | None = None,
                     edits: Sequence[FeatureEdit] = (), vector: Tensor | None = None, alpha: float = 0.0,
                     max_new_tokens: int = 30, seed: int = 0, do_sample: bool = True,
                     temperature: float = 0.8, positions: Positions = "all") -> dict:
    """Default and steered continuations of `prompt`, sampled with the same seed (global RNG restored after).

    Returns {"prompt", "default", "steered", "hook", "edits", "alpha", "seed", ...} (JSON-ready).
    """
    args = (tokenizer, prompt, max_new_tokens, seed, do_sample, temperature)
    default = _generate(model, *args)
    with steer(model, hook, sae=sae, edits=edits, vector=vector, alpha=alpha, positions=positions):
        steered = _generate(model, *args)
    return {"prompt": prompt, "default": default, "steered": steered, "hook": hook,
            "edits": [asdict(e) if isinstance(e, FeatureEdit) else dict(e) for e in edits],
            "vector": vector is not None, "alpha": float(alpha), "seed": seed, "do_sample": do_sample,
            "temperature": temperature, "max_new_tokens": max_new_tokens}


def _last_logits(model, ids_1T: Tensor) -> Tensor:
    out = model(ids_1T)
    logits = out.logits if hasattr(out, "logits") else out
    return logits[0, -1].float()


@torch.no_grad()
def topic_token_probability(model, tokenizer, prompts: Sequence[str], token_ids: Sequence[int],
                            hook: str | None = None, **steer_kwargs) -> float:
    """Mean over prompts of the next-token probability mass on `token_ids` (steered when `hook` is given).

    Prompts run one at a time (no padding, so nothing depends on the pad side); token ids are passed
    to TransformerLens models too, so no BOS is prepended behind our back.
    """
    if not prompts or not token_ids:
        raise ConfigError(f"topic_token_probability: expected prompts and token ids, found {len(prompts)} prompts "
                          f"and {len(token_ids)} token ids")
    ids_V = torch.tensor(sorted(set(int(t) for t in token_ids)))
    dev = _device(model)
    ctx = steer(model, hook, **steer_kwargs) if hook is not None else contextlib.nullcontext()
    total = 0.0
    with ctx:
        for p in prompts:
            ids = tokenizer(p, return_tensors="pt").input_ids.to(dev)
            probs = _last_logits(model, ids).softmax(-1)
            total += float(probs[ids_V.to(probs.device)].sum())
    return total / len(prompts)


def topic_token_ids(tokenizer, words: Sequence[str]) -> list[int]:
    """First token id of each word (pass words with their leading space, e.g. " flight")."""
    return sorted({tokenizer(w, add_special_tokens=False).input_ids[0] for w in words})


# -- directions ------------------------------------------------------------------------------------------


def class_mean_direction(acts_ND: Tensor, labels_N, positive) -> Tensor:
    """Unit-norm difference of class means, mean(positive) − mean(rest) (RepE's simplest reading vector).

    `labels_N` is a sequence or tensor of labels; rows equal to `positive` form the positive class.
    """
    acts_ND = torch.as_tensor(acts_ND).float()
    labels = list(labels_N.tolist() if isinstance(labels_N, Tensor) else labels_N)
    if len(labels) != acts_ND.shape[0]:
        raise ShapeMismatchError(f"class_mean_direction: expected {acts_ND.shape[0]} labels, found {len(labels)}")
    pos_N = torch.tensor([lab == positive for lab in labels], dtype=torch.bool)
    n_pos = int(pos_N.sum())
    if n_pos == 0 or n_pos == len(labels):
        raise SaekitError(f"class_mean_direction: expected rows in both classes of '{positive}', "
                          f"found {n_pos} positive of {len(labels)}")
    diff_D = acts_ND[pos_N].mean(0) - acts_ND[~pos_N].mean(0)
    return diff_D / diff_D.norm().clamp_min(1e-12)


def decoder_alignment(sae: SparseAutoencoder, direction_D: Tensor) -> Tensor:
    """Cosine of every decoder row with a direction, `[d_sae]` (to pick a feature for a concept)."""
    W_dec_FD = sae.W_dec.detach().float().cpu()
    d = direction_D.float().cpu().reshape(-1)
    return (W_dec_FD @ d) / (W_dec_FD.norm(dim=1) * d.norm()).clamp_min(1e-12)


# -- steering an embedding search ------------------------------------------------------------------------


def edit_dense_code(z_F: Tensor, edits: Sequence[FeatureEdit]) -> Tensor:
    """Apply edits to a dense code: add → z[f] += alpha; clamp → z[f] = value; ablate → z[f] = 0."""
    z_F = z_F.clone()
    for e in edits:
        if e.mode == "add":
            z_F[e.feature] += e.alpha
        else:
            z_F[e.feature] = e.target
    return z_F


def _dense_to_code(z_F: Tensor) -> SparseCode:
    idx = z_F.nonzero().reshape(-1)
    if idx.numel() == 0:
        idx = torch.zeros(1, dtype=torch.long, device=z_F.device)
    return SparseCode(idx[None], z_F[idx][None], z_F.shape[0])


def _ranking(query_D: Tensor, corpus_unit_ND: Tensor, top_n: int) -> list[tuple[int, float]]:
    q = query_D / query_D.norm().clamp_min(1e-12)
    scores = corpus_unit_ND @ q
    top = scores.topk(min(top_n, scores.shape[0]))
    return [(int(i), float(s)) for s, i in zip(top.values, top.indices)]


@torch.no_grad()
def steered_search(sae: SparseAutoencoder, query_D: Tensor, corpus_ND: Tensor, edits: Sequence[FeatureEdit],
                   top_n: int = 10) -> dict:
    """Re-rank a corpus by cosine with an edited query embedding.

    The query is encoded, its code edited, and decoded with the error term kept
    (`q' = q + decode(z') − decode(z)`), so features that are not edited stay as they were. Returns
    {"before", "after": [(row, cosine)], "moved": rows that entered or left the top n, "entered",
    "left", "rank_changes": {row: (before_rank|None, after_rank|None)}, "feature_contributions":
    {feature: change of its code value}, "query_shift": cosine(q, q')}.
    """
    edits = [e if isinstance(e, FeatureEdit) else FeatureEdit(**e) for e in edits]
    check_features(sae, edits)
    p = next(sae.parameters())
    q_D = query_D.reshape(-1).to(p.device, p.dtype)
    if q_D.shape[0] != sae.cfg.d_in or corpus_ND.shape[-1] != sae.cfg.d_in:
        raise ShapeMismatchError(f"steered_search: expected query [d_in={sae.cfg.d_in}] and corpus [N, {sae.cfg.d_in}], "
                                 f"found {tuple(query_D.shape)} and {tuple(corpus_ND.shape)}")
    with inference_mode(sae):
        z_F = sae.encode(q_D[None]).dense()[0]
        z_edit_F = edit_dense_code(z_F, edits)
        if torch.equal(z_edit_F, z_F):  # nothing edited: the query stays bitwise the same
            q_edit_D = q_D
        else:
            q_edit_D = q_D + sae.decode(_dense_to_code(z_edit_F))[0] - sae.decode(_dense_to_code(z_F))[0]
    corpus = corpus_ND.to(p.device, p.dtype)
    corpus_unit = corpus / corpus.norm(dim=1, keepdim=True).clamp_min(1e-12)
    before, after = _ranking(q_D, corpus_unit, top_n), _ranking(q_edit_D, corpus_unit, top_n)
    b_rank = {r: i for i, (r, _) in enumerate(before)}
    a_rank = {r: i for i, (r, _) in enumerate(after)}
    entered = [r for r in a_rank if r not in b_rank]
    left = [r for r in b_rank if r not in a_rank]
    changes = {r: (b_rank.get(r), a_rank.get(r)) for r in set(b_rank) | set(a_rank) if b_rank.get(r) != a_rank.get(r)}
    contrib = {e.feature: float(z_edit_F[e.feature] - z_F[e.feature]) for e in edits}
    shift = float(torch.nn.functional.cosine_similarity(q_D, q_edit_D, dim=0))
    return {"before": before, "after": after, "moved": sorted(entered + left), "entered": entered, "left": left,
            "rank_changes": changes, "feature_contributions": contrib, "query_shift": shift}
