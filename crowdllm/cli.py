"""The ``crowdllm`` command line: thin click commands that parse, call the library, and print.

Commands of the subpackages (``crowdllm.eval.commands``, ``crowdllm.inference.commands``) are
added to the same group, so ``crowdllm --help`` lists everything.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

import click
import numpy as np

from . import __version__
from .labels import CrowdDataError, LabelTensor, read_answers, write_table

EXAMPLE_NAME = "dog"


def example_dir() -> Path:
    """The bundled example dataset's folder (answers.csv, gold.csv, SOURCE.md)."""
    return Path(__file__).parent / "examples" / EXAMPLE_NAME


def fail(message: str) -> None:
    """Print ``Error: message`` to stderr and exit with status 1 (bad input), keeping it one line."""
    raise click.ClickException(message)


def load_answers(answers: str, *, task_col: str = "task", worker_col: str = "worker",
                 label_col: str = "label", duplicates: str = "keep") -> LabelTensor:
    """Read answers for a command: ``example`` means the bundled dataset."""
    path = example_dir() if answers == "example" else Path(answers)
    return read_answers(path, task_col=task_col, worker_col=worker_col, label_col=label_col,
                        duplicates=duplicates)  # type: ignore[arg-type]


def format_table(rows: list[dict[str, Any]], columns: list[str] | None = None,
                 floatfmt: str = "{:.4f}") -> str:
    """A plain aligned text table (no dependencies), for terminals."""
    if not rows:
        return "(no rows)"
    columns = columns or list(rows[0])

    def fmt(v: Any) -> str:
        if isinstance(v, (float, np.floating)):
            return floatfmt.format(v)
        return "" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="crowdllm")
def main() -> None:
    """crowdllm: a crowd of small LLMs (and humans) as one annotator.

    \b
    Quick start on the bundled example (ImageNet dog breeds, 109 human annotators):
      crowdllm aggregate example --method ds --gold example
    """


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def methods(as_json: bool) -> None:
    """List the aggregation methods."""
    from .aggregation import METHODS

    rows = [{"method": name, "description": cls.description} for name, cls in METHODS.items()]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        click.echo(format_table(rows))


@contextlib.contextmanager
def _devices(shard: bool) -> Iterator[int]:
    """``aggregate --shard``: fit inside ``sharding.sharded()``; yields the number of devices."""
    if not shard:
        yield 1
        return
    from .aggregation import sharding

    with sharding.sharded() as mesh:
        n = int(mesh.devices.size)
        if n == 1:
            click.echo("note: --shard: one device here, nothing to split (on CPU, set XLA_FLAGS="
                       "--xla_force_host_platform_device_count=N)", err=True)
        yield n


#: ``aggregate`` on at least this many answers says on stderr what it is doing as each stage
#: begins and how long the last took (100M answers: a ~10 s read, a ~30 s fit, a ~6 s write),
#: so that a long run is never silent
LARGE_ANSWERS = 1_000_000


def _stage(large: bool, message: str) -> None:
    if large:
        click.echo(message, err=True)


@main.command()
@click.argument("answers")
@click.option("--method", "-m", default="ds", show_default=True,
              help="Aggregation method (see `crowdllm methods`).")
@click.option("--gold", help="Gold labels (task,label file, or 'example'): accuracy on gold tasks is printed.")
@click.option("--use-gold", type=click.Choice(["none", "clamp", "init"]), default="none",
              show_default=True,
              help="Also use the gold labels in fitting: clamp gold tasks' posteriors ('clamp'), "
                   "or clamp and initialise annotator quality from them ('init', Dawid-Skene).")
@click.option("--output", "-o", type=click.Path(dir_okay=False),
              help="Write task,label,p_<label>... here (.parquet, .csv or .jsonl).")
@click.option("--skills", type=click.Path(dir_okay=False),
              help="Write the annotator parameters here (.parquet, .csv or .jsonl).")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed (ties, restarts).")
@click.option("--max-iter", type=int, help="Most iterations (iterative methods).")
@click.option("--tol", type=float, help="Convergence tolerance on the objective.")
@click.option("--duplicates", type=click.Choice(["keep", "first", "last", "error"]), default="keep",
              show_default=True, help="Repeated (task, worker) answers.")
@click.option("--task-col", default="task", show_default=True)
@click.option("--worker-col", default="worker", show_default=True)
@click.option("--label-col", default="label", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary (and rows when no --output).")
@click.option("--inference", type=click.Choice(["vb", "nuts", "svi"]),
              help="Inference for Bayesian methods that offer several (ibcc: vb|nuts|svi; "
                   "ds-bayes: nuts|svi); NUTS/SVI show a progress bar.")
@click.option("--judge", help="llm-judge: the judging annotator (a panel name of the run, or "
                              "PANEL.toml#NAME); default: $CROWDLLM_JUDGE.")
@click.option("--param", "-p", "param_specs", multiple=True, metavar="NAME=VALUE",
              help="Any other parameter of the method (repeatable), e.g. -m ebcc -p restarts=10 "
                   "-p accelerate=true; values are read as JSON when they parse (numbers, "
                   "true/false, null), else as text. See the method's docstring.")
@click.option("--shard", is_flag=True,
              help="Split the answers over every local device (several GPUs; on CPU, after "
                   "XLA_FLAGS=--xla_force_host_platform_device_count=N): the single-device "
                   "results, to float rounding. Not for ds-bayes, NUTS/SVI or llm-judge.")
def aggregate(answers: str, method: str, gold: str | None, use_gold: str, output: str | None,
              skills: str | None, seed: int, max_iter: int | None, tol: float | None,
              duplicates: str, task_col: str, worker_col: str, label_col: str,
              as_json: bool, inference: str | None = None, judge: str | None = None,
              param_specs: tuple[str, ...] = (), shard: bool = False) -> None:
    """Aggregate crowd answers (a task,worker,label file, a run folder, or 'example')."""
    from .aggregation import get_method
    from .eval.bench import parse_value

    try:
        # check the options before reading a possibly large file
        params: dict[str, Any] = {"seed": seed, "max_iter": max_iter, "tol": tol,
                                  "inference": inference, "judge": judge}
        if use_gold == "init":
            params["init"] = "gold"
        named: dict[str, Any] = {}
        for spec in param_specs:
            key, sep, value = spec.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"bad --param {spec!r}: expected NAME=VALUE, e.g. restarts=10")
            named[key.strip()] = parse_value(value)
        model = get_method(method, named, **params)
        gold_path = (example_dir() / "gold.csv") if gold == "example" else gold
        if use_gold != "none" and gold_path is None:
            fail("--use-gold needs --gold")
        if use_gold != "none" and not model.supports_gold:
            fail(f"method {method!r} does not use gold labels in fitting; drop --use-gold")
        if shard and not model.shardable:
            fail(f"--shard: method {method!r} runs on one device (ds-bayes, NUTS / SVI and "
                 f"llm-judge do); drop --shard")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t0 = time.perf_counter()
            tensor = load_answers(answers, task_col=task_col, worker_col=worker_col,
                                  label_col=label_col, duplicates=duplicates)
            large = tensor.n_answers >= LARGE_ANSWERS
            _stage(large, f"read {tensor.n_answers:,} answers ({tensor.n_tasks:,} tasks, "
                          f"{tensor.n_workers:,} annotators) in {time.perf_counter() - t0:.1f} s; "
                          f"fitting {method}...")
            if gold_path is not None:
                tensor = tensor.with_gold(gold_path)
            t0 = time.perf_counter()
            with _devices(shard) as devices:
                model.fit(tensor, gold=gold_path if use_gold != "none" else None)
            _stage(large, f"fitted in {time.perf_counter() - t0:.1f} s")
    except CrowdDataError as exc:
        fail(str(exc))
    except ValueError as exc:
        fail(str(exc))
    for w in caught:
        click.echo(f"warning: {w.message}", err=True)

    summary: dict[str, Any] = {
        "method": method, "tasks": tensor.n_tasks, "workers": tensor.n_workers,
        "classes": [str(c) for c in tensor.classes.tolist()], "answers": tensor.n_answers,
        "duplicates": tensor.n_duplicates, "n_iter": model.n_iter_, "converged": model.converged_,
        "devices": devices,
    }
    if tensor.n_duplicates:
        click.echo(f"note: {tensor.n_duplicates} repeated (task, worker) answers kept "
                   f"(--duplicates first|last|error to change)", err=True)
    if tensor.has_gold:
        mask = tensor.gold >= 0
        acc = float((model.label_codes_[mask] == tensor.gold[mask]).mean())
        summary["gold_tasks"] = int(mask.sum())
        summary["accuracy"] = acc
        if use_gold != "none":
            summary["note"] = "gold tasks were clamped in fitting: their accuracy is 1 by construction"
    table = model.result_table()
    if output:
        _stage(large, f"writing {output}...")
        write_table(table, output)
        summary["output"] = output
    if skills:
        write_table(model.skills_table(), skills)
        summary["skills"] = skills
    if as_json:
        if not output:
            summary["rows"] = table.to_pylist()
        click.echo(json.dumps(summary, indent=2, default=str))
        return
    if not output:
        rows = table.to_pylist()
        shown = rows if len(rows) <= 50 else rows[:50]
        click.echo(format_table(shown))
        if len(rows) > len(shown):
            click.echo(f"... {len(rows) - len(shown)} more rows (use --output to write them all)")
    msg = (f"{method}: {tensor.n_tasks} tasks, {tensor.n_workers} annotators, "
           f"{tensor.n_answers} answers, {model.n_iter_} iteration(s)"
           + ("" if model.converged_ else " (not converged)")
           + (f", on {devices} devices" if devices > 1 else ""))
    click.echo(msg, err=True)
    if "accuracy" in summary:
        click.echo(f"accuracy on {summary['gold_tasks']} gold tasks: {summary['accuracy']:.4f}"
                   + (" (gold clamped in fitting)" if use_gold != "none" else ""))
    if output:
        click.echo(f"wrote {output}", err=True)


def _add_subcommands() -> None:
    from .eval.commands import COMMANDS as eval_commands
    from .inference.commands import COMMANDS as inference_commands

    for cmd in [*eval_commands, *inference_commands]:
        main.add_command(cmd)


_add_subcommands()

#: the command's compilation cache: programs that took at least this long to compile, at most
#: this many bytes in all (JAX evicts the least recently used)
COMPILE_CACHE_MIN_SECS = 0.2
COMPILE_CACHE_MAX_BYTES = 512 << 20


def compile_cache() -> Path | None:
    """Turn on JAX's persistent compilation cache in ``<crowdllm cache>/jax`` for this process,
    so a command that fits the same method on the same shape of data as an earlier one skips
    XLA's compilation (``crowdllm aggregate example --method mace``: 6.3 -> 3.7 s on the 2-core
    machine). Not done where ``$JAX_COMPILATION_CACHE_DIR`` names a cache already (JAX reads
    it) or ``$CROWDLLM_COMPILE_CACHE`` is 0 / off. The folder is kept under 512 MiB (oldest
    entries go first) where the ``filelock`` package is installed, unbounded otherwise. Returns
    the folder used, or None."""
    import os

    import jax

    from ._cache import cache_root, switched_off

    if os.environ.get("JAX_COMPILATION_CACHE_DIR") or switched_off("CROWDLLM_COMPILE_CACHE"):
        return None

    folder = cache_root() / "jax"
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", COMPILE_CACHE_MIN_SECS)
    # JAX locks the folder with filelock to evict old entries; without it (a dependency, but an
    # environment may lack it) every cache read fails with a warning, so the cache goes unbounded
    try:
        import filelock  # noqa: F401
    except ImportError:
        pass
    else:
        jax.config.update("jax_compilation_cache_max_size", COMPILE_CACHE_MAX_BYTES)
    return folder


def entry() -> None:
    """The ``crowdllm`` executable: :func:`main` with the compilation cache on (Python callers of
    :func:`main`, such as tests, keep their own JAX configuration)."""
    compile_cache()
    main()


if __name__ == "__main__":  # pragma: no cover
    compile_cache()
    sys.exit(main())
