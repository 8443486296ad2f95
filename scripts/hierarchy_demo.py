"""MP-SAE vs top-k SAE on planted hierarchical features, at equal L0 (Costa et al. 2025, claim (i)).

Both SAEs are trained with the saekit trainer on the same rows (same steps, lr, batches) and the
same L0 budget k, then scored by how well their decoder rows recover the planted directions
(mean over true directions of the best cosine with any decoder row, and the fraction above 0.9).

Two geometries (saekit.data.hierarchical):
* `orthogonal` (child_parent_cos 0): each child direction is orthogonal to its parent and to its
  siblings, and fires only with its parent -- the geometry of the paper's toy tree. Claim (i) is
  about this case: MP-SAE recovers the child directions better than top-k.
* `siblings-0.5` (child_parent_cos 0, sibling_cos 0.5): as `orthogonal`, but the children of one
  parent share a direction (pairwise cosine 0.5), the paper's intra-level correlation knob.
* `inclusive` (child_parent_cos 0.8): each child direction also carries 0.8 of its parent. Here the
  rows are equally sparse as parent + (child - 0.8 parent); MP learns those conditionally orthogonal
  offsets, top-k comes closer to the raw child directions.
Prints a table, then one JSON line.

    python scripts/hierarchy_demo.py [--seeds 3] [--steps 800]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from saekit.data.hierarchical import HierarchicalData, hierarchical_features
from saekit.eval.ground_truth import max_cosine_per_atom
from saekit.sae.matching_pursuit import MatchingPursuitSAE, MPConfig
from saekit.sae.topk import TopKConfig, TopKSAE
from saekit.store.batches import TensorBatches
from saekit.train import TrainConfig, train

SETTING = dict(d_in=64, n_parents=16, children_per_parent=4, parents_per_row=2, p_child=0.8,
               parent_in_child_rows=True)
GEOMETRIES = {"orthogonal": dict(child_parent_cos=0.0, sibling_cos=0.0),
              "siblings-0.5": dict(child_parent_cos=0.0, sibling_cos=0.5),
              "inclusive": dict(child_parent_cos=0.8, sibling_cos=0.0)}


def make_data(seed: int, geometry: dict, n: int = 16384) -> HierarchicalData:
    return hierarchical_features(n, SETTING["d_in"], SETTING["n_parents"], SETTING["children_per_parent"],
                                 parents_per_row=SETTING["parents_per_row"], p_child=SETTING["p_child"],
                                 parent_in_child_rows=SETTING["parent_in_child_rows"], seed=seed, **geometry)


def fit(sae, data: HierarchicalData, steps: int, lr: float, batch: int = 256):
    """Train with the saekit loop (no checkpoints, no decay) in a throwaway run folder."""
    cfg = TrainConfig(total_steps=steps, batch_size=batch, lr=lr, decay="none", checkpoint_every=0,
                      progress_bar=False, log_every=steps, deterministic=False)
    with tempfile.TemporaryDirectory() as run_dir:
        train(sae, TensorBatches(data.x_ND, batch, seed=0), cfg, run_dir)
    return sae.eval()


def score(sae, data: HierarchicalData) -> dict:
    """Recovery of parents / children / conditionally orthogonal offsets, and FVU on the rows."""
    W = sae.W_dec.detach()
    out = {}
    for name, D in (("parents", data.parents_PD), ("children", data.children_CD), ("offsets", data.offsets_CD)):
        best = max_cosine_per_atom(W, D)
        out[f"{name}_mmcs"] = float(best.mean())
        out[f"{name}_frac90"] = float((best > 0.9).double().mean())
    with torch.no_grad():
        x = data.x_ND[:4096]
        recon = sae(x).recon
        out["fvu"] = float((recon - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
        out["l0"] = float(sae.encode(x).l0().float().mean())
    return out


def run(seed: int, steps: int, k: int, geometry: dict) -> dict[str, dict]:
    data = make_data(seed, geometry)
    d_sae = 2 * (SETTING["n_parents"] * (1 + SETTING["children_per_parent"]))
    mp = MatchingPursuitSAE(MPConfig(d_in=SETTING["d_in"], d_sae=d_sae, k=k, seed=seed))
    tk = TopKSAE(TopKConfig(d_in=SETTING["d_in"], d_sae=d_sae, k=k, seed=seed))
    return {"mp": score(fit(mp, data, steps, 3e-3), data), "topk": score(fit(tk, data, steps, 3e-3), data)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--k", type=int, default=2 * SETTING["parents_per_row"], help="L0 of both SAEs (default: "
                    "the data's, a parent and a child per active hierarchy)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    cols = ["l0", "fvu", "parents_mmcs", "children_mmcs", "children_frac90", "offsets_mmcs"]
    print(f"hierarchical data {SETTING}, k={args.k}, {args.steps} steps, mean over {args.seeds} seeds")
    print(f"{'geometry':<13}{'arch':<6}" + "".join(f"{c:>17}" for c in cols))
    result = {}
    for name, geometry in GEOMETRIES.items():
        runs = [run(s, args.steps, args.k, geometry) for s in range(args.seeds)]
        mean = {a: {m: sum(r[a][m] for r in runs) / len(runs) for m in runs[0][a]} for a in ("mp", "topk")}
        for arch in ("mp", "topk"):
            print(f"{name:<13}{arch:<6}" + "".join(f"{mean[arch][c]:>17.3f}" for c in cols))
        wins = {m: f"{sum(r['mp'][m] > r['topk'][m] for r in runs)}/{len(runs)}" for m in ("children_mmcs", "offsets_mmcs")}
        result[name] = {**geometry, "mp": mean["mp"], "topk": mean["topk"], "mp_wins": wins}
    print(json.dumps({"bench": "hierarchy_demo", "setting": SETTING, "k": args.k, "steps": args.steps,
                      "seeds": args.seeds, **result, "seconds": round(time.perf_counter() - t0, 1)}))

if __name__ == "__main__":
    main()
