"""CLI logic of `saekit steer RUN --sweep ...` and `saekit contrast RUN --label L --positive V`.

    saekit contrast runs/quickstart-smollm2 --label topic --positive airline       # which latents separate them
    saekit steer runs/quickstart-smollm2 --sweep --contrast topic=airline           # best one, swept
    saekit steer runs/quickstart-smollm2 --sweep --feature 18 --strengths 0,20,40,80 --target-label topic=airline

The sweep writes `<run>/steer/sweep-<what>/sweep.json` and `effect_vs_damage.png` and prints the
table and the chosen strength. When the run has a probe report, its probe (label, positive class,
training documents) is refitted on the store's pooled activations and scores the generated text.
"""

from __future__ import annotations

from pathlib import Path

from saekit.analysis.contrastive import contrast_store, label_top_tokens, store_class_means, store_probe
from saekit.analysis.steering import topic_token_ids
from saekit.analysis.steering_sweep import DEFAULT_KL_BUDGET, steering_sweep
from saekit.analysis.sweep_report import format_sweep_table, write_sweep_report
from saekit.artifacts import atomic_write_json, read_json, to_strict_json
from saekit.errors import ConfigError
from saekit.eval.bootstrap import interval_fn
from saekit.eval.difference import difference_interval_fn
from saekit.layout import RunFolder
from saekit.run.stages import checked_sae_and_store

DEFAULT_PROMPTS = ("Yesterday I went to the", "My favourite thing about today is", "I just bought a new",
                   "The best part of the weekend was the", "Let me tell you about my", "I am so tired of",
                   "Can someone explain why", "This morning I")


def _label_value(text: str, flag: str) -> tuple[str, str]:
    if "=" not in text:
        raise ConfigError(f"{flag}: expected LABEL=VALUE (e.g. topic=airline), found '{text}'")
    label, value = text.split("=", 1)
    return label, value


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError as e:
        raise ConfigError(f"--strengths: expected comma-separated numbers, found '{text}'") from e


def add_sweep_arguments(parser) -> None:
    g = parser.add_argument_group("measured sweep (--sweep)")
    g.add_argument("--sweep", action="store_true", help="measure effect and damage over --strengths")
    g.add_argument("--strengths", default="0,10,20,40,80,160", help="comma-separated strengths (0 always added)")
    g.add_argument("--prompts-file", default=None, help="one prompt per line (default: 8 built-in prompts)")
    g.add_argument("--contrast", default=None, metavar="LABEL=VALUE",
                   help="pick the feature by contrastive search on this label split of the run's corpus")
    g.add_argument("--vector", default=None, metavar="LABEL=VALUE",
                   help="sweep the RepE class-mean direction (unit norm) of this label split instead of a feature")
    g.add_argument("--target-words", default=None, help="comma-separated target words (leading space kept)")
    g.add_argument("--target-label", default=None, metavar="LABEL=VALUE",
                   help="target tokens: the label's most over-represented word tokens (default: --contrast's)")
    g.add_argument("--condition", default=None, metavar="J>T", help="edit only where latent J fires above T")
    g.add_argument("--mode", default="add", choices=["add", "clamp"], help="strength adds or clamps the feature")
    g.add_argument("--kl-budget", type=float, default=DEFAULT_KL_BUDGET, help="nats per token on neutral text")
    g.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples for the intervals (0: none)")
    g.add_argument("--max-docs", type=int, default=2000, help="documents read for contrast/vector/probe")


def _prompts(args) -> list[str]:
    if args.prompts_file:
        lines = [ln.strip() for ln in Path(args.prompts_file).read_text().splitlines() if ln.strip()]
        if not lines:
            raise ConfigError(f"--prompts-file: expected one prompt per line, found none in {args.prompts_file}")
        return lines
    return [args.prompt] if args.prompt else list(DEFAULT_PROMPTS)


def _target_ids(args, tok, store) -> list[int]:
    if args.target_words:
        return topic_token_ids(tok, [w if w.startswith(" ") else " " + w for w in args.target_words.split(",") if w])
    spec = args.target_label or args.contrast or args.vector
    if not spec:
        return []
    label, value = _label_value(spec, "--target-label")
    return label_top_tokens(tok, list(store.docs.values()), label, value)


def _probe(folder: RunFolder, store, args):
    path = folder.probe / "report.json"
    if not path.exists():
        return None
    rep = read_json(path)
    return store_probe(store, rep["label"], rep["positive"], doc_ids=rep.get("train_doc_ids"),
                       max_docs=args.max_docs, seed=rep.get("seed", 0))


def _what_to_steer(args, store, sae) -> tuple[dict, str, dict | None]:
    """(feature= or vector= keyword, a folder name, the contrast report when one picked the feature)."""
    if args.vector:
        label, value = _label_value(args.vector, "--vector")
        pos, neg = store_class_means(store, label, value, max_docs=args.max_docs, seed=args.seed)
        v = pos.mean(0) - neg.mean(0)
        return {"vector": v / v.norm().clamp_min(1e-12)}, f"sweep-vector-{label}-{value}", None
    if args.contrast:
        label, value = _label_value(args.contrast, "--contrast")
        rep = contrast_store(store, sae, label, value, max_docs=args.max_docs, seed=args.seed,
                             interval=difference_interval_fn(args.resamples, args.seed) if args.resamples else None)
        if rep["best"] is None:
            raise ConfigError(f"--contrast {args.contrast}: no latent separates the two sets")
        return {"feature": rep["best"]}, f"sweep-f{rep['best']}", rep
    if len(args.feature) != 1:
        raise ConfigError(f"steer --sweep: expected one --feature (or --contrast/--vector), found {len(args.feature)}")
    return {"feature": args.feature[0]}, f"sweep-f{args.feature[0]}", None


def _condition(text: str | None) -> dict | None:
    if not text:
        return None
    try:
        j, t = text.split(">")
        return {"detector": int(j), "threshold": float(t)}
    except ValueError as e:
        raise ConfigError(f"--condition: expected J>T (e.g. 812>2.0), found '{text}'") from e


def cmd_sweep(args) -> int:
    from saekit.sources.models import load_for_spec

    strengths, cond, prompts = _floats(args.strengths), _condition(args.condition), _prompts(args)  # checked first
    folder = RunFolder(Path(args.run))
    folder = (folder.for_sae(args.sae) if getattr(args, "sae", None) else folder).require_one_sae()
    sae, store, checked = checked_sae_and_store(folder, force=args.force)
    print(checked.summary())
    if store.kind == "embedding":
        raise ConfigError("steer --sweep: expected an LLM run (generation), found an embedding run; "
                          "use `saekit contrast` and `saekit steer --prompt` (steered search) there")
    sae = sae.eval()
    model, tok = load_for_spec(store.manifest["source"])
    what, name, contrast = _what_to_steer(args, store, sae)
    report = steering_sweep(model, tok, args.hook or store.hook, prompts, strengths, sae=sae,
                            mode=args.mode, condition=cond, target_token_ids=_target_ids(args, tok, store),
                            probe=_probe(folder, store, args), max_new_tokens=args.max_new_tokens, seed=args.seed,
                            do_sample=not args.greedy, temperature=args.temperature, kl_budget=args.kl_budget,
                            interval=interval_fn(args.resamples, args.seed) if args.resamples else None, **what)
    report["contrast"], report["preflight"] = contrast, checked.to_dict()
    paths = write_sweep_report(report, folder.steer / (name + ("-conditional" if cond else "")))
    if contrast:
        print(f"contrastive search {args.contrast}: best feature {contrast['best']} "
              f"(diff {contrast['features'][0]['diff']:.3f})")
    print(format_sweep_table(report))
    chosen = next(r for r in report["rows"] if r["strength"] == report["chosen"]["strength"])
    for p, s in list(zip(report["prompts"], chosen["samples"]))[:3]:
        print(f"  {p!r} -> {s!r}")
    print(f"wrote {paths['json']} and {paths['png']}")
    return 0


# -- `saekit contrast` ---------------------------------------------------------------------------------------


def cmd_contrast(args) -> int:
    folder = RunFolder(Path(args.run))
    folder = (folder.for_sae(args.sae) if getattr(args, "sae", None) else folder).require_one_sae()
    sae, store, checked = checked_sae_and_store(folder, force=args.force)
    print(checked.summary())
    rep = contrast_store(store, sae.eval(), args.label, args.positive, top_n=args.top_n, max_docs=args.max_docs,
                         seed=args.seed, interval=difference_interval_fn(args.resamples, args.seed)
                         if args.resamples else None)
    print(f"{rep['label']}={rep['positive']} ({rep['n_a']} documents) vs the rest ({rep['n_b']}), unit {rep['unit']}")
    print(f"{'feature':>8} {'diff':>8} {'95% interval':>20} {'fires A':>8} {'fires B':>8}  example")
    for r in rep["features"]:
        ci = "" if not r["ci95"] else f"[{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]"
        ex = r["examples"][0]["text"][:60] if r["examples"] else ""
        print(f"{r['feature']:>8} {r['diff']:>8.3f} {ci:>20} {r['fires_a']:>8.0%} {r['fires_b']:>8.0%}  {ex!r}")
    path = folder.steer / f"contrast-{args.label}-{args.positive}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, to_strict_json(rep))
    print(f"best feature {rep['best']}; wrote {path}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("contrast", help="latents that separate a label's documents from the rest (with intervals)")
    p.add_argument("run", help="run folder (LLM or embedding run)")
    p.add_argument("--sae", default=None, help="which SAE of a multi-SAE run")
    p.add_argument("--label", required=True, help="document label (e.g. topic)")
    p.add_argument("--positive", required=True, help="the label value of set A (e.g. airline)")
    p.add_argument("--top-n", type=int, default=10)
    p.add_argument("--max-docs", type=int, default=2000)
    p.add_argument("--resamples", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="accept a model-name alias between SAE and store")
    p.set_defaults(fn=cmd_contrast)
