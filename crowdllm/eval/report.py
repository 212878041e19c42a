"""``crowdllm report``: one self-contained folder with the tables (Markdown, CSV), the figures and
an ``index.html`` that shows them.

Folder layout::

    REPORT_DIR/
      index.html             every table and figure (relative links only: the folder can be moved)
      report.md              the same in Markdown
      evaluation.csv         one row per annotator / method (accuracy, macro/weighted F1, P/R/F1)
      confusion.csv          system, true, predicted, count
      agreement.csv          Cohen's kappa for every annotator pair (on gold tasks)
      groups.csv             accuracy per group and system            (with --by)
      cost.csv               tokens and money per model, retries apart (run folders with a ledger)
      frontier.csv           cost and accuracy of panel subsets x methods (ledger and gold)
      figures/*.png          kappa heatmap, accuracy, accuracy per group, cost vs accuracy
      figures/*.svg          the same as SVG (with --svg)
"""

from __future__ import annotations

import csv
import dataclasses
import html
import io
import json
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from . import plots
from .agreement import kappa_matrix
from .cost import cost_accuracy_frontier, ledger_cost, load_prices, worker_costs
from .evaluate import CROWD_ROW, Evaluation, default_methods, evaluate, group_table
from .run import Run, load_run

__all__ = ["Report", "build_report", "md_table", "html_table", "write_csv"]


def _fmt(v: Any, floatfmt: str = "{:.4f}") -> str:
    if v is None:
        return ""
    if isinstance(v, (float, np.floating)):
        if v != 0 and abs(v) < 0.01:  # small money amounts keep three significant digits
            return f"{v:.3g}"
        return floatfmt.format(v)
    return str(v)


def md_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A GitHub-flavoured Markdown table."""
    if not rows:
        return "_(no rows)_\n"
    cols = list(columns or rows[0])
    esc = [[_fmt(r.get(c)).replace("|", "\\|") for c in cols] for r in rows]
    out = ["| " + " | ".join(cols) + " |", "| " + " | ".join("---" for _ in cols) + " |"]
    out += ["| " + " | ".join(row) + " |" for row in esc]
    return "\n".join(out) + "\n"


def html_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    if not rows:
        return "<p><em>(no rows)</em></p>"
    cols = list(columns or rows[0])
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in cols) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_csv(rows: Sequence[Mapping[str, Any]], path: Path, columns: Sequence[str] | None = None) -> Path:
    cols = list(columns or (rows[0] if rows else []))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in rows:
        w.writerow(["" if r.get(c) is None else r.get(c) for c in cols])
    path.write_text(buf.getvalue(), encoding="utf-8")
    return path


@dataclasses.dataclass
class Report:
    """What :func:`build_report` wrote (paths relative to ``out``) and the numbers behind it."""

    out: Path
    files: list[str]
    figures: list[str]
    evaluation: Evaluation
    cost: list[dict[str, Any]] | None
    frontier: list[dict[str, Any]] | None


_HTML_HEAD = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; }}
table {{ border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1.5em; }}
th, td {{ border: 1px solid #ccc; padding: 2px 6px; text-align: right; }}
th {{ background: #f3f3f3; }} td:first-child, th:first-child {{ text-align: left; }}
figure {{ display: inline-block; margin: 0.5em 1em 1em 0; vertical-align: top; }}
img {{ max-width: 100%; border: 1px solid #eee; }}
</style></head><body>
"""


def build_report(
    run: str | Path | Run, gold: Any, out: str | Path, *,
    by: str | None = None, methods: Sequence[str] | None = None, reference: str | None = None,
    prices: str | Path | None = None, svg: bool = False, items: str | Path | None = None,
    params: Mapping[str, Mapping[str, Any]] | None = None, seed: int = 0,
    min_coverage: float = 0.5, frontier_methods: Sequence[str] = ("mv", "ds"),
    max_subsets: int = 63, max_annotators: int = 30,
) -> Report:
    """Evaluate a run (or any answers folder) against gold and write the report folder.

    Args:
        run: a run directory, answers folder or file (or a loaded :class:`Run`).
        gold: the gold labels (a ``task, label`` file, or anything ``with_gold`` takes).
        out: the report folder (created; existing files of the same names are replaced).
        by: an item column (e.g. ``domain``) for the per-group breakdown.
        methods: aggregation methods (default: every registered one that does not call a model).
        reference: an annotator to compare aggregated results with.
        prices: a TOML price file (default price table otherwise).
        svg: also write every figure as SVG.
        items: an items table with the ``by`` column, if the run has none.
        frontier_methods: methods used for the cost-vs-accuracy frontier (those registered).
    """
    from ..aggregation import METHODS
    from ..labels import read_table

    r = run if isinstance(run, Run) else load_run(run, items=items)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tensor = r.tensor.with_gold(gold)
    groups = None
    if by:
        extra = [read_table(gold)] if isinstance(gold, (str, Path)) else None
        groups = r.item_column(by, extra)
    meths = list(methods) if methods is not None else default_methods()
    ev = evaluate(tensor, methods=meths, reference=reference, groups=groups, group_column=by,
                  params=params, seed=seed, min_coverage=min_coverage)
    o = Path(out)
    figdir = o / "figures"
    figdir.mkdir(parents=True, exist_ok=True)
    files: list[str] = []
    figures: list[tuple[str, str]] = []  # (relative path, caption)

    def fig(name: str, caption: str, draw: Any) -> None:
        draw(figdir / f"{name}.png")
        figures.append((f"figures/{name}.png", caption))
        if svg:
            draw(figdir / f"{name}.svg")
            files.append(f"figures/{name}.svg")

    # ---- tables
    write_csv(ev.rows, o / "evaluation.csv", _columns(ev.rows))
    files.append("evaluation.csv")
    conf_rows = [{"system": s, "true": ev.classes[i], "predicted": ev.classes[j], "count": n}
                 for s, summ in ev.summaries.items() if s in ev.codes and _shown(ev, s)
                 for i, row in enumerate(summ["confusion"]) for j, n in enumerate(row)]
    write_csv(conf_rows, o / "confusion.csv", ["system", "true", "predicted", "count"])
    files.append("confusion.csv")
    write_csv(ev.agreement["pairs"], o / "agreement.csv", ["a", "b", "n", "agreement", "kappa"])
    files.append("agreement.csv")
    gtab = None
    if by:
        gtab = group_table(ev)
        write_csv(ev.groups, o / "groups.csv", ["group", "system", "kind", "n", "accuracy"])
        files.append("groups.csv")

    cost_rows = frontier = None
    price_table = load_prices(prices)
    if r.has_ledger:
        cost_rows = ledger_cost(r.ledger or [], price_table, spent=r.spent)
        write_csv(cost_rows, o / "cost.csv")
        files.append("cost.csv")
        wc = worker_costs(cost_rows, r.models_of_workers())
        fm = [m for m in frontier_methods if m in METHODS]
        if any(v is not None for v in wc.values()) and fm:
            frontier = cost_accuracy_frontier(tensor, wc, fm, params=params, seed=seed,
                                              max_subsets=max_subsets)
            write_csv(frontier, o / "frontier.csv")
            files.append("frontier.csv")

    # ---- figures
    kw = ev.agreement["kappa_workers"]
    if len(kw) >= 2:
        fig("kappa_heatmap", "Cohen's kappa between annotators (gold tasks)",
            lambda p: plots.kappa_heatmap(kappa_matrix(ev.agreement["pairs"], kw), kw, p))
    shown_rows = [x for x in ev.table(per_class=False, max_annotators=15)]
    fig("accuracy", "Accuracy on gold per annotator and method",
        lambda p: plots.accuracy_bars(shown_rows, p))
    if gtab is None:
        gtab_plot = [{"group": "all", "n": ev.gold_tasks,
                      **{s["system"]: s["accuracy"] for s in ev.rows}}]
    else:
        gtab_plot = gtab
    systems = [s for s in (ev.best_annotator, ev.reference) if s] + [CROWD_ROW] + [
        x["system"] for x in ev.rows if x["kind"] in ("method", "prediction") and x["system"] in ev.codes]
    systems = list(dict.fromkeys(systems))
    fig("accuracy_by_group", f"Accuracy per {by or 'group (all tasks)'}: single best vs aggregated",
        lambda p: plots.accuracy_by_group(gtab_plot, systems, p, highlight=ev.best_annotator,
                                          title=f"Accuracy per {by or 'group'}"))
    if frontier:
        fig("cost_vs_accuracy", "Cost vs accuracy over panel subsets and methods",
            lambda p: plots.cost_vs_accuracy(frontier, p, currency=price_table.currency))

    # ---- Markdown and HTML
    title = f"crowdllm report: {r.path.name or r.path}"
    eval_cols = _columns(ev.rows, per_class=False)
    eval_shown = ev.table(per_class=True, max_annotators=max_annotators)
    sections: list[tuple[str, str, list[dict[str, Any]] | None, list[str] | None]] = []
    summary_lines = [
        f"- answers: {tensor.n_answers} from {tensor.n_workers} annotators on {tensor.n_tasks} tasks; "
        f"classes: {', '.join(ev.classes)}",
        f"- gold tasks scored: {ev.gold_tasks}",
        f"- best single annotator: {ev.best_annotator or 'none (see notes)'}"
        + (f"; reference: {ev.reference}" if ev.reference else ""),
        f"- Fleiss' kappa {_fmt(ev.agreement['fleiss_kappa'])}, Krippendorff's alpha (nominal) "
        f"{_fmt(ev.agreement['krippendorff_alpha'])}, mean pairwise Cohen's kappa "
        f"{_fmt(ev.agreement['mean_pairwise_kappa'])}",
        *[f"- note: {n}" for n in ev.notes],
    ]
    sections.append(("Summary", "\n".join(summary_lines), None, None))
    sections.append(("Accuracy and F1 per system",
                     "`beats_best` / `beats_reference`: accuracy strictly higher than that "
                     "annotator's on the gold tasks it answered."
                     + (f" Top {max_annotators} annotators shown; all in evaluation.csv."
                        if sum(x['kind'] == 'annotator' for x in ev.rows) > max_annotators else ""),
                     [{c: x.get(c) for c in eval_cols} for x in eval_shown], eval_cols))
    per_class_cols = ["system"] + [c for c in _columns(ev.rows) if c.startswith(("P_", "R_", "F1_"))]
    sections.append(("Per-class precision, recall, F1", "",
                     [{c: x.get(c) for c in per_class_cols} for x in eval_shown
                      if x["kind"] != "annotator" or x["system"] in (ev.best_annotator, ev.reference)],
                     per_class_cols))
    if gtab is not None:
        sections.append((f"Accuracy per {by}", "", gtab, None))
    if cost_rows is not None:
        sections.append(("Cost", f"Prices: {'default table' if prices is None else prices} "
                         f"({price_table.currency}); retries are the attempts after the first.",
                         cost_rows, None))
    if frontier:
        best = sorted((x for x in frontier if x["frontier"]), key=lambda x: x["cost"])
        sections.append(("Cost vs accuracy: the Pareto front", "Subsets and methods that no other "
                         "is both cheaper and more accurate than; every point in frontier.csv.",
                         best, ["subset", "method", "cost", "accuracy", "accuracy_per_cost"]))
    md = [f"# {title}\n"]
    body = [f"<h1>{html.escape(title)}</h1>"]
    for head, text, rows, cols in sections:
        md.append(f"## {head}\n\n{text}\n")
        body.append(f"<h2>{html.escape(head)}</h2>")
        if text:
            if rows is None:
                body.append("<ul>" + "".join(f"<li>{html.escape(t[2:])}</li>"
                                             for t in text.splitlines()) + "</ul>")
            else:
                body.append(f"<p>{html.escape(text)}</p>")
        if rows is not None:
            md.append(md_table(rows, cols))
            body.append(html_table(rows, cols))
    md.append("## Figures\n")
    body.append("<h2>Figures</h2>")
    for path, caption in figures:
        md.append(f"![{caption}]({path})\n")
        body.append(f'<figure><img src="{html.escape(path)}" alt="{html.escape(caption)}">'
                    f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    body.append("<h2>Files</h2><ul>" + "".join(
        f'<li><a href="{html.escape(f)}">{html.escape(f)}</a></li>' for f in files) + "</ul>")
    (o / "report.md").write_text("\n".join(md), encoding="utf-8")
    (o / "index.html").write_text(_HTML_HEAD.format(title=html.escape(title)) + "\n".join(body)
                                  + "\n</body></html>\n", encoding="utf-8")
    (o / "summary.json").write_text(json.dumps({
        "gold_tasks": ev.gold_tasks, "best_annotator": ev.best_annotator,
        "reference": ev.reference, "fleiss_kappa": ev.agreement["fleiss_kappa"],
        "krippendorff_alpha": ev.agreement["krippendorff_alpha"],
        "rows": [x for x in ev.rows if x["kind"] != "annotator"], "notes": ev.notes}, indent=2,
        default=str), encoding="utf-8")
    files += ["report.md", "index.html", "summary.json"]
    return Report(out=o, files=files + [f for f, _ in figures], figures=[f for f, _ in figures],
                  evaluation=ev, cost=cost_rows, frontier=frontier)


def _shown(ev: Evaluation, system: str) -> bool:
    kinds = {r["system"]: r["kind"] for r in ev.rows}
    return kinds.get(system) != "annotator" or system in (ev.best_annotator, ev.reference)


def _columns(rows: Sequence[Mapping[str, Any]], per_class: bool = True) -> list[str]:
    cols: list[str] = []
    for r in rows:
        for c in r:
            if c not in cols and (per_class or not c.startswith(("P_", "R_", "F1_"))):
                cols.append(c)
    return cols
