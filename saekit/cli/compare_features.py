"""`saekit compare-features A B`: match the latents of two runs' SAEs over the same documents and compare
the matched feature spaces (SVCCA, CKA, shuffled baselines). Writes `<A>/compare/<B>/compare.json`
(summary, every pair, top examples) and `compare.png`; the browser's "Twins" page reads them.
"""

from __future__ import annotations

from pathlib import Path

from saekit.analysis.compare_features import Comparison, Side, compare_features
from saekit.artifacts import atomic_write_json, to_strict_json
from saekit.layout import RunFolder, safe_name
from saekit.run.stages import checked_sae_and_store

COMPARE_JSON, COMPARE_PNG = "compare.json", "compare.png"


def _side(path: str, sae_name: str | None) -> tuple[RunFolder, Side]:
    folder = RunFolder(Path(path)).require_run()
    folder = (folder.for_sae(sae_name) if sae_name else folder).require_one_sae()
    sae, store, _ = checked_sae_and_store(folder)
    return folder, Side(sae.eval(), store, folder.label)


def _decoder(side: Side, level: str):
    """The tokenizer's decode for token-level examples (ids shown as <id> when the model is not available)."""
    if side.store.kind == "embedding" or level == "document":
        return None
    from saekit.errors import ModelNotAvailableError
    from saekit.sources.models import load_lm

    try:
        tok = load_lm(side.store.manifest.source.get("model", "default"))[1]
    except (ModelNotAvailableError, OSError, ValueError):
        return None
    return lambda ids: tok.decode(ids)


def plot_comparison(res: Comparison, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = res.summary()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax1.hist([c for _, _, c in res.pairs], bins=40, range=(-0.2, 1.0), color="tab:blue")
    ax1.axvline(res.threshold, color="k", ls="--", lw=1)
    ax1.set(xlabel="activation correlation of matched pair", ylabel="pairs",
            title=f"{s['share_matched']:.1%} of live A latents matched at ≥ {res.threshold}")
    ax1.title.set_fontsize(9)
    names = ["SVCCA", "CKA"]
    ax2.bar([0, 2], [s["svcca"], s["cka"]], label="matched spaces")
    ax2.bar([1, 3], [s["svcca_permuted"], s["cka_permuted"]], label="rows shuffled (baseline)", color="tab:grey")
    ax2.set_xticks([0.5, 2.5], names)
    ax2.set(ylim=(0, 1.05))
    ax2.set_title(f"matched spaces, {res.level} level", fontsize=9)
    fig.suptitle(f"A = {res.labels[0]}   vs   B = {res.labels[1]}", fontsize=10)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cmd_compare_features(args) -> int:
    fa, a = _side(args.a, args.sae_a)
    fb, b = _side(args.b, args.sae_b)
    if a.label == b.label:
        a.label, b.label = f"{a.label}(A)", f"{b.label}(B)"
    decode = _decoder(a, args.level) if args.tokens else None
    res = compare_features(a, b, level=args.level, decode=decode, threshold=args.threshold, method=args.method,
                           max_rows=args.max_rows or None, n_perm=args.permutations, top_pairs=args.example_pairs,
                           seed=args.seed)
    out = Path(args.out) if args.out else fa.compare / safe_name(b.label.replace("/", "--"), "compared run")
    out.mkdir(parents=True, exist_ok=True)
    s = res.summary()
    atomic_write_json(out / COMPARE_JSON, to_strict_json({
        "summary": s, "a_run": str(fa.root), "b_run": str(fb.root),
        "pairs": [{"a": x, "b": y, "corr": c} for x, y, c in res.pairs], "examples": res.examples}))
    plot_comparison(res, out / COMPARE_PNG)
    print(f"{s['a']} vs {s['b']}: {s['level']} level, {s['aligned_rows']} aligned rows; live latents "
          f"{s['alive_a']} / {s['alive_b']}; {s['method']} matching")
    print(f"matched at corr >= {s['threshold']}: {s['matched_above_threshold']} ({s['share_matched']:.1%} of live A "
          f"latents); mean matched corr {s['mean_matched_corr']:.3f}; mean best corr {s['mean_max_corr_a']:.3f}")
    print(f"SVCCA {s['svcca']:.3f} (shuffled {s['svcca_permuted']:.3f})   CKA {s['cka']:.3f} "
          f"(shuffled {s['cka_permuted']:.3f})   on {s['similarity_on']}")
    if "svcca_all_pairs" in s:
        print(f"all {len(res.pairs)} matched pairs: SVCCA {s['svcca_all_pairs']:.3f} (shuffled "
              f"{s['svcca_permuted_all_pairs']:.3f})   CKA {s['cka_all_pairs']:.3f} (shuffled {s['cka_permuted_all_pairs']:.3f})")
    for key, ex in list(res.examples.items())[: args.show]:
        fa_, fb_ = key.split("-")
        corr = res.twins()[int(fa_)][1]
        print(f"  {s['a']}#{fa_} <-> {s['b']}#{fb_}  corr {corr:.3f}")
        for ea, eb in zip(ex["a"], ex["b"]):
            ta, tb = ea.get("context", ea["text"]), eb.get("context", eb["text"])
            print(f"      {ta[-48:]!r:<52} | {tb[-48:]!r}")
    print(f"saved {out / COMPARE_JSON} and {out / COMPARE_PNG}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("compare-features", help="match two runs' SAE latents by activation correlation; SVCCA/CKA")
    p.add_argument("a", help="run folder A (its store and SAE)")
    p.add_argument("b", help="run folder B over the same documents")
    p.add_argument("--sae-a", default=None, help="which SAE of a multi-SAE run A")
    p.add_argument("--sae-b", default=None, help="which SAE of a multi-SAE run B")
    p.add_argument("--level", default="auto", choices=["auto", "token", "document"],
                   help="align rows on (doc_id, position) or mean-pool per document (auto: token when one tokenizer)")
    p.add_argument("--threshold", type=float, default=0.5, help="correlation a matched pair must reach")
    p.add_argument("--method", default="hungarian", choices=["hungarian", "mnn"])
    p.add_argument("--max-rows", type=int, default=20000, help="sample at most this many aligned rows (0: all)")
    p.add_argument("--permutations", type=int, default=3, help="row shuffles for the baseline")
    p.add_argument("--example-pairs", type=int, default=200, help="best pairs whose top examples are saved")
    p.add_argument("--no-tokens", dest="tokens", action="store_false",
                   help="token-level examples as token ids (do not load the tokenizer)")
    p.add_argument("--show", type=int, default=8, help="best pairs printed with their top examples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output folder (default: A's compare/<B> folder)")
    p.set_defaults(fn=cmd_compare_features)
