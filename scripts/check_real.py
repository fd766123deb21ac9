#!/usr/bin/env python
"""Run graphopt's passes on a folder of real exported models and tabulate what each pass did.

    python scripts/check_real.py /work/realmodels/raw /work/realmodels/folded \\
        --shapes /work/realmodels/input_shapes.json --json results.json --markdown results.md
    python scripts/check_real.py /work/realmodels/raw --specs merge-convs "merge-convs --skip simplify"

For every model and pass spec this calls the library exactly as a user does,
`graphopt.optimize(path, passes=spec, skip=..., verify=True)`, and records: the exit status
`graphopt run` would have (0 written, 1 not equivalent, 2 bad input, 3 internal error), sites
found/rewritten and declines (by reason) per pass, rollbacks with their reasons, the largest
error relative to the output scale, nodes and FLOPs before/after, and seconds. The `all` spec's
output is optimized again with `all` (`--idempotence every` does this for every spec): a second
run must change nothing, checked as equal node count, equal graph structure bytes (nodes,
inputs, outputs, initializer names/types/dims; value_info left out) and equal weight bytes.

A spec is a pipeline spec as on the command line, optionally followed by ` --skip PASS[,PASS]`
(`merge-convs --skip simplify` runs merge-convs without the canonicalizing simplify around it).
Default specs: each pass in `all` alone, then `all`.

Each model runs in its own subprocess, so a crash, a hang (--timeout) or a leak costs one model
and is reported as such; its stderr is kept, since graphopt promises one line per error and no
other library's log lines. --jobs runs that many models at a time (default 1: the machine is
shared); GRAPHOPT_ORT_THREADS is set to --ort-threads for every worker.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_NOT_EQUIVALENT, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3
EXIT_CRASHED = "crashed"
EXIT_TIMED_OUT = "timed-out"
SKIP_MARK = " --skip "
STDERR_KEPT_LINES = 20
TABLE_ERROR_CHARS = 160  # the table shows the start of an error; --json keeps all of it


@dataclass(frozen=True)
class Job:
    """One model and the specs to run on it, as the worker receives it (JSON)."""

    model: str
    specs: list[str]
    input_shapes: dict[str, list[int]]
    idempotence: str  # "all", "every" or "none"


@dataclass
class PassSummary:
    """One record of the report, condensed: what a pass found, rewrote, declined and undid."""

    name: str
    status: str
    after: str | None  # set when this is the canonicalizer run after another pass (graphopt >= 667a223)
    sites_found: int
    sites_applied: int
    declined: dict[str, int]
    rolled_back: list[str]
    max_rel_err: float | None
    nodes_before: int
    nodes_after: int
    seconds: float
    error: str | None
    warnings: list[str]

    @property
    def label(self) -> str:
        return f"{self.name}[after {self.after}]" if self.after else self.name


@dataclass
class Idempotence:
    """A second run of a spec on its own output."""

    exit_status: int | str
    changed_passes: list[str]
    same_node_count: bool
    same_structure: bool
    same_weights: bool
    nodes: int
    error: str | None = None

    @property
    def holds(self) -> bool:
        return self.exit_status == EXIT_OK and self.same_node_count and self.same_structure and self.same_weights


@dataclass
class Row:
    """One model under one spec."""

    model: str
    folder: str
    spec: str
    exit_status: int | str
    error: str | None = None
    passes: list[PassSummary] = field(default_factory=list)
    rollbacks: int = 0
    max_rel_err: float | None = None
    final_passed: bool | None = None
    nodes_before: int | None = None
    nodes_after: int | None = None
    flops_before: int | None = None
    flops_after: int | None = None
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    idempotence: Idempotence | None = None


@dataclass
class ModelRun:
    """Everything a worker returned for one model, plus what its process wrote to stderr."""

    path: str
    model: str
    rows: list[Row]
    stderr_lines: int
    stderr_head: list[str]


# -- the worker: runs in its own process, one model -----------------------------------------------


def split_spec(spec: str) -> tuple[str, list[str]]:
    pipeline, _, skip = spec.partition(SKIP_MARK)
    return pipeline.strip(), [s.strip() for s in skip.split(",") if s.strip()]


def run_spec(model_path: str, spec: str, input_shapes: dict[str, tuple[int, ...]]) -> tuple[Row, Any]:
    """Optimize as `graphopt run` would; return the row and the optimized model (None on failure)."""
    import graphopt

    pipeline, skip = split_spec(spec)
    row = Row(model=Path(model_path).stem, folder=Path(model_path).parent.name, spec=spec, exit_status=EXIT_OK)
    start = time.perf_counter()
    try:
        model, report = graphopt.optimize(model_path, passes=pipeline, skip=skip, verify=True, input_shapes=input_shapes)
    except graphopt.GraphoptError as err:
        row.exit_status, row.error = err.exit_code, one_line(err)
        row.seconds = time.perf_counter() - start
        return row, None
    except Exception as err:  # a bug in graphopt: the CLI maps it to exit 3, so does this table
        row.exit_status, row.error = EXIT_INTERNAL, f"{type(err).__name__}: {one_line(err)}"
        row.seconds = time.perf_counter() - start
        return row, None
    row.seconds = time.perf_counter() - start
    fill_from_report(row, report)
    if report.final is not None and not report.final.passed:
        # `graphopt run` writes nothing and exits 1 when the passes verified alone but drifted together.
        row.exit_status, row.error = EXIT_NOT_EQUIVALENT, report.final.detail
        return row, None
    return row, model


def fill_from_report(row: Row, report: Any) -> None:
    row.nodes_before, row.nodes_after = report.nodes_before, report.nodes_after
    row.flops_before, row.flops_after = report.flops_before, report.flops_after
    row.warnings = list(report.warnings)
    row.passes = [summarize(record) for record in report.passes]
    row.rollbacks = sum(len(p.rolled_back) for p in row.passes)
    errors = [p.max_rel_err for p in row.passes if p.max_rel_err is not None]
    if report.final is not None:
        row.final_passed = report.final.passed
        errors.append(report.final.max_rel_err)
    row.max_rel_err = max(errors) if errors else None


def summarize(record: Any) -> PassSummary:
    return PassSummary(
        name=record.name, status=record.status, after=getattr(record, "after", None),
        sites_found=record.sites_found, sites_applied=len(record.sites_applied), declined=dict(record.skipped),
        rolled_back=[f"{site.site}: {site.reason}" for site in record.rolled_back],
        max_rel_err=record.max_rel_err, nodes_before=record.nodes_before, nodes_after=record.nodes_after,
        seconds=record.seconds, error=record.error, warnings=list(record.warnings),
    )


def check_idempotence(optimized: Any, spec: str, input_shapes: dict[str, tuple[int, ...]]) -> Idempotence:
    import graphopt

    pipeline, skip = split_spec(spec)
    try:
        again, report = graphopt.optimize(optimized, passes=pipeline, skip=skip, verify=True, input_shapes=input_shapes)
    except Exception as err:  # reported in the table; the first run's row stands
        code = err.exit_code if isinstance(err, graphopt.GraphoptError) else EXIT_INTERNAL
        return Idempotence(code, [], False, False, False, 0, f"{type(err).__name__}: {one_line(err)}")
    changed = [summarize(r).label for r in report.passes if r.changed]
    return Idempotence(
        exit_status=EXIT_OK, changed_passes=changed,
        same_node_count=len(again.graph.node) == len(optimized.graph.node),
        same_structure=structure_bytes(again) == structure_bytes(optimized),
        same_weights=weight_digest(again) == weight_digest(optimized),
        nodes=len(again.graph.node),
    )


def structure_bytes(model: Any) -> bytes:
    """The graph as bytes without weights' values and without inferred value_info."""
    import onnx

    graph = onnx.GraphProto()
    graph.CopyFrom(model.graph)
    del graph.value_info[:]
    for tensor in graph.initializer:
        tensor.ClearField("raw_data")
        for values in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
            tensor.ClearField(values)
    return graph.SerializeToString(deterministic=True)


def weight_digest(model: Any) -> str:
    digest = hashlib.sha256()
    for tensor in sorted(model.graph.initializer, key=lambda t: t.name):
        digest.update(tensor.name.encode())
        digest.update(tensor.SerializeToString(deterministic=True))
    return digest.hexdigest()


def run_job(job: Job) -> list[Row]:
    shapes = {name: tuple(dims) for name, dims in job.input_shapes.items()}
    rows = []
    for spec in job.specs:
        row, optimized = run_spec(job.model, spec, shapes)
        wants_rerun = job.idempotence == "every" or (job.idempotence == "all" and split_spec(spec)[0] == "all")
        if wants_rerun and optimized is not None:
            row.idempotence = check_idempotence(optimized, spec, shapes)
        rows.append(row)
        print(f"  {row.model} [{spec}] exit {row.exit_status} in {row.seconds:.1f} s", file=sys.stderr, flush=True)
    return rows


def worker_main(job_path: Path, result_path: Path) -> int:
    job = Job(**json.loads(job_path.read_text()))
    rows = run_job(job)
    result_path.write_text(json.dumps([dataclasses.asdict(r) for r in rows]))
    return 0


# -- the driver: one subprocess per model ----------------------------------------------------------


def run_model(job: Job, timeout: float, ort_threads: int) -> ModelRun:
    name = Path(job.model).stem
    env = {**os.environ, "GRAPHOPT_ORT_THREADS": str(ort_threads), "OMP_NUM_THREADS": str(ort_threads)}
    with tempfile.TemporaryDirectory(prefix="check-real-") as tmp:
        job_path, result_path = Path(tmp, "job.json"), Path(tmp, "result.json")
        job_path.write_text(json.dumps(dataclasses.asdict(job)))
        command = [sys.executable, __file__, "--worker", str(job_path), str(result_path)]
        try:
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as err:
            stderr = (err.stderr or b"").decode(errors="replace") if isinstance(err.stderr, bytes) else (err.stderr or "")
            return failed_run(job, EXIT_TIMED_OUT, f"worker ran past {timeout:.0f} s", stderr)
        if done.returncode != 0 or not result_path.exists():
            last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""
            return failed_run(job, EXIT_CRASHED, f"worker exited {done.returncode}: {last}", done.stderr)
        rows = [row_from_dict(r) for r in json.loads(result_path.read_text())]
    foreign = foreign_stderr(done.stderr)
    return ModelRun(job.model, name, rows, len(foreign), foreign[:STDERR_KEPT_LINES])


def foreign_stderr(stderr: str) -> list[str]:
    """Lines the worker did not print itself (its own progress lines start with two spaces)."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("  ")]


def failed_run(job: Job, status: str, error: str, stderr: str) -> ModelRun:
    name = Path(job.model).stem
    folder = Path(job.model).parent.name
    rows = [Row(model=name, folder=folder, spec=spec, exit_status=status, error=error) for spec in job.specs]
    lines = stderr.splitlines()
    return ModelRun(job.model, name, rows, len(lines), lines[-STDERR_KEPT_LINES:])


def load_results(path: Path) -> tuple[list[ModelRun], dict[str, Any]]:
    """A --json file read back, to render its markdown again without rerunning."""
    saved = json.loads(path.read_text())
    runs = [ModelRun(**{**run, "rows": [row_from_dict(row) for row in run["rows"]]}) for run in saved["runs"]]
    return runs, saved["meta"]


def row_from_dict(data: dict[str, Any]) -> Row:
    passes = [PassSummary(**p) for p in data.pop("passes")]
    idempotence = data.pop("idempotence")
    return Row(**data, passes=passes, idempotence=Idempotence(**idempotence) if idempotence else None)


def default_specs() -> list[str]:
    from graphopt.registry import default_order

    return [*default_order(), "all"]


def graphopt_source() -> dict[str, Any]:
    """Which graphopt ran: its version, where it was imported from, and that checkout's commit and state."""
    import graphopt

    source = Path(graphopt.__file__).resolve().parents[1]
    info: dict[str, Any] = {"version": graphopt.__version__, "path": str(source)}
    try:
        info["commit"] = git(source, "rev-parse", "HEAD")
        info["branch"] = git(source, "rev-parse", "--abbrev-ref", "HEAD")
        info["uncommitted"] = [line for line in git(source, "status", "--porcelain", "--untracked-files=no").splitlines() if line]
    except (OSError, subprocess.CalledProcessError):
        info["commit"] = None  # an installed copy, not a checkout
    return info


def git(where: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True, check=True).stdout.strip()


def find_models(folders: list[Path], only: list[str] | None) -> list[Path]:
    models = []
    for folder in folders:
        if not folder.is_dir():
            raise SystemExit(f"check_real: error: {folder} is not a folder")
        models += [p for p in sorted(folder.glob("*.onnx")) if not only or p.stem in only]
    if not models:
        raise SystemExit("check_real: error: no .onnx models found" + (f" named {', '.join(only)}" if only else ""))
    return models


# -- the table -------------------------------------------------------------------------------------


def pass_cell(row: Row) -> str:
    """`pass applied/found` per pass, canonicalizer runs that changed nothing left out."""
    cells = []
    for p in row.passes:
        if p.after and p.sites_applied == 0 and not p.rolled_back:
            continue
        cell = f"{p.label} {p.sites_applied}/{p.sites_found}"
        if p.rolled_back:
            cell += f" (-{len(p.rolled_back)})"
        cells.append(cell)
    return ", ".join(cells) or "-"


def idempotence_cell(row: Row) -> str:
    idem = row.idempotence
    if idem is None:
        return ""
    if idem.error:
        return f"exit {idem.exit_status}: {idem.error}"
    changed = f"passes reporting a change: {', '.join(idem.changed_passes)}" if idem.changed_passes else ""
    if idem.holds:
        return f"yes ({changed})" if changed else "yes"
    facts = [] if idem.same_node_count else [f"{row.nodes_after} -> {idem.nodes} nodes"]
    facts += [] if idem.same_structure else ["structure differs"]
    facts += [] if idem.same_weights else ["weights differ"]
    return "NO: " + "; ".join(facts + ([changed] if changed else []))


def shorten(text: str | None) -> str:
    if not text:
        return ""
    text = text.replace("|", "/")
    return text if len(text) <= TABLE_ERROR_CHARS else text[:TABLE_ERROR_CHARS] + "..."


def number(value: float | None, digits: str = ".1e") -> str:
    return "-" if value is None else format(value, digits)


def format_table(runs: list[ModelRun]) -> list[str]:
    lines = [
        "| model | spec | exit | sites rewritten/found per pass (-rolled back) | rollbacks | max rel err | nodes | GFLOPs | s | rerun changes nothing |",
        "|---|---|---|---|---:|---:|---|---|---:|---|",
    ]
    for run in runs:
        for row in run.rows:
            error = shorten(row.error)
            if row.nodes_before is None:
                lines.append(f"| {row.folder}/{row.model} | `{row.spec}` | {row.exit_status} | {error} | | | | | {row.seconds:.1f} | |")
                continue
            exit_cell = f"{row.exit_status}" + (f": {error}" if error else "")
            lines.append(
                f"| {row.folder}/{row.model} | `{row.spec}` | {exit_cell} | {pass_cell(row)} | {row.rollbacks} "
                f"| {number(row.max_rel_err)} | {row.nodes_before} -> {row.nodes_after} "
                f"| {row.flops_before / 1e9:.3f} -> {row.flops_after / 1e9:.3f} | {row.seconds:.1f} | {idempotence_cell(row)} |")
    return lines


def format_declines(runs: list[ModelRun]) -> list[str]:
    """Per model and spec, each pass's declines by reason and each rollback's reason."""
    lines = []
    for run in runs:
        for row in run.rows:
            for p in row.passes:
                idle_canonicalization = p.after and p.sites_applied == 0 and not p.rolled_back and not p.error
                if idle_canonicalization or (not p.declined and not p.rolled_back and not p.error):
                    continue
                reasons = "; ".join(f"{n}x {reason}" for reason, n in sorted(p.declined.items(), key=lambda kv: -kv[1]))
                lines.append(f"- {row.folder}/{row.model} `{row.spec}` {p.label}: {reasons or 'no declines'}")
                lines += [f"  - rolled back {site}" for site in p.rolled_back]
                if p.error:
                    lines.append(f"  - error: {p.error}")
    return lines


def format_summary(runs: list[ModelRun]) -> list[str]:
    rows = [row for run in runs for row in run.rows]
    failed = [row for row in rows if row.exit_status != EXIT_OK]
    reruns = [row.idempotence for row in rows if row.idempotence]
    errors = [row.max_rel_err for row in rows if row.max_rel_err is not None]
    lines = [
        f"- {len(rows)} runs ({len(runs)} models x {len(rows) // max(len(runs), 1)} specs); "
        f"{len(failed)} exited non-zero ({', '.join(sorted({f'{r.folder}/{r.model}' for r in failed})) or 'none'})",
        f"- {sum(row.rollbacks for row in rows)} sites rolled back; largest error relative to output scale "
        f"{max(errors):.1e}" if errors else "- no verified rewrite",
        f"- second runs: {len(reruns)}, of which {sum(not i.holds for i in reruns)} changed the graph or failed, "
        f"{sum(bool(i.changed_passes) for i in reruns)} had a pass report a change",
        f"- {sum(1 for run in runs if run.stderr_lines)} models printed lines of their own to stderr (see the end)",
    ]
    return lines


def format_markdown(runs: list[ModelRun], meta: dict[str, Any]) -> str:
    source = meta["graphopt"]
    dirty = f", uncommitted changes to {len(source['uncommitted'])} files" if source.get("uncommitted") else ""
    lines = [
        "# graphopt on real exported models",
        "",
        f"graphopt {source['version']} from {source['path']} (commit {source.get('commit')}{dirty}); "
        f"{meta['started']}, {meta['seconds']:.0f} s, jobs {meta['jobs']}, ORT threads {meta['ort_threads']}.",
        "",
        "Exit: what `graphopt run` would return (0 written, 1 not equivalent, 2 bad input, 3 internal error).",
        "Sites: rewritten/found per pass record; `simplify[after X]` is the canonicalizer run after pass X",
        "(listed only when it changed something). Max rel err: the largest error over every verified pass and the",
        "final check, relative to each output's largest magnitude. Rerun: the same spec on the output changes nothing",
        "(same nodes, graph structure and weights).",
        "",
        *format_summary(runs),
        "",
        *format_table(runs),
        "",
        "## Declines and rollbacks",
        "",
        *format_declines(runs),
        "",
        "## Lines on stderr not printed by graphopt's library calls",
        "",
    ]
    noisy = [run for run in runs if run.stderr_lines]
    lines += [f"- {Path(run.path).parent.name}/{run.model}: {run.stderr_lines} lines, first: `{run.stderr_head[0][:200]}`" for run in noisy] or ["none"]
    return "\n".join(lines) + "\n"


def print_summary(runs: list[ModelRun]) -> None:
    for line in format_table(runs):
        print(line)


def one_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="*", type=Path, help="folders of .onnx models")
    parser.add_argument("--render", type=Path, metavar="JSON", help="only write --markdown from a saved --json file")
    parser.add_argument("--specs", nargs="+", help="pipeline specs, each optionally with ' --skip PASS' (default: each pass alone, then all)")
    parser.add_argument("--only", action="append", metavar="MODEL", help="only models of this name (file stem; repeatable)")
    parser.add_argument("--shapes", type=Path, help="JSON {model: {input: [dims]}} for inputs with dynamic dims besides batch")
    parser.add_argument("--idempotence", choices=["all", "every", "none"], default="all",
                        help="rerun the spec on its own output: for `all` only (default), for every spec, or never")
    parser.add_argument("--jobs", type=int, default=1, help="models at a time (default 1)")
    parser.add_argument("--ort-threads", type=int, default=1, help="GRAPHOPT_ORT_THREADS for each worker (default 1)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per model, all specs (default 1800)")
    parser.add_argument("--json", type=Path, help="write every result here")
    parser.add_argument("--markdown", type=Path, help="write the table and the declines here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) == 4 and sys.argv[1] == "--worker":
        return worker_main(Path(sys.argv[2]), Path(sys.argv[3]))
    args = parse_args(argv)
    if args.render:
        if not args.markdown:
            raise SystemExit("check_real: error: --render needs --markdown")
        args.markdown.write_text(format_markdown(*load_results(args.render)))
        return 0
    if not args.folders:
        raise SystemExit("check_real: error: give at least one folder of .onnx models")
    specs = args.specs or default_specs()
    shapes = json.loads(args.shapes.read_text()) if args.shapes else {}
    models = find_models(args.folders, args.only)
    jobs = [Job(str(path), specs, shapes.get(path.stem, {}), args.idempotence) for path in models]
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    source = graphopt_source()  # before the run: an editable checkout may change while it runs
    start = time.perf_counter()
    runs: list[ModelRun] = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(run_model, job, args.timeout, args.ort_threads): job for job in jobs}
        for future in concurrent.futures.as_completed(futures):
            run = future.result()
            runs.append(run)
            job = futures[future]
            print(f"{Path(job.model).parent.name}/{run.model}: " + ", ".join(f"{r.spec}={r.exit_status}" for r in run.rows), flush=True)
    order = {job.model: i for i, job in enumerate(jobs)}
    runs.sort(key=lambda run: order[run.path])
    meta = {"graphopt": source, "started": started, "seconds": time.perf_counter() - start, "jobs": args.jobs,
            "ort_threads": args.ort_threads, "specs": specs, "folders": [str(f) for f in args.folders]}
    print_summary(runs)
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "runs": [dataclasses.asdict(run) for run in runs]}, indent=1))
    if args.markdown:
        args.markdown.write_text(format_markdown(runs, meta))
    failed = [row for run in runs for row in run.rows if row.exit_status != EXIT_OK]
    not_idempotent = [row for run in runs for row in run.rows if row.idempotence and not row.idempotence.holds]
    print(f"{sum(len(run.rows) for run in runs)} runs, {len(failed)} exited non-zero, "
          f"{sum(row.rollbacks for run in runs for row in run.rows)} sites rolled back, "
          f"{len(not_idempotent)} second runs changed something or failed")
    return 1 if failed or not_idempotent else 0


if __name__ == "__main__":
    sys.exit(main())
