"""Click commands of `crowdllm.eval`, added to the `crowdllm` group by `crowdllm.cli`.

``evaluate``, ``cost``, ``report``, ``bench`` and ``hybrid``: each parses its options, calls the
library in :mod:`crowdllm.eval` and prints a table (or JSON with ``--json``).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Callable

import click

from ..labels import CrowdDataError

_JSON_DEFAULT = str


def _cli() -> Any:
    from .. import cli

    return cli


def _gold_path(gold: str) -> str:
    return str(_cli().example_dir() / "gold.csv") if gold == "example" else gold


def _run_path(path: str) -> str:
    return str(_cli().example_dir()) if path == "example" else path


def _methods(spec: str | None) -> list[str]:
    from ..aggregation import METHODS
    from .evaluate import default_methods

    if spec is None:
        return default_methods()
    if spec == "all":
        return list(METHODS)
    if spec in ("", "none"):
        return []
    names = [m.strip() for m in spec.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        _cli().fail(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    return names


def _guard(fn: Callable[[], Any]) -> Any:
    """Run ``fn``; bad input becomes a one-line error (exit 1) instead of a traceback."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = fn()
    except (CrowdDataError, ValueError, FileNotFoundError) as exc:
        _cli().fail(str(exc))
    for w in caught:
        if not issubclass(w.category, DeprecationWarning):
            click.echo(f"warning: {w.message}", err=True)
    return out


_method_opt = click.option("--methods", "-m", "methods", default=None,
                           help="Comma-separated aggregation methods (default: every registered one "
                                "that does not call a model, i.e. all but llm-judge; 'all' for "
                                "every one; 'none' for annotators only).")
_param_opt = click.option("--param", "-p", "param", multiple=True, metavar="METHOD.NAME=VALUE",
                          help="A method's parameter, e.g. ds.max_iter=200 (repeatable).")


def _params(specs: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    from ..aggregation import check_params
    from .bench import parse_params

    try:
        params = parse_params(specs)
        for method, values in params.items():
            check_params(method, values)
        return params
    except ValueError as exc:
        _cli().fail(str(exc))
        raise


@click.command()
@click.argument("pred_or_run")
@click.option("--gold", "-g", required=True, help="Gold labels (task,label file, or 'example').")
@click.option("--by", help="Break accuracy down by this item column (e.g. domain).")
@click.option("--items", type=click.Path(exists=True, dir_okay=False),
              help="Items table holding the --by column (default: the run's items file, then the gold file).")
@_method_opt
@_param_opt
@click.option("--pred", "preds", multiple=True, metavar="NAME=FILE",
              help="Also score a predictions file (task,label), e.g. from `crowdllm aggregate -o`.")
@click.option("--reference", "-r", help="An annotator to compare every aggregated result with.")
@click.option("--min-coverage", type=float, default=0.5, show_default=True,
              help="Share of gold tasks an annotator must have answered to count as best single one.")
@click.option("--top", type=int, default=20, show_default=True,
              help="Annotator rows printed (JSON has all).")
@click.option("--per-class/--no-per-class", default=True, show_default=True,
              help="Print the per-class P/R/F1 columns.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON.")
def evaluate(pred_or_run: str, gold: str, by: str | None, items: str | None, methods: str | None,
             param: tuple[str, ...], preds: tuple[str, ...], reference: str | None,
             min_coverage: float, top: int, per_class: bool, seed: int, as_json: bool) -> None:
    """Score annotators, aggregation methods and predictions against gold.

    PRED_OR_RUN is a run folder, an answers file or folder (task,worker,label; a row per
    annotator, and every method is run), 'example', or a predictions file (task,label).
    """
    from ..labels import read_table
    from .evaluate import evaluate as run_eval
    from .evaluate import group_table, prediction_codes
    from .run import Run, load_run

    cli = _cli()
    gold_file = _gold_path(gold)
    meths = _methods(methods)
    params = _params(param)

    def go() -> Any:
        path = Path(_run_path(pred_or_run))
        predictions: dict[str, Any] = {}
        table = None if path.is_dir() else read_table(path)
        if table is not None and "worker" not in table.column_names:
            # a predictions file: its tasks and labels make the "answers" of one annotator
            import pyarrow as pa

            from ..labels import LabelTensor

            t = LabelTensor.from_arrow(pa.table({
                "task": table.column("task"), "worker": [path.stem] * table.num_rows,
                "label": table.column("label")}), source=str(path))
            run = Run(path=path, tensor=t)
            if items:
                run.items = read_table(items)
            tensor = t.with_gold(gold_file)
            predictions[path.stem] = prediction_codes(tensor, table, name=str(path))
            annotators, meth = False, []
        else:
            run = load_run(path, items=items)
            tensor = run.tensor.with_gold(gold_file)
            annotators, meth = True, meths
        for spec in preds:
            name, sep, f = spec.partition("=")
            if not sep:
                name, f = Path(spec).stem, spec
            predictions[name] = prediction_codes(tensor, read_table(f), name=f)
        groups = run.item_column(by, [read_table(gold_file)]) if by else None
        return run_eval(tensor, methods=meth, predictions=predictions, reference=reference,
                        groups=groups, group_column=by, min_coverage=min_coverage,
                        params=params, seed=seed, annotators=annotators)

    ev = _guard(go)
    if as_json:
        click.echo(json.dumps(ev.to_dict(), indent=2, default=_JSON_DEFAULT))
        return
    rows = ev.table(per_class=per_class, max_annotators=top)
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols and c not in ("seconds",)]
    cols = [c for c in cols if any(r.get(c) not in (None, "") for r in rows)]  # drop empty columns
    click.echo(cli.format_table(rows, cols))
    n_ann = sum(r["kind"] == "annotator" for r in ev.rows)
    shown = sum(r["kind"] == "annotator" for r in rows)
    if shown < n_ann:
        click.echo(f"... {n_ann - shown} more annotators (--top N or --json)")
    click.echo(f"gold tasks: {ev.gold_tasks}; best single annotator: {ev.best_annotator or 'none'}"
               + (f"; reference: {ev.reference}" if ev.reference else ""))
    ag = ev.agreement
    fmt = lambda v: "undefined" if v is None else f"{v:.4f}"  # noqa: E731
    click.echo(f"agreement on gold tasks: Fleiss' kappa {fmt(ag['fleiss_kappa'])}, "
               f"Krippendorff's alpha {fmt(ag['krippendorff_alpha'])}, "
               f"mean pairwise Cohen's kappa {fmt(ag['mean_pairwise_kappa'])}")
    for r in ev.rows:
        if r.get("error"):
            click.echo(f"method {r['system']} failed: {r['error']}", err=True)
    for n in ev.notes:
        click.echo(f"note: {n}", err=True)
    if by:
        click.echo(f"\naccuracy per {by}:")
        click.echo(cli.format_table(group_table(ev)))


@click.command()
@click.argument("run_dir")
@click.option("--prices", type=click.Path(exists=True, dir_okay=False),
              help="TOML price table overriding the defaults (see --write-prices).")
@click.option("--gold", "-g", help="Gold labels: also compute the cost-vs-accuracy frontier.")
@click.option("--methods", "-m", "methods", default="mv,ds", show_default=True,
              help="Methods for the frontier (comma-separated, or 'all').")
@_param_opt
@click.option("--max-subsets", type=int, default=127, show_default=True,
              help="Most panel subsets in the frontier (smallest first).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--write-prices", type=click.Path(dir_okay=False),
              help="Write the default price table to this TOML file (to edit) and exit.")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def cost(run_dir: str, prices: str | None, gold: str | None, methods: str, param: tuple[str, ...],
         max_subsets: int, seed: int, write_prices: str | None, as_json: bool) -> None:
    """Tokens and money per model and for the panel (retries shown apart) from RUN_DIR's ledger."""
    from .cost import cost_accuracy_frontier, ledger_cost, load_prices, prices_toml, worker_costs
    from .run import load_run

    cli = _cli()
    if write_prices:
        Path(write_prices).write_text(prices_toml() + "\n", encoding="utf-8")
        click.echo(f"wrote {write_prices}", err=True)
        return
    meths = _methods(methods)
    params = _params(param)

    def go() -> Any:
        run = load_run(run_dir)
        if not run.has_ledger:
            raise CrowdDataError(f"{run_dir}: no ledger.jsonl (cost needs the run's token ledger)")
        table = load_prices(prices)
        rows = ledger_cost(run.ledger or [], table, spent=run.spent)
        frontier = None
        if gold:
            wc = worker_costs(rows, run.models_of_workers())
            frontier = cost_accuracy_frontier(run.tensor.with_gold(_gold_path(gold)), wc, meths,
                                              params=params, seed=seed, max_subsets=max_subsets)
        return table, rows, frontier

    table, rows, frontier = _guard(go)
    if as_json:
        click.echo(json.dumps({"currency": table.currency, "models": rows[:-1], "panel": rows[-1],
                               "frontier": frontier}, indent=2, default=_JSON_DEFAULT))
        return
    cols = ["model", "prompt_version", "items", "attempts", "retried_items", "prompt_tokens",
            "completion_tokens", "retry_prompt_tokens", "retry_completion_tokens", "cost",
            "retry_cost", "cost_per_item", "pricing"]
    click.echo(cli.format_table(rows, cols, floatfmt="{:.6f}"))
    click.echo(f"currency: {table.currency}; prices: {prices or 'built-in defaults'}")
    missing = [r["model"] for r in rows[:-1] if r["cost"] is None]
    if missing:
        click.echo(f"note: no price for {missing}: add them to a --prices file", err=True)
    if frontier is not None:
        front = sorted((r for r in frontier if r["frontier"]), key=lambda r: r["cost"])
        click.echo("\ncost-vs-accuracy Pareto front (panel subset x method):")
        click.echo(cli.format_table(front, ["subset", "method", "cost", "accuracy",
                                            "accuracy_per_cost"], floatfmt="{:.6f}"))
        failed = [r for r in frontier if r["error"]]
        if failed:
            click.echo(f"note: {len(failed)} subset x method runs failed, e.g. {failed[0]['error']}",
                       err=True)


@click.command()
@click.argument("run_dir")
@click.option("--gold", "-g", required=True, help="Gold labels (task,label file, or 'example').")
@click.option("--out", "-o", "out", required=True, type=click.Path(file_okay=False),
              help="The report folder to write.")
@click.option("--by", help="Item column for the per-group breakdown (e.g. domain).")
@click.option("--items", type=click.Path(exists=True, dir_okay=False), help="Items table with --by.")
@_method_opt
@_param_opt
@click.option("--reference", "-r", help="An annotator to compare aggregated results with.")
@click.option("--prices", type=click.Path(exists=True, dir_okay=False), help="TOML price table.")
@click.option("--svg", is_flag=True, help="Also write every figure as SVG.")
@click.option("--min-coverage", type=float, default=0.5, show_default=True)
@click.option("--frontier-methods", default="mv,ds", show_default=True,
              help="Methods for the cost-vs-accuracy frontier (runs with a ledger).")
@click.option("--max-subsets", type=int, default=63, show_default=True,
              help="Most panel subsets in the frontier (smallest first).")
@click.option("--seed", type=int, default=0, show_default=True)
def report(run_dir: str, gold: str, out: str, by: str | None, items: str | None,
           methods: str | None, param: tuple[str, ...], reference: str | None, prices: str | None,
           svg: bool, min_coverage: float, frontier_methods: str, max_subsets: int,
           seed: int) -> None:
    """Write tables (Markdown, CSV), figures and index.html for RUN_DIR into one folder."""
    from .report import build_report

    meths = _methods(methods)
    fmeths = _methods(frontier_methods)
    params = _params(param)
    rep = _guard(lambda: build_report(_run_path(run_dir), _gold_path(gold), out, by=by,
                                      methods=meths, reference=reference, prices=prices, svg=svg,
                                      items=items, params=params, seed=seed,
                                      min_coverage=min_coverage, frontier_methods=fmeths,
                                      max_subsets=max_subsets))
    click.echo(f"wrote {rep.out / 'index.html'} ({len(rep.files)} files, "
               f"{len(rep.figures)} figures)")


@click.command()
@click.argument("dataset_dirs", nargs=-1)
@click.option("--methods", "-m", "methods", default=None,
              help="Comma-separated aggregation methods (default: every registered one).")
@click.option("--merge", "merge", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Also merge the results of earlier `bench -o FILE.json` runs (repeatable; "
                   "with no DATASET_DIRS, only merge and print).")
@_param_opt
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--output", "-o", type=click.Path(dir_okay=False),
              help="Write the table here (.csv, .md, or .json for everything).")
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON.")
@click.option("--quiet", "-q", is_flag=True, help="No progress lines on stderr.")
@click.option("--share-shapes/--own-shapes", "share_shapes", default=True, show_default=True,
              help="Pad datasets with one class count and similar sizes (at most 4x apart) to "
                   "one shape, so that each method compiles once per such group, not once per "
                   "dataset (same accuracies; a dataset's time then includes the padding).")
@click.option("--speed", is_flag=True,
              help="Instead, time the kernels on synthetic panels: DS on 1,000,000 x 12 x 5 vs "
                   "crowd-kit and the memory floor, every EM/VB kernel's iteration on that "
                   "panel (native and XLA), then the methods at 10^4 and 10^5 items (more "
                   "sizes: benchmarks/speed.py).")
def bench(dataset_dirs: tuple[str, ...], methods: str | None, merge: tuple[str, ...],
          param: tuple[str, ...], seed: int, output: str | None, as_json: bool,
          quiet: bool, share_shapes: bool, speed: bool) -> None:
    """Run every aggregation method on every dataset folder (answers.csv + gold.csv).

    Prints accuracy per dataset and method, each method's mean accuracy, the datasets it
    completed, its mean rank and its rank; a method that fails on a dataset shows FAIL there.
    """
    if speed:
        from .speed import run_speed
        run_speed(methods=methods, output=output)
        return
    from .bench import run_bench
    from .report import md_table, write_csv

    cli = _cli()
    meths = _methods(methods or "all")  # the benchmark runs whatever is registered
    params = _params(param)

    def progress(msg: str) -> None:
        if not quiet:
            click.echo(f"  {msg}", err=True)

    from .bench import merge_results

    if not dataset_dirs and not merge:
        cli.fail("give dataset folders, or --merge earlier results")

    def go() -> Any:
        earlier = []
        for f in merge:
            try:
                earlier.append(json.loads(Path(f).read_text(encoding="utf-8")))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{f}: not valid JSON ({exc.msg})") from None
        if not dataset_dirs:
            return merge_results(earlier)
        res = run_bench(dataset_dirs, methods=meths, params=params, seed=seed, progress=progress,
                        share_shapes=share_shapes)
        return merge_results([*earlier, res]) if earlier else res

    res = _guard(go)
    rows = res.table()
    if output:
        p = Path(output)
        if p.suffix == ".json":
            p.write_text(json.dumps(res.to_dict(), indent=2, default=_JSON_DEFAULT), encoding="utf-8")
        elif p.suffix == ".md":
            p.write_text(md_table(rows), encoding="utf-8")
        elif p.suffix == ".csv":
            write_csv(rows, p)
        else:
            cli.fail(f"{output}: --output must end in .csv, .md or .json")
        click.echo(f"wrote {output}", err=True)
    if as_json:
        click.echo(json.dumps(res.to_dict(), indent=2, default=_JSON_DEFAULT))
        return
    click.echo(cli.format_table(rows))
    for name, why in res.skipped.items():
        click.echo(f"skipped {name}: {why}", err=True)
    failed: dict[str, list[tuple[str, str]]] = {}
    for d, errs in res.errors.items():
        for m, e in errs.items():
            failed.setdefault(m, []).append((d, e))
    for m, fails in failed.items():  # one line per method: where it failed, and the first reason
        click.echo(f"FAIL {m} on {len(fails)} dataset(s) ({', '.join(d for d, _ in fails)}): "
                   f"{fails[0][1]}", err=True)
    if res.suggested:
        s = next(x for x in res.summary if x["method"] == res.suggested)
        click.echo(f"suggested default: {res.suggested} (best mean rank {s['mean_rank']:.2f} among "
                   f"methods that completed all {len(res.datasets)} datasets; mean accuracy "
                   f"{s['mean_accuracy']:.4f})")


@click.command()
@click.argument("sources", nargs=-1, required=True)
@click.option("--gold", "-g", required=True, help="Gold labels (task,label file).")
@click.option("--group", "group_specs", multiple=True, metavar="NAME=GLOB[,GLOB]",
              help="A group of annotators by id pattern (repeatable); the rest form 'rest'.")
@click.option("--methods", "-m", "methods", default="mv,ds", show_default=True,
              help="Comma-separated methods, or 'all'.")
@_param_opt
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def hybrid(sources: tuple[str, ...], gold: str, group_specs: tuple[str, ...], methods: str,
           param: tuple[str, ...], seed: int, as_json: bool) -> None:
    """Aggregate groups of annotators alone and together: does LLM + human beat either?

    SOURCES are answer files or run folders, each optionally named NAME=PATH (default name: the
    file or folder name); each source is a group. With one run folder and no --group, the
    annotators found in its ledger form 'llm' and the others 'human'. Every row is scored on
    the gold tasks that every group answered.
    """
    from .hybrid import combine, split_by_patterns, subset_table
    from .run import load_run

    cli = _cli()
    meths = _methods(methods)
    params = _params(param)

    def go() -> Any:
        named: dict[str, str] = {}
        for s in sources:
            name, sep, path = s.partition("=")
            if not sep or Path(s).exists():
                name, path = Path(s).stem or s, s
            if name in named:
                raise ValueError(f"two sources named {name!r}: name them NAME=PATH")
            named[name] = path
        if group_specs:
            tensor, _ = combine(named) if len(named) > 1 else (load_run(next(iter(named.values()))).tensor, None)
            pats: dict[str, list[str]] = {}
            for spec in group_specs:
                name, sep, globs = spec.partition("=")
                if not sep:
                    raise ValueError(f"bad --group {spec!r}: expected NAME=GLOB[,GLOB]")
                pats[name] = [g for g in globs.split(",") if g]
            groups = split_by_patterns(tensor, pats, rest="rest")
        elif len(named) == 1:
            run = load_run(next(iter(named.values())))
            llm = list(run.models_of_workers())
            if not llm:
                raise ValueError("one source without a ledger: give a second source or --group")
            tensor = run.tensor
            groups = {"llm": llm,
                      "human": [str(w) for w in tensor.worker_ids.tolist() if str(w) not in set(llm)]}
            if not groups["human"]:
                raise ValueError("every annotator of this run is an LLM: give the human answers "
                                 "as a second source")
        else:
            tensor, groups = combine(named)
        return subset_table(tensor.with_gold(_gold_path(gold)), groups, meths, params=params,
                            seed=seed), groups

    rows, groups = _guard(go)
    if as_json:
        click.echo(json.dumps({"groups": groups, "rows": rows}, indent=2, default=_JSON_DEFAULT))
        return
    click.echo(cli.format_table(rows, ["subset", "annotators", "method", "n", "accuracy",
                                       "beats_parts", "error"]))
    wins = [r for r in rows if r["beats_parts"] == "yes"]
    if wins:
        click.echo("beats every part: " + ", ".join(f"{r['subset']} ({r['method']})" for r in wins))


#: the commands this subpackage adds to `crowdllm`
COMMANDS: list[click.Command] = [evaluate, cost, report, bench, hybrid]
