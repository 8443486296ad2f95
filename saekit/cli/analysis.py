"""CLI logic of `saekit probe RUN` and `saekit steer RUN` (printing happens here).

Kept apart from probing.py and steering.py so the library modules hold only the APIs. Which SAE and
store a run folder holds is the run layer's answer (`RunFolder`, `checked_sae_and_store`, which also runs
the preflight): a run whose config sets `store.path` is read there, and a multi-SAE run is probed once per SAE.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from saekit.analysis.probe_report import format_ci
from saekit.analysis.probing import METHODS, format_probe_table, probe_sweep, write_probe_report
from saekit.analysis.steering import FeatureEdit, generate_steered, steered_search
from saekit.artifacts import atomic_write_json
from saekit.cli.steer_sweep import add_sweep_arguments, cmd_sweep
from saekit.errors import ConfigError, UsageError
from saekit.eval.preflight import check_model_hook
from saekit.eval.bootstrap import interval_fn
from saekit.layout import RunFolder
from saekit.run.stages import checked_sae_and_store
from saekit.store.locate import store_for_hook

# -- CLI logic `saekit probe` -------------------------------------------------------------


def int_list(text: str) -> list[int]:
    """"1,2, 4" -> [1, 2, 4] for the --ks style options (shared by the analysis and retrieval commands)."""
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError as e:
        raise ConfigError(f"expected a comma-separated list of integers, found '{text}'") from e


def add_probe_arguments(parser) -> None:
    parser.add_argument("run", help="run folder (its store and trained SAE; every SAE of a multi-SAE run)")
    parser.add_argument("--sae", default=None, help="only this SAE of a multi-SAE run")
    parser.add_argument("--label", default="sentiment", help="document label to probe (default: sentiment)")
    parser.add_argument("--positive", default=None, help="positive class (default: the most frequent class)")
    parser.add_argument("--ks", default="1,2,5,10,20", help="comma-separated k values")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {METHODS}")
    parser.add_argument("--test-frac", type=float, default=0.3, help="fraction of documents held out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-rows", type=int, default=None, help="probe at most this many rows (seeded sample)")
    parser.add_argument("--pooling", default=None, choices=["mean", "max", "last", "token"],
                        help="LLM stores: pool each document's tokens (default mean, as SAEBench) or probe tokens")
    parser.add_argument("--one-vs-rest", action="store_true", help="also probe every class against the rest")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples for accuracy intervals (0: none)")
    parser.add_argument("--no-sae", action="store_true", help="raw neurons only")
    parser.add_argument("--out", default=None, help="output folder (default: the run's probe folder)")
    parser.add_argument("--force", action="store_true",
                        help="run even when the SAE's model name differs from the store's (an alias); recorded")


def _folders(args) -> list[RunFolder]:
    """The run folder scoped to --sae, or one folder per SAE of the run."""
    folder = RunFolder(Path(args.run)).require_run()
    return [folder.for_sae(args.sae)] if getattr(args, "sae", None) else folder.per_sae()


def cmd_probe(args) -> int:
    folders = _folders(args)
    if args.out and len(folders) > 1:
        raise ConfigError(f"probe: --out names one folder but {args.run} holds {len(folders)} SAEs; add --sae NAME")
    for folder in folders:
        _probe_one(args, folder)
    return 0


def _probe_one(args, folder: RunFolder) -> None:
    sae, store, checked = (None, store_for_hook(folder.store, None), None) if args.no_sae \
        else checked_sae_and_store(folder, force=args.force)
    report = probe_sweep(store, args.label, sae=sae, ks=int_list(args.ks),
                         methods=[m for m in args.methods.split(",") if m], test_frac=args.test_frac,
                         seed=args.seed, max_rows=args.max_rows, positive=args.positive, pooling=args.pooling,
                         classes="all" if args.one_vs_rest else None,
                         interval=interval_fn(args.resamples, args.seed) if args.resamples > 0 else None)
    if checked is not None:
        report["preflight"] = checked.to_dict()
        print(checked.summary())
    paths = write_probe_report(report, args.out or folder.probe)
    print(f"== {folder.label}: probe '{report['label']}' = {report['positive']} vs rest: {report['n_train_docs']} train / "
          f"{report['n_test_docs']} test documents, {report['n_rows']} rows, unit {report['unit']} "
          f"(pooling {report['pooling']})")
    print(format_probe_table(report))
    for fs, by_method in report["winners"].items():
        for method, w in by_method.items():
            ex = w["top_examples"][0]["text"][:80] if w["top_examples"] else ""
            print(f"k=1 {fs}/{method}: feature {w['feature']} ({w['sign']}) acc {w['accuracy']:.3f}"
                  f"{format_ci((w.get('ci95') or {}).get('accuracy'))} — e.g. {ex!r}")
    print(f"wrote {paths['json']} and {paths['png']}")


# -- CLI logic `saekit steer` -------------------------------------------------------------


def add_steer_arguments(parser) -> None:
    parser.add_argument("run", help="run folder (its store and trained SAE)")
    parser.add_argument("--sae", default=None, help="which SAE of a multi-SAE run")
    parser.add_argument("--prompt", default=None,
                        help="prompt to continue (LLM runs) or query text (embedding runs); required without --sweep")
    parser.add_argument("--feature", type=int, action="append", default=[], help="feature to add (repeatable)")
    parser.add_argument("--alpha", type=float, action="append", default=[],
                        help="strength per --feature (repeatable; one value applies to every feature)")
    parser.add_argument("--clamp", action="append", default=[], metavar="N=V", help="clamp feature N to V (repeatable)")
    parser.add_argument("--ablate", type=int, action="append", default=[], help="ablate feature N (repeatable)")
    parser.add_argument("--hook", default=None, help="hook point (default: the run's store hook)")
    parser.add_argument("--max-new-tokens", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-n", type=int, default=10, help="results shown for embedding-search steering")
    parser.add_argument("--force", action="store_true",
                        help="run even when the SAE's model name differs from the store's (an alias); recorded")
    add_sweep_arguments(parser)


def edits_from_args(args) -> list[FeatureEdit]:
    """FeatureEdits from --feature/--alpha, --clamp N=V and --ablate N."""
    alphas = list(args.alpha)
    if args.feature and len(alphas) == 1:
        alphas = alphas * len(args.feature)
    if len(alphas) != len(args.feature):
        raise ConfigError(f"steer: expected one --alpha per --feature (or a single one), found {len(args.feature)} "
                          f"features and {len(args.alpha)} alphas")
    edits = [FeatureEdit(f, "add", alpha=a) for f, a in zip(args.feature, alphas)]
    for item in args.clamp:
        try:
            n, v = item.split("=")
            edits.append(FeatureEdit(int(n), "clamp", value=float(v)))
        except ValueError as e:
            raise ConfigError(f"steer: expected --clamp N=V (e.g. 123=5.0), found '{item}'") from e
    edits += [FeatureEdit(n, "ablate") for n in args.ablate]
    if not edits:
        raise ConfigError("steer: expected at least one --feature/--alpha, --clamp or --ablate")
    return edits


def _search_for_cli(store, sae, model, prompt: str, edits, top_n: int) -> dict:
    query_D = torch.as_tensor(model.encode([prompt], convert_to_tensor=True))[0].float().cpu()
    res = steered_search(sae, query_D, store[:], edits, top_n=top_n)
    doc_ids = store.meta("doc_id")
    text = lambda row: (store.docs.get(int(doc_ids[row]), {}).get("text") or "")[:100]
    for key in ("before", "after"):
        res[key] = [{"row": r, "score": s, "doc_id": int(doc_ids[r]), "text": text(r)} for r, s in res[key]]
    return {"prompt": prompt, "mode": "search", "edits": [asdict(e) for e in edits], **res}


def _print_side_by_side(out: dict) -> None:
    if out.get("mode") == "search":
        print(f"query: {out['prompt']!r}   (query moved: cosine {out['query_shift']:.3f} to the original)")
        for i, (b, a) in enumerate(zip(out["before"], out["after"])):
            print(f"{i + 1:>3}  {b['score']:.3f} {b['text'][:45]:<45} | {a['score']:.3f} {a['text'][:45]}")
        return
    print(f"prompt:  {out['prompt']!r}")
    print(f"default: {out['default']!r}")
    print(f"steered: {out['steered']!r}")


def cmd_steer(args) -> int:
    import time

    from saekit.artifacts import to_strict_json
    from saekit.sources.models import load_for_spec

    if getattr(args, "sweep", False):
        return cmd_sweep(args)
    if not args.prompt:
        raise UsageError("steer: expected --prompt (or --sweep for a measured sweep), found neither")
    folder = RunFolder(Path(args.run))
    folder = (folder.for_sae(args.sae) if getattr(args, "sae", None) else folder).require_one_sae()
    sae, store, checked = checked_sae_and_store(folder, force=args.force)
    if args.hook:
        check_model_hook(checked, args.hook)
    print(checked.summary())
    sae = sae.eval()
    edits = edits_from_args(args)
    model, tok = load_for_spec(store.manifest["source"])
    if store.kind == "embedding":
        out = _search_for_cli(store, sae, model, args.prompt, edits, args.top_n)
    else:
        out = generate_steered(model, tok, args.prompt, args.hook or store.hook, sae=sae, edits=edits,
                               max_new_tokens=args.max_new_tokens, seed=args.seed, do_sample=not args.greedy,
                               temperature=args.temperature)
    out["preflight"] = checked.to_dict()
    _print_side_by_side(out)
    path = folder.steer / f"steer-{time.strftime('%Y%m%d-%H%M%S')}-seed{args.seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, to_strict_json(out))
    print(f"saved {path}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("probe", help="sparse probing: SAE features vs neurons for a sweep of k")
    add_probe_arguments(p)
    p.set_defaults(fn=cmd_probe)
    p = sub.add_parser("steer", help="steered vs default generation (LLM runs) with the same seed")
    add_steer_arguments(p)
    p.set_defaults(fn=cmd_steer)
