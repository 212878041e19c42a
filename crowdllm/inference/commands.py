"""Click commands of `crowdllm.inference`, added to the `crowdllm` group by `crowdllm.cli`."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from ..labels import CrowdDataError
from .backends.base import BackendError
from .schema import SchemaError


def _fail(message: str) -> None:
    raise click.ClickException(message)


@click.command()
@click.argument("items", type=click.Path(dir_okay=False))
@click.option("--panel", "panel_path", required=True, type=click.Path(dir_okay=False),
              help="Panel TOML file: the annotators, their backends, the schema.")
@click.option("--out", "run_dir", required=True, type=click.Path(file_okay=False),
              help="Run directory (created; re-running resumes it).")
@click.option("--humans", type=click.Path(dir_okay=False),
              help="Human task,worker,label answers to join to the run's answers.")
@click.option("--limit", type=int, help="Only the first N items.")
@click.option("--dry-run", is_flag=True, help="Print the prompts and the number of requests; call nothing.")
@click.option("--no-progress", is_flag=True, help="No progress lines on stderr.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def annotate(items: str, panel_path: str, run_dir: str, humans: str | None, limit: int | None,
             dry_run: bool, no_progress: bool, as_json: bool) -> None:
    """Ask every annotator of a panel to label every item; resumable (see the ledger).

    ITEMS is a CSV/Parquet/JSONL file with task and text columns (and optionally domain).
    The run directory gets ledger.jsonl, answers.parquet (task, worker, label),
    probs.parquet, items.parquet and run.json; `crowdllm aggregate RUN_DIR` reads it.
    """
    from ..cli import format_table
    from .panel import load_panel
    from .runner import annotate as run_annotate
    from .runner import plan, read_items

    try:
        panel = load_panel(panel_path)
        its = read_items(items)
        if limit is not None:
            its = its[:limit]
        if dry_run:
            rows = plan(its, panel, run_dir)
            if as_json:
                click.echo(json.dumps(rows, indent=2, ensure_ascii=False))
                return
            for r in rows:
                click.echo(f"=== {r['annotator']} ({r['backend']}: {r['model']}), "
                           f"prompt version {r['prompt_version']}")
                for m in r["example_messages"]:
                    click.echo(f"[{m['role']}]\n{m['content']}")
                click.echo("")
            click.echo(format_table([{k: r[k] for k in ("annotator", "backend", "prompt_version",
                                                        "requests", "max_requests")} for r in rows]))
            total = sum(r["requests"] for r in rows)
            click.echo(f"dry run: {total} requests to send (at most "
                       f"{sum(r['max_requests'] for r in rows)} with re-asks); nothing was called")
            return
        stats = run_annotate(its, panel, run_dir, items_path=items, humans=humans,
                             progress=not no_progress)
    except (CrowdDataError, SchemaError, BackendError) as exc:
        _fail(str(exc))
    rows: list[dict[str, Any]] = [s.row() for s in stats]
    meta = json.loads((__import__("pathlib").Path(run_dir) / "run.json").read_text())
    last = meta.get("last_run", {})
    if as_json:
        click.echo(json.dumps({"run_dir": run_dir, "annotators": rows,
                               "errors": last.get("errors", {}),
                               "server_counters": last.get("server_counters", {}),
                               "engine_metrics": last.get("engine_metrics", {})}, indent=2))
    else:
        click.echo(format_table(rows, floatfmt="{:.2f}"))
        wall = last.get("wall_s") or 0.0
        items_done = sum(r["answered"] + r["abstained"] for r in rows)
        toks = sum(r["prompt_tok"] + r["completion_tok"] for r in rows)
        if wall > 0:
            click.echo(f"total: {items_done} answers in {wall:.1f} s = {items_done / wall:.2f} "
                       f"answers/s, {toks / wall:.1f} tokens/s")
        for root, d in (last.get("server_counters") or {}).items():
            if "prefix_cache_hit_rate" in d:
                click.echo(f"{root}: prefix cache hit rate {d['prefix_cache_hit_rate']:.3f} "
                           f"({int(d.get('vllm:prefix_cache_hits_total', 0))}/"
                           f"{int(d.get('vllm:prefix_cache_queries_total', 0))} tokens)")
        for name, m in (last.get("engine_metrics") or {}).items():
            q = m.get("vllm:prefix_cache_queries")
            if q:
                click.echo(f"{name}: prefix cache hit rate {m.get('vllm:prefix_cache_hits', 0) / q:.3f}")
        click.echo(f"wrote {run_dir}/answers.parquet (crowdllm aggregate {run_dir})", err=True)
    errors = last.get("errors") or {}
    for name, err in errors.items():
        click.echo(f"error: {name}: {err}", err=True)
    if errors:
        sys.exit(1)


@click.command("export-run")
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--humans", type=click.Path(dir_okay=False),
              help="Human task,worker,label answers to join (replaces earlier ones).")
def export_run_cmd(run_dir: str, humans: str | None) -> None:
    """Rewrite RUN_DIR/answers.parquet and probs.parquet from its ledger (e.g. mid-run)."""
    import json as _json
    from pathlib import Path

    from ..labels import write_table
    from .runner import export_run, read_humans
    from .schema import load_schema

    try:
        if humans:
            meta = _json.loads((Path(run_dir) / "run.json").read_text())
            schema = load_schema(meta["schema"])
            names = [a["name"] for a in meta["panel"]["annotators"]]
            write_table(read_humans(humans, schema, names), Path(run_dir) / "humans.parquet")
        counts = export_run(run_dir)
    except (CrowdDataError, SchemaError, FileNotFoundError, KeyError) as exc:
        _fail(f"{run_dir}: {exc}")
    click.echo(", ".join(f"{k}: {v}" for k, v in counts.items()))


#: the commands this subpackage adds to `crowdllm`
COMMANDS: list[click.Command] = [annotate, export_run_cmd]
