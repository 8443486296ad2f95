"""Top-k vs MDL-SAEs on a real activation store (issue 24); prints ONE JSON line (+ a markdown table).

    python scripts/mdl_real.py --store runs/quickstart-smollm2/store --out /tmp/mdl-runs \
        --setting topk32=topk:k=32 --setting mdl_l0_32=mdl:target_l0=32 --markdown

Rows: the store's documents are split as the run stages split them (`split_by_document(holdout,
seed)`); the SAEs train on the training documents' rows minus the store's massive-activation
outliers (`train.exclude_outliers`, unless --keep-outliers) and are measured on every held-out row.
"Ordinary" rows are the held-out rows the store does not flag as outliers (the headline row set).

Per SAE (its saved, folded final_sae on raw rows): mean L0 and max L0 (all held-out rows), FVU on
all held-out rows, FVU and mean L0 on ordinary rows, and the description length (bits per row:
activity Σ_j H(p_j) + entropy-coded value bits at the precision `description_length` selects) on
ordinary rows. Every figure except max L0 carries a 95 % percentile interval from the document
bootstrap (saekit/eval/bootstrap.py); the DL interval recomputes the entropies from resampled
per-document (latent, bin) counts and is recentred by the resamples' mean shift, because resampling
biases plug-in entropies down. Acceptance (issue 24): an MDL-SAE whose controller reached its
target_l0 (held-out mean L0 within 10 %) at the mean L0 of a top-k SAE has FVU (ordinary rows) within
15 % of it, and such an MDL-SAE at most as lossy as a top-k SAE has a shorter description. Each row
also records its learning rate and the last logged training-batch L0 and λ. An SAE folder that
already exists under --out is measured, not retrained.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from saekit.eval.bootstrap import Bootstrap, GroupedSums, fvu_from_sums  # noqa: E402
from saekit.eval.description_length import (LatentValueRange, description_length, quantise_bins,  # noqa: E402
                                            range_tables, unit_position)
from saekit.artifacts import read_json  # noqa: E402
from saekit.layout import FINAL_SAE  # noqa: E402
from saekit.run.outliers import training_rows  # noqa: E402
from saekit.sae.base import SparseCode, inference_mode  # noqa: E402
from saekit.sae.registry import create, load_sae  # noqa: E402
from saekit.store.reader import ActivationStore  # noqa: E402
from saekit.train import TrainConfig, train  # noqa: E402


def parse_setting(text: str) -> tuple[str, str, dict]:
    """'name=arch:key=val,key=val' -> (name, arch, {key: val}) with numbers parsed as JSON. Besides the
    architecture's fields: lr (this setting's learning rate), from=<name> (measure that setting's SAE
    again, e.g. with) eval_k (cap each row's active latents at inference: the SAE's k)."""
    name, _, spec = text.partition("=")
    arch, _, kv = spec.partition(":")
    fields = {}
    for item in filter(None, kv.split(",")):
        key, _, val = item.partition("=")
        try:
            fields[key] = json.loads(val)
        except json.JSONDecodeError:
            fields[key] = val
    return name, arch, fields


def train_one(store, rows, out: Path, name: str, arch: str, fields: dict, args) -> object:
    fields = dict(fields)
    run_dir = out / str(fields.pop("from", name))  # from=<setting>: that setting's SAE, measured again
    lr = fields.pop("lr", args.lr)  # a setting's own learning rate (MDL-SAEs want ~3x top-k's default)
    eval_k = fields.pop("eval_k", None)  # a per-row activity cap applied at inference (the SAE's k)
    if not (run_dir / FINAL_SAE).is_dir():
        sae = create({"architecture": arch, "d_in": store.d_in, "d_sae": args.d_sae, **fields})
        cfg = TrainConfig(total_steps=args.steps, batch_size=args.batch, lr=lr, warmup_steps=20,
                          normalize_activations="expected_average_only_in", checkpoint_every=0,
                          log_every=max(1, args.steps // 10), progress_bar=False, deterministic=False)
        train(sae, store.batches(args.batch, seed=0, rows=rows), cfg, run_dir)
    sae = load_sae(run_dir).eval()
    if eval_k is not None:
        sae.cfg.k = int(eval_k)
    return sae, run_facts(run_dir)


def run_facts(run_dir: Path) -> dict:
    """The learning rate the run trained at and the last logged training-batch L0 and λ (the
    controller's view of its target), from the run folder."""
    facts = {"lr": read_json(run_dir / "config.json")["train"]["lr"]}
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    last = next((json.loads(ln) for ln in reversed(lines) if '"l0"' in ln), {})
    facts.update({k: last[k] for k in ("l0", "dl_coef") if k in last})
    return facts


def add_row_sums(sums: GroupedSums, unit_N, x_ND, sse_N, l0_N) -> None:
    """Per-document sums from which FVU and mean L0 (and their resamples) are computed."""
    x = x_ND.double()
    for k, v in (("sse", sse_N), ("n", torch.ones_like(sse_N)), ("sum_x", x), ("sumsq", x.pow(2).sum(-1)),
                 ("l0", l0_N.double())):
        sums.add(k, unit_N, v)


def encode_rows(sae, store, rows, batch: int = 2048):
    """(codes, per-row squared error, per-row L0) of `rows`, in order."""
    codes, sse, l0 = [], [], []
    with inference_mode(sae):
        for s in range(0, len(rows), batch):
            x = store[rows[s: s + batch]].float()
            code = sae.encode(x)
            sse.append((sae.decode(code) - x).double().pow(2).sum(-1))
            codes.append(code.detach())
            l0.append(code.l0())
    return codes, torch.cat(sse), torch.cat(l0)


def concat_codes(codes) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, values) of several codes, padded with inactive slots to the widest (MDL codes vary)."""
    k = max(c.indices.shape[-1] for c in codes)
    pad = [(torch.nn.functional.pad(c.indices, (0, k - c.indices.shape[-1])),
            torch.nn.functional.pad(c.values, (0, k - c.values.shape[-1]))) for c in codes]
    return torch.cat([p[0] for p in pad]), torch.cat([p[1] for p in pad])


def dl_bootstrap(sae, codes, units_N: torch.Tensor, n_units: int, x_rows, boot: Bootstrap) -> dict:
    """DL (activity + entropy-coded value bits per row) at the precision `description_length` selects,
    with a document-bootstrap interval: per-document (latent, bin) counts are resampled and the
    entropies recomputed for each resample."""
    items = [(c, x, sae.decode(c)) for c, x in zip(codes, x_rows)]
    with torch.no_grad():
        res = description_length(items, sae.cfg.d_sae, decoder_FD=sae.W_dec.detach())
    b = res["selected_bits"]
    ranges = LatentValueRange(sae.cfg.d_sae)
    for c in codes:
        ranges.update(c)
    lo_F, span_F = range_tables(ranges.lo_F, ranges.hi_F)
    F, L = sae.cfg.d_sae, 1 << b
    idx, val = concat_codes(codes)
    unit_NK = units_N[:, None].expand_as(idx)
    act = val != 0
    bins = quantise_bins(unit_position(val, lo_F[idx], span_F[idx]), b)
    col = (idx * L + bins)[act]
    H_GC = torch.sparse_coo_tensor(torch.stack([unit_NK[act], col]), torch.ones(int(act.sum()), dtype=torch.float64),
                                   (n_units, F * L), check_invariants=True).coalesce()  # per-document counts
    n_G = torch.bincount(units_N, minlength=n_units).double()

    def dl_of(W_RG: torch.Tensor) -> torch.Tensor:
        W_RG = W_RG.to(torch.float64)  # the bootstrap draws float32 weights; the counts are float64
        C_RFL = torch.sparse.mm(H_GC.t(), W_RG.t()).t().reshape(-1, F, L)  # resampled histograms
        n_R1 = (W_RG @ n_G)[:, None]
        c_RF = C_RFL.sum(-1)
        p = c_RF / n_R1
        act_bits = -(torch.xlogy(p, p) + torch.xlogy(1 - p, 1 - p)).sum(-1) / math.log(2)
        val_bits = (torch.xlogy(c_RF, c_RF).sum(-1) - torch.xlogy(C_RFL, C_RFL).sum((-1, -2))) / math.log(2)
        return act_bits + val_bits / n_R1[:, 0]

    point = float(dl_of(torch.ones(1, n_units, dtype=torch.float64))[0])
    vals = torch.cat([dl_of(W) for W in boot.replicate_weights()])
    q_lo, q_hi = torch.quantile(vals[torch.isfinite(vals)], torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    # a resample repeats documents, which lowers every plug-in entropy, so the percentile interval
    # sits below the estimate: it is recentred by the resamples' mean shift
    shift = float(vals[torch.isfinite(vals)].mean()) - point
    lo, hi = q_lo - shift, q_hi - shift
    return {"dl_bits": point, "dl_ci95": [lo, hi], "dl_bits_check": res["dl_bits_per_row"], "precision": b,
            "activity_bits": res["activity_bits_per_row"]}


def row_set_figures(store, rows, sse_N, l0_N, resamples: int) -> tuple[dict, GroupedSums, Bootstrap]:
    """FVU and mean L0 of a row set with document-bootstrap intervals."""
    sums = GroupedSums()
    unit = sums.units_for(torch.as_tensor(store.gather("doc_id", rows.numpy())), len(rows))
    add_row_sums(sums, unit, store[rows].float(), sse_N, l0_N)
    t = sums.totals()
    boot = Bootstrap(sums.n_units, resamples, seed=0)
    figs = {"fvu": float(fvu_from_sums({k: v.sum(0) for k, v in t.items()})), "fvu_ci95": boot.ci(fvu_from_sums, t),
            "l0_mean": float(t["l0"].sum() / t["n"].sum()), "l0_mean_ci95": boot.ratio_ci(t["l0"], t["n"])}
    return figs, unit, boot


def measure(sae, store, held, ordinary_mask, args) -> dict:
    codes, sse, l0 = encode_rows(sae, store, held)
    every, _, _ = row_set_figures(store, held, sse, l0, args.resamples)
    ordinary, unit, boot = row_set_figures(store, held[ordinary_mask], sse[ordinary_mask], l0[ordinary_mask],
                                           args.resamples)
    out = {"l0_mean_all": every["l0_mean"], "l0_max": int(l0.max()), "fvu_all": every["fvu"],
           "fvu_all_ci95": every["fvu_ci95"], "fvu_ordinary": ordinary["fvu"], "fvu_ordinary_ci95": ordinary["fvu_ci95"],
           "l0_mean_ordinary": ordinary["l0_mean"], "l0_mean_ordinary_ci95": ordinary["l0_mean_ci95"]}
    idx, val = concat_codes(codes)
    idx, val = idx[ordinary_mask], val[ordinary_mask]
    x_o = store[held[ordinary_mask]].float()
    chunks = [SparseCode(idx[s: s + 2048], val[s: s + 2048], sae.cfg.d_sae) for s in range(0, len(x_o), 2048)]
    xs = [x_o[s: s + 2048] for s in range(0, len(x_o), 2048)]
    out.update(dl_bootstrap(sae, chunks, unit, boot.n_units, xs, boot))
    return out


def on_target(row: dict) -> bool | None:
    """Whether an MDL-SAE's controller reached its requested L0 (held-out ordinary rows' mean L0 within
    10 % of target_l0); None for an SAE without an L0 target."""
    target = row["fields"].get("target_l0")
    return None if target is None else abs(row["l0_mean_ordinary"] / target - 1) <= 0.1


def acceptance(rows: dict) -> dict:
    """Issue 24's two checks, each against the best top-k SAE available (never a worse-tuned one):
    FVU within 15 % of the lowest-FVU top-k SAE at equal mean L0 (within 10 %), where the MDL-SAE's L0
    was set by its controller (an L0 target it reached: `controller_on_target`), on the estimates and on
    the intervals' far ends; and a DL whose upper ci95 end is below top-k's DL-vs-FVU frontier at the
    same FVU (linear between frontier points: a chord of a convex frontier lies above it, so a small
    margin is a tie). Every (top-k, MDL) pair is listed as well."""
    tk = {n: r for n, r in rows.items() if r["architecture"] == "topk"}
    md = {n: r for n, r in rows.items() if r["architecture"] == "mdl"}
    steered = {n for n, r in md.items() if on_target(r)}
    pairs = [{"topk": a, "mdl": b, "l0_ratio": rb["l0_mean_ordinary"] / ra["l0_mean_ordinary"],
              "fvu_ratio": rb["fvu_ordinary"] / ra["fvu_ordinary"],
              "fvu_ratio_far_ends": rb["fvu_ordinary_ci95"][1] / ra["fvu_ordinary_ci95"][0],
              "dl_diff": rb["dl_bits"] - ra["dl_bits"]} for a, ra in tk.items() for b, rb in md.items()]
    best = {}
    for p in pairs:
        if abs(p["l0_ratio"] - 1) <= 0.1 and (p["mdl"] not in best or p["fvu_ratio"] > best[p["mdl"]]["fvu_ratio"]):
            best[p["mdl"]] = p  # the top-k SAE with the lowest FVU at this L0 gives the largest ratio
    at_fvu = {b: topk_dl_at(tk, rb["fvu_ordinary"]) for b, rb in md.items()}
    margin = {b: None if v is None else v - md[b]["dl_ci95"][1] for b, v in at_fvu.items()}
    return {"pairs": pairs, "best_topk_at_equal_l0": best, "topk_frontier_dl_at_mdl_fvu": at_fvu,
            "dl_margin_bits": margin,
            "controller_on_target": {b: on_target(rb) for b, rb in md.items()},
            "fvu_within_15pct_at_equal_l0": any(p["fvu_ratio"] <= 1.15 for b, p in best.items() if b in steered),
            "fvu_within_15pct_at_equal_l0_far_ends": any(p["fvu_ratio_far_ends"] <= 1.15
                                                         for b, p in best.items() if b in steered),
            "dl_below_topk_frontier_at_equal_fvu": any(m is not None and m > 0 for b, m in margin.items()
                                                       if b in steered)}


def topk_dl_at(tk: dict, fvu: float) -> float | None:
    """Top-k's DL at a given ordinary-row FVU, linear between the two top-k SAEs of its DL-vs-FVU frontier
    whose FVUs bracket it (None outside their range): the 'equal FVU' comparison when no top-k SAE has exactly that FVU."""
    pts = []
    for f, d in sorted((r["fvu_ordinary"], r["dl_bits"]) for r in tk.values()):
        if not pts or d < pts[-1][1]:  # top-k's frontier: a point both lossier and longer is left out
            pts.append((f, d))
    for (f0, d0), (f1, d1) in zip(pts, pts[1:]):
        if f0 <= fvu <= f1 and f1 > f0:
            return d0 + (d1 - d0) * (fvu - f0) / (f1 - f0)
    return None


def markdown(rows: dict) -> str:
    def ci(v, c, d=3):
        return f"{v:.{d}f} [{c[0]:.{d}f}, {c[1]:.{d}f}]"

    head = ("| SAE | lr | mean L0 (ordinary) | max L0 | FVU, all held-out rows | FVU, ordinary rows | "
            "DL bits/row (ordinary) |")
    lines = [head, "|---|---|---|---|---|---|---|"]
    for n, r in rows.items():
        lines.append(f"| {n} | {r['lr']:.2g} | {ci(r['l0_mean_ordinary'], r['l0_mean_ordinary_ci95'], 1)} | {r['l0_max']} | "
                     f"{ci(r['fvu_all'], r['fvu_all_ci95'])} | {ci(r['fvu_ordinary'], r['fvu_ordinary_ci95'])} | "
                     f"{ci(r['dl_bits'], r['dl_ci95'], 1)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--out", required=True, help="folder for the SAE runs (reused when they exist)")
    ap.add_argument("--setting", action="append", required=True, help="name=arch:key=val,... (repeat)")
    ap.add_argument("--d-sae", type=int, default=4608)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--holdout", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resamples", type=int, default=200)
    ap.add_argument("--keep-outliers", action="store_true", help="train on the outlier rows too")
    ap.add_argument("--markdown", action="store_true", help="also print the table (to stderr)")
    args = ap.parse_args()
    store = ActivationStore(args.store)
    train_rows, held = store.split_by_document(args.holdout, seed=args.seed)
    rows_used = training_rows(store, train_rows, exclude_outliers=not args.keep_outliers)
    ordinary_mask = ~store.outlier_mask()[held]
    out = Path(args.out)
    rows = {}
    for text in args.setting:
        name, arch, fields = parse_setting(text)
        sae, facts = train_one(store, rows_used.rows, out, name, arch, fields, args)
        rows[name] = {"architecture": arch, "fields": fields, **facts, "training_l0": facts.get("l0"),
                      **measure(sae, store, held, ordinary_mask, args)}
        rows[name].pop("l0", None)
    result = {"bench": "mdl_real", "store": str(store.path), "d_sae": args.d_sae, "steps": args.steps,
              "batch": args.batch, "training_rows": rows_used.summary(), "heldout_rows": int(len(held)),
              "ordinary_rows": int(ordinary_mask.sum()), "rows": rows, "acceptance": acceptance(rows)}
    if args.markdown:
        print(markdown(rows), file=sys.stderr)
    print(json.dumps(result, allow_nan=False))


if __name__ == "__main__":
    main()
