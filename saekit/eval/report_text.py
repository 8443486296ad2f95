"""An eval report as text: the table with intervals, the train-vs-held-out block, side-by-side
comparison of several reports with "(not) distinguishable" verdicts, and the spread over seeds.

Kept apart from `saekit.eval.report` (which measures) so each file reads as one job: this one only
turns report dicts into strings and comparison records; it computes no metric of its own.
"""

from __future__ import annotations

import math
from typing import Any

from saekit.artifacts import dumps_json
from saekit.eval.bootstrap import compare_figures

def fmt_value(v: Any, digits: int = 4) -> str:
    """A report cell: `digits` significant figures, "-" for missing or non-finite (shared with report_plots'
    captions so a figure and its table print the same number)."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return "-"
        return f"{v:.{digits}g}"
    return str(v)


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(header), line] + [fmt(r) for r in rows])


def format_report(report: dict) -> str:
    """A human-readable table of one report."""
    s, rec, sp = report["sae"], report["reconstruction"], report["sparsity"]
    rci, sci = rec.get("ci95") or {}, sp.get("ci95") or {}
    rows = [
        ["architecture", fmt_value(s.get("architecture")), ""], ["d_in / d_sae", f"{s.get('d_in')} / {s.get('d_sae')}", ""],
        ["rows", fmt_value(report["n_rows"]), ""],
        ["MSE", fmt_value(rec["mse"]), _fmt_ci(rci.get("mse"))], ["FVU", fmt_value(rec["fvu"]), _fmt_ci(rci.get("fvu"))],
        ["explained variance", fmt_value(rec["explained_variance"]), _fmt_ci(rci.get("explained_variance"))],
        ["cosine(x, x_hat)", fmt_value(rec["cosine_mean"]), _fmt_ci(rci.get("cosine_mean"))],
        ["shrinkage |x_hat|/|x|", fmt_value(rec["shrinkage_mean"]), ""],
        ["L0 mean (std)", f"{fmt_value(sp['l0_mean'])} ({fmt_value(sp['l0_std'])})", _fmt_ci(sci.get("l0_mean"))],
        ["dead fraction", fmt_value(sp["dead_fraction"]), ""],
        [f"dense fraction (>{sp['dense_threshold']})", fmt_value(sp["dense_fraction"]), ""],
    ]
    rows += _outlier_rows(report)
    gt = report.get("ground_truth")
    if gt:
        rows += [["GT mean max cos", fmt_value(gt["mean_max_cosine"]), ""],
                 [f"GT recovered (>{gt['threshold']})", fmt_value(gt["fraction_recovered"]), ""],
                 ["GT MCC (Hungarian)", fmt_value(gt.get("mcc")), ""]]
    rt = report.get("retrieval")
    if rt:
        rows += [[f"recall@{rt['k']} ({rt['n_docs']} docs)", fmt_value(rt["recall_at_k"]),
                  _fmt_ci((rt.get("ci95") or {}).get("recall_at_k"))],
                 ["retrieval cosine", fmt_value(rt["cosine_mean"]), ""]]
    sp_in = (report.get("downstream") or {}).get("splice_in")
    if sp_in:
        sci_ = sp_in.get("ci95") or {}
        rows += [[f"loss recovered ({sp_in.get('n_tokens')} tokens)", fmt_value(sp_in.get("loss_recovered")),
                  _fmt_ci(sci_.get("loss_recovered"))],
                 ["KL(clean || spliced)", fmt_value(sp_in.get("kl_spliced")), _fmt_ci(sci_.get("kl_spliced"))]]
    dl = report.get("description_length")
    out = _table(rows, ["metric", "value", "95% CI"]) + _row_set_note(report) + _bootstrap_note(report)
    if dl:
        out += (f"\n\nDescription length (bits per activation vector; activity {fmt_value(dl['activity_bits_per_row'])}; "
                f"selected {fmt_value(dl['selected_bits'])} bits -> DL {fmt_value(dl['dl_bits_per_row'])} "
                f"within FVU +{dl['fvu_tolerance']})\n")
        out += _table([[str(e["bits"]), fmt_value(e["dl_bits_per_row"]), fmt_value(e["dl_flat_bits_per_row"]),
                        fmt_value(e.get("fvu")), fmt_value(e.get("fvu_increase"))] for e in dl["sweep"]],
                      ["bits", "DL (entropy)", "DL (flat b)", "FVU", "FVU increase"])
    gen = report.get("generalisation")
    if gen:
        out += "\n\n" + format_generalisation(gen)
    if report.get("downstream"):
        out += "\n\nDownstream\n" + "\n".join(f"  {k}: {dumps_json(v, indent=None)}" for k, v in report["downstream"].items())
    return out


def _fmt_ci(ci: list[float] | None) -> str:
    return "" if not ci else f"[{fmt_value(ci[0])}, {fmt_value(ci[1])}]"


def _bootstrap_note(report: dict) -> str:
    b = report.get("bootstrap")
    if not b:
        return ""
    return (f"\n95% intervals: {b['method']} bootstrap over {b['n_units']} units ({b['unit']}), "
            f"{b['resamples']} resamples, seed {b['seed']}.")


def _outlier_rows(report: dict) -> list[list[str]]:
    """The table's lines on the row set: headline rows, and the outliers' own figures."""
    rs, out = report.get("row_set"), report.get("outliers")
    if not rs or not out:
        return []
    rows = [["headline rows", f"ordinary ({rs['outlier_rows']} outliers apart)", ""],
            ["outlier rows: count / FVU", f"{out['count']} / {fmt_value(out.get('fvu'))}",
             _fmt_ci((out.get("ci95") or {}).get("fvu"))]]
    if out.get("all_rows"):
        rows.append(["FVU all rows (incl. outliers)", fmt_value(out["all_rows"]["fvu"]), ""])
    return rows


def _row_set_note(report: dict) -> str:
    """A sentence under the table saying which rows the headline covers and by which rule."""
    rs, out = report.get("row_set"), report.get("outliers")
    if not rs or not out:
        return ""
    note = (f"\nHeadline figures are on {rs['ordinary_rows']} ordinary held-out rows; {out['count']} massive-activation "
            f"outlier rows ({rs['outlier_rule'].get('description')}) are reported apart")
    if out.get("all_rows"):
        note += f" (FVU of all rows together: {fmt_value(out['all_rows']['fvu'])})"
    return note + "."


def format_generalisation(gen: dict) -> str:
    """Training rows vs held-out rows, side by side, the gap, and the warning when there is one."""
    tr, ho = gen["train"], gen["heldout"]
    rows = [[name, fmt_value(tr[key]), fmt_value(ho[key])] for name, key in
            (("rows", "rows"), ("FVU", "fvu"), ("explained variance", "explained_variance"),
             ("cosine(x, x_hat)", "cosine_mean"), ("L0 mean", "l0_mean"))]
    out = "Training vs held-out reconstruction\n" + _table(rows, ["metric", "training rows", "held-out rows"])
    out += f"\ngap (held-out - training FVU): {fmt_value(gen['gap'])} ({fmt_value(gen['ratio'], 3)}x)"
    t = gen.get("training") or {}
    if t.get("epochs") is not None:
        out += f"; trained for {fmt_value(t['epochs'], 3)} epochs over {fmt_value(t.get('rows_per_epoch'))} rows"
    if gen.get("warning"):
        out += f"\nWARNING: {gen['warning']}"
    return out


def compare_table(reports: dict[str, dict]) -> str:
    """One row per run: L0, FVU, EV, cosine, shrinkage, dead/dense fractions, DL, MCC, recall@k."""
    rows = []
    for name, r in reports.items():
        rec, sp = r["reconstruction"], r["sparsity"]
        dl, gt, rt = r.get("description_length"), r.get("ground_truth"), r.get("retrieval")
        rows.append([name, fmt_value(r["n_rows"]), fmt_value(sp["l0_mean"]), fmt_value(rec["fvu"]), fmt_value(rec["explained_variance"]),
                     fmt_value(rec["cosine_mean"]), fmt_value(rec["shrinkage_mean"]), fmt_value(sp["dead_fraction"]),
                     fmt_value(sp["dense_fraction"]), fmt_value(dl["dl_bits_per_row"]) if dl else "-",
                     fmt_value(dl["selected_bits"]) if dl else "-", fmt_value(gt.get("mcc")) if gt else "-",
                     fmt_value(rt["recall_at_k"]) if rt else "-"])
    table = _table(rows, ["run", "rows", "L0", "FVU", "EV", "cos", "shrink", "dead", "dense", "DL bits", "DL prec",
                          "MCC", "recall@k"])
    warning = row_set_mismatch(reports)
    diffs = format_differences(compare_reports(reports))
    return table + (f"\n\n{diffs}" if diffs else "") + (f"\n\n{warning}" if warning else "")


# (label, section path, figure) of the headline figures `compare` tests for a difference
COMPARED = (("FVU", ("reconstruction",), "fvu"), ("EV", ("reconstruction",), "explained_variance"),
            ("L0", ("sparsity",), "l0_mean"), ("recall@k", ("retrieval",), "recall_at_k"),
            ("loss recovered", ("downstream", "splice_in"), "loss_recovered"),
            ("KL", ("downstream", "splice_in"), "kl_spliced"))


def _figure_and_ci(report: dict, path: tuple[str, ...], key: str) -> tuple[float | None, list[float] | None]:
    sec: Any = report
    for p in path:
        sec = (sec or {}).get(p)
    if not sec:
        return None, None
    return sec.get(key), (sec.get("ci95") or {}).get(key)


def compare_reports(reports: dict[str, dict]) -> list[dict]:
    """Each later report against the first, per headline figure: the difference, whether it is
    distinguishable (the two 95 % intervals do not overlap) and the smallest difference these data detect."""
    names = list(reports)
    out = []
    for other in names[1:]:
        for label, path, key in COMPARED:
            a, ci_a = _figure_and_ci(reports[other], path, key)
            b, ci_b = _figure_and_ci(reports[names[0]], path, key)
            if a is None or b is None:
                continue
            out.append({"a": other, "b": names[0], "figure": label, **compare_figures(a, ci_a, b, ci_b)})
    return out


def format_differences(diffs: list[dict]) -> str:
    lines = []
    for d in diffs:
        if d["distinguishable"] is None:
            verdict = "no intervals (re-evaluate to get them)"
        else:
            verdict = ("distinguishable" if d["distinguishable"] else "not distinguishable") + \
                f" (smallest detectable difference {fmt_value(d['detectable'], 2)})"
        lines.append(f"{d['figure']}: {d['a']} - {d['b']} = {fmt_value(d['difference'], 3)}: {verdict}")
    return "Differences (95% bootstrap intervals overlap = not distinguishable)\n" + "\n".join(lines) if lines else ""


def seed_spread(reports: dict[str, dict]) -> dict:
    """Spread over retrainings that differ only by seed: per headline figure the per-seed values, mean,
    sample std and range, next to the mean bootstrap half-width (data noise) for scale."""
    out: dict[str, Any] = {"seeds": list(reports), "figures": {}}
    for label, path, key in COMPARED:
        got = [_figure_and_ci(r, path, key) for r in reports.values()]
        vals = [v for v, _ in got if v is not None and math.isfinite(v)]
        if not vals:
            continue
        mean = sum(vals) / len(vals)
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else None
        halves = [(ci[1] - ci[0]) / 2 for _, ci in got if ci]
        out["figures"][label] = {"values": vals, "mean": mean, "std": std, "min": min(vals), "max": max(vals),
                                 "ci95_half_width_mean": sum(halves) / len(halves) if halves else None}
    return out


def format_seed_spread(spread: dict) -> str:
    rows = [[label, fmt_value(f["mean"]), fmt_value(f["std"]), f"{fmt_value(f['min'])} .. {fmt_value(f['max'])}",
             fmt_value(f["ci95_half_width_mean"], 2)] for label, f in spread["figures"].items()]
    return (f"Spread over {len(spread['seeds'])} seeds ({', '.join(spread['seeds'])})\n"
            + _table(rows, ["figure", "mean", "std", "range", "+-ci95 (data)"]))


def row_set_label(report: dict) -> str:
    """Which rows a report's headline covers: 'ordinary (outliers > 4x median norm excluded)' or 'all rows'."""
    rs = report.get("row_set")
    if not rs:
        return "all rows"
    return f"ordinary (outliers > {rs['outlier_rule'].get('multiple')}x median norm excluded)"


def row_set_mismatch(reports: dict[str, dict]) -> str | None:
    """A warning when the reports' headline figures cover different row sets (None when they agree)."""
    labels = {name: row_set_label(r) for name, r in reports.items()}
    if len(set(labels.values())) <= 1:
        return None
    return ("WARNING: these reports measured their headline figures on different row sets, so FVU / EV / MSE / "
            "cosine are not comparable across them: " + "; ".join(f"{n}: {lab}" for n, lab in labels.items())
            + ". Re-evaluate the older runs (`saekit eval RUN`) to compare on ordinary rows.")
