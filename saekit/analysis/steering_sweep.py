"""Steering you can measure: effect and damage of one edit over a list of strengths.

    report = steering_sweep(model, tok, "model.layers.15", PROMPTS, [0, 20, 40, 80], sae=sae, feature=812,
                            target_token_ids=topic_token_ids(tok, [" flight", " airline"]), seed=0)
    table = format_sweep_table(report)                      # the CLI prints it
    write_sweep_report(report, "runs/x/steer/sweep-812")     # sweep.json + effect_vs_damage.png
    report["chosen"]   # the strength with the largest effect whose KL stays within the budget

Per strength, on a batch of prompts (left-padded, one `generate` per strength, same seed for every
strength so only the edit differs):
* effect: the probability mass the steered model puts on a target token set at each generated
  step (`target_mass`, and its log); the feature's own activation on the generated continuation,
  re-read by the unsteered model (`feature_act`: did the text come to carry the feature, not merely
  "was it added"); and a probe's P(positive) on the continuation (`probe_score`) when one is given.
* damage: the KL divergence KL(unsteered ‖ steered) of next-token distributions on neutral text,
  averaged over its tokens (`kl`, nats; one forward per strength), and the perplexity of the
  continuation under the unsteered model (`perplexity`).
* samples: the decoded continuations.

Every figure comes with a 95 % interval over prompts (or neutral texts) when `interval` is given
(`saekit.eval.bootstrap.interval_fn()`; analysis sits below eval and takes it as an argument).
Strength 0 is always measured (it is the baseline every ratio is taken against). Generation uses
`min_new_tokens = max_new_tokens`, so every continuation has the same length and no figure depends
on where an end-of-sequence token happened to fall. The report holds no timings: two sweeps with
the same seed give the same report.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from saekit.analysis.conditional import detector_values, steer_conditional
from saekit.analysis.steering import FeatureEdit, hf_model, steer
from saekit.analysis.text_probe import LinearProbe, encode_batch, forward_capture, masked_mean
from saekit.errors import ConfigError
from saekit.sae.base import SparseAutoencoder
from saekit.sources.hooks import is_lens_model

DEFAULT_KL_BUDGET = 0.5
NEUTRAL_TEXTS = (
    "The meeting was moved to Thursday afternoon because two people were away.",
    "She put the books back on the shelf and turned off the light.",
    "Water boils at a lower temperature at high altitude.",
    "He wrote a short list of things to buy: bread, milk, eggs and rice.",
    "The museum opens at ten and closes at six on weekdays.",
    "They walked along the river until it started to rain.",
    "The report explains how the new schedule will work next month.",
    "My neighbour plays the piano every evening after dinner.",
)
Interval = Callable[[Tensor], "list[float] | None"]


def edit_context(model, hook: str, strength: float, *, sae: SparseAutoencoder | None = None,
                 feature: int | None = None, vector: Tensor | None = None, mode: str = "add",
                 condition: dict | None = None):
    """The context manager that applies the edit at `strength`: add `strength × W_dec[feature]` (or
    `strength × vector`), or clamp the feature to `strength`; gated on a detector latent when
    `condition = {"detector": j, "threshold": t}`."""
    if (feature is None) == (vector is None):
        raise ConfigError("steering_sweep: expected exactly one of feature= or vector=, found "
                          f"{'both' if feature is not None else 'neither'}")
    if mode not in ("add", "clamp"):
        raise ConfigError(f"steering_sweep: expected mode 'add' or 'clamp', found '{mode}'")
    if feature is not None:
        e = FeatureEdit(feature, mode, alpha=strength) if mode == "add" else FeatureEdit(feature, "clamp", value=strength)
        kw = {"edits": [e]}
        if mode == "clamp" and strength == 0:
            kw = {"edits": []}  # strength 0 is the unsteered baseline in every mode
    else:
        kw = {"vector": vector, "alpha": strength}
    if condition is not None:
        return steer_conditional(model, hook, sae=sae, detector=int(condition["detector"]),
                                 threshold=float(condition.get("threshold", 0.0)), **kw)
    return steer(model, hook, sae=sae, **kw)


# -- one strength -------------------------------------------------------------------------------------------


@torch.no_grad()
def generate_batch(model, tokenizer, batch: dict, ctx, *, max_new_tokens: int, seed: int, do_sample: bool,
                   temperature: float, target_ids: Tensor | None) -> dict:
    """Continuations of a left-padded prompt batch under `ctx`, and the target mass at each step `[B, N]`."""
    hf = hf_model(model)
    kw = {"max_new_tokens": max_new_tokens, "min_new_tokens": max_new_tokens, "do_sample": do_sample,
          "return_dict_in_generate": True, "output_logits": target_ids is not None,
          "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id}
    if do_sample:
        kw.update(temperature=temperature, top_k=0, top_p=1.0)
    if is_lens_model(model):
        kw["use_cache"] = False  # see steering._generate: the rewired bridge is wrong with the KV cache
    dev = batch["input_ids"].device
    with ctx as gate, torch.random.fork_rng(devices=[] if dev.type == "cpu" else [dev]):
        torch.manual_seed(seed)
        out = hf.generate(**batch, **kw)
    mass_BN = None
    if target_ids is not None:
        mass_BN = torch.stack([lg.float().softmax(-1)[:, target_ids.to(lg.device)].sum(-1).cpu()
                               for lg in out.logits], 1)
    return {"sequences": out.sequences, "mass": mass_BN, "gate": gate}


def reread(model, batch: dict, sequences: Tensor, hook: str, *, sae, feature, probe: LinearProbe | None) -> dict:
    """One unsteered forward over prompt + continuation: the continuation's NLL per prompt, the
    feature's mean activation on it, and the probe's score of it."""
    P = batch["input_ids"].shape[1]
    mask = torch.cat([batch["attention_mask"], torch.ones_like(sequences[:, P:])], 1)
    hooks = [h for h in {hook if feature is not None else None, probe.hook if probe else None} if h]
    logits, acts = forward_capture(model, {"input_ids": sequences, "attention_mask": mask}, hooks)
    logp = logits[:, P - 1:-1].log_softmax(-1)
    nll_B = -logp.gather(-1, sequences[:, P:, None]).squeeze(-1).mean(1).cpu()
    out = {"nll": nll_B}
    if feature is not None:
        out["feature_act"] = detector_values(sae, acts[hook][:, P:], feature).mean(1).cpu()
    if probe is not None:
        keep = torch.ones_like(sequences[:, P:], dtype=torch.bool)
        out["probe"] = probe(masked_mean(acts[probe.hook][:, P:].float(), keep))
    return out


def kl_on_neutral(model, neutral: dict, base_logp: Tensor, ctx) -> Tensor:
    """Mean over each neutral text's tokens of KL(unsteered ‖ steered) in nats, `[G]` (one forward)."""
    with ctx:
        logits, _ = forward_capture(model, neutral, [])
    logp = logits.log_softmax(-1)
    kl_BT = (base_logp.exp() * (base_logp - logp)).sum(-1).clamp_min(0)
    return masked_mean(kl_BT[..., None], neutral["attention_mask"].bool())[:, 0].cpu()


# -- the sweep ------------------------------------------------------------------------------------------------


def _figure(values: Tensor | None, interval: Interval | None, post=None) -> dict:
    if values is None:
        return {"mean": None, "ci95": None}
    m = float(values.double().mean())
    ci = interval(values.double()) if interval is not None and values.numel() > 1 else None
    if post is not None:
        return {"mean": post(m), "ci95": None if ci is None else [post(ci[0]), post(ci[1])]}
    return {"mean": m, "ci95": ci}


def measure_strength(model, tokenizer, hook: str, strength: float, prompts: dict, neutral: dict,
                     base_logp: Tensor, opts: dict) -> dict:
    """Every figure of one strength (see the module docstring)."""
    edit = opts["edit"]
    ctx = lambda: edit_context(model, hook, strength, **edit)  # noqa: E731
    gen = generate_batch(model, tokenizer, prompts, ctx(), max_new_tokens=opts["max_new_tokens"],
                         seed=opts["seed"], do_sample=opts["do_sample"], temperature=opts["temperature"],
                         target_ids=opts["target_ids"])
    P = prompts["input_ids"].shape[1]
    seen = reread(model, prompts, gen["sequences"], hook, sae=edit["sae"], feature=edit["feature"],
                  probe=opts["probe"])
    kl_G = kl_on_neutral(model, neutral, base_logp, ctx())
    iv = opts["interval"]
    row = {"strength": float(strength),
           "target_mass": _figure(None if gen["mass"] is None else gen["mass"].mean(1), iv),
           "feature_act": _figure(seen.get("feature_act"), iv),
           "probe_score": _figure(seen.get("probe"), iv),
           "kl": _figure(kl_G, iv),
           "perplexity": _figure(seen["nll"], iv, post=math.exp),
           "samples": tokenizer.batch_decode(gen["sequences"][:, P:], skip_special_tokens=True)}
    m = row["target_mass"]["mean"]
    row["target_log_mass"] = None if m is None else math.log(max(m, 1e-30))
    if gen["gate"] is not None:
        row["gate_rate"] = gen["gate"].rate
    return row


def effect_metric(report: dict) -> str:
    """The figure the calibration maximises: target mass, else the probe score, else the feature's activation."""
    if report["target_token_ids"]:
        return "target_mass"
    return "probe_score" if report["probe"] else "feature_act"


def choose_strength(rows: list[dict], metric: str, kl_budget: float) -> dict:
    """The strength with the largest mean effect whose mean KL is within `kl_budget` (strength 0 always is)."""
    base = next(r for r in rows if r["strength"] == 0)[metric]["mean"]
    ok = [r for r in rows if r["kl"]["mean"] <= kl_budget and r[metric]["mean"] is not None]
    best = max(ok, key=lambda r: (r[metric]["mean"], -abs(r["strength"])))
    eff = best[metric]["mean"]
    ratio = eff / base if base not in (None, 0) else None
    return {"strength": best["strength"], "metric": metric, "effect": eff, "effect_ci95": best[metric]["ci95"],
            "unsteered": base, "ratio_to_unsteered": ratio, "kl": best["kl"]["mean"], "kl_ci95": best["kl"]["ci95"],
            "kl_budget": kl_budget}


def steering_sweep(model, tokenizer, hook: str, prompts: Sequence[str], strengths: Sequence[float], *,
                   sae: SparseAutoencoder | None = None, feature: int | None = None, vector: Tensor | None = None,
                   mode: str = "add", condition: dict | None = None, target_token_ids: Sequence[int] = (),
                   probe: LinearProbe | None = None, neutral_texts: Sequence[str] = NEUTRAL_TEXTS,
                   max_new_tokens: int = 32, seed: int = 0, do_sample: bool = True, temperature: float = 0.8,
                   kl_budget: float = DEFAULT_KL_BUDGET, interval: Interval | None = None,
                   max_length: int = 64, progress: bool = True) -> dict:
    """Measure one edit (a feature of `sae`, or a `vector` such as a RepE class-mean direction) at each
    strength on `prompts`; returns a strict-JSON-ready report with one row per strength and `chosen`."""
    if not prompts or not strengths:
        raise ConfigError(f"steering_sweep: expected prompts and strengths, found {len(prompts)} and {len(strengths)}")
    if feature is not None and sae is None:
        raise ConfigError("steering_sweep: a feature needs its SAE (sae=...)")
    strengths = sorted({0.0, *(float(s) for s in strengths)})
    dev = next(hf_model(model).parameters()).device
    batch = encode_batch(tokenizer, prompts, max_length, dev, side="left")
    neutral = encode_batch(tokenizer, neutral_texts, max_length, dev)
    base_logp = forward_capture(model, neutral, [])[0].log_softmax(-1)
    ids = torch.tensor(sorted({int(t) for t in target_token_ids})) if target_token_ids else None
    opts = {"edit": {"sae": sae, "feature": feature, "vector": vector, "mode": mode, "condition": condition},
            "max_new_tokens": max_new_tokens, "seed": seed, "do_sample": do_sample, "temperature": temperature,
            "target_ids": ids, "probe": probe, "interval": interval}
    rows = [measure_strength(model, tokenizer, hook, s, batch, neutral, base_logp, opts)
            for s in tqdm(strengths, desc="steering sweep", disable=not progress)]
    report = {"kind": "steering_sweep", "hook": hook, "feature": feature, "vector": vector is not None,
              "vector_norm": None if vector is None else float(vector.norm()), "mode": mode, "condition": condition,
              "strengths": strengths, "prompts": list(prompts), "neutral_texts": list(neutral_texts),
              "target_token_ids": [] if ids is None else ids.tolist(),
              "probe": None if probe is None else {"hook": probe.hook, "positive": probe.positive},
              "seed": seed, "do_sample": do_sample, "temperature": temperature, "max_new_tokens": max_new_tokens,
              "kl_budget": kl_budget, "rows": rows}
    report["chosen"] = choose_strength(rows, effect_metric(report), kl_budget)
    return report
