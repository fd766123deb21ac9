"""The `graphopt` command line: run, verify, list.

Exit codes: 0 success; 1 the models are not equivalent (verification failed under --strict, or
`verify` found a difference); 2 usage error or bad input; 3 an internal error (a bug: please
report it with the output of --debug). Errors print one line; --debug adds the traceback.
"""

from __future__ import annotations

import signal
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from functools import wraps
from pathlib import Path
from typing import Any

import click
import onnx
from polygraphy.logger import G_LOGGER

import graphopt
from graphopt import modelio
from graphopt.errors import EXIT_NOT_EQUIVALENT, EquivalenceError, GraphoptError, InputDataError, ModelError, OptionError
from graphopt.goldens import load_outputs, save_inputs, save_outputs
from graphopt.inputs import InputSet, graph_inputs, load_input_sets, script_input_sets
from graphopt.lint import diff_findings, lint_command_impl, lint_model
from graphopt.lint.findings import PRECISIONS as LINT_PRECISIONS
from graphopt.pipeline import CANONICALIZER, Pipeline
from graphopt.registry import available_passes, default_order
from graphopt.report import INPUT, PassRecord, Report
from graphopt.spec import describe_options, parse_spec
from graphopt.verify import ORT, TRT, Tolerance, Verifier, default_tolerance, parse_input_shapes

EXIT_INTERNAL = 3


class Terminated(BaseException):
    """SIGTERM, raised like KeyboardInterrupt so that temporary files are cleaned up the same way."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated()


def _handle_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn every failure into one line on stderr and a documented exit code."""

    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = click.get_current_context().find_root().params.get("debug", False)
        previous_handler = signal.signal(signal.SIGTERM, _terminate)
        try:
            return command(*args, **kwargs)
        except click.ClickException:
            raise  # click prints usage errors itself, with exit code 2
        except GraphoptError as err:
            if debug:
                traceback.print_exc()
            click.echo(f"graphopt: error: {err}", err=True)
            sys.exit(err.exit_code)
        except (KeyboardInterrupt, Terminated) as err:
            # Outputs are renamed into place whole, so an interrupt leaves no partial or temporary file.
            click.echo("graphopt: interrupted; no file was left half-written", err=True)
            sys.exit(128 + (signal.SIGTERM if isinstance(err, Terminated) else signal.SIGINT))
        except Exception as err:  # a bug: still one line unless --debug, never a half-written file
            if debug:
                traceback.print_exc()
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            click.echo(f"graphopt: internal error: {type(err).__name__}: {first} (rerun with --debug for the traceback)", err=True)
            sys.exit(EXIT_INTERNAL)
        finally:
            signal.signal(signal.SIGTERM, previous_handler)  # as it was, for callers that run commands in-process

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(graphopt.__version__, prog_name="graphopt")
@click.option("--debug", is_flag=True, help="Show Python tracebacks for errors.")
def main(debug: bool) -> None:
    """Rewrite ONNX graphs into what TensorRT runs best, and prove every rewrite with polygraphy."""
    # graphopt reports in one line; polygraphy's own messages (even critical ones) would come first.
    G_LOGGER.module_severity = G_LOGGER.CRITICAL + 1


def _verification_options(command: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME:DIMS|DIM=SIZE",
                     help="An input's shape (images:1x3x224x224) or named dims (batch=4,sequence=64), repeatable. "
                          "Dims left open are verified at 1 and at a larger size."),
        click.option("--atol", type=float, default=None, help="Absolute tolerance [default: 1e-8 fp32, 1e-5 fp16]."),
        click.option("--rtol", type=float, default=None,
                     help="Tolerance relative to each output's largest magnitude [default: 1e-5 fp32, 1e-2 fp16]."),
        click.option("--seed", type=int, default=0, show_default=True,
                     help="Seed of the first random input set (each further set takes the next seed)."),
        click.option("--load-inputs", "load_inputs_path", type=click.Path(path_type=Path),
                     help="Verify on these inputs instead of random ones: polygraphy's input JSON (polygraphy run --save-inputs), "
                          "one input set per feed."),
        click.option("--data-loader-script", metavar="FILE.py[:FUNC]",
                     help="Verify on the feeds FUNC (default load_data) of FILE.py yields, polygraphy's convention."),
        click.option("--backend", type=click.Choice(["auto", ORT, TRT]), default="auto", show_default=True,
                     help="Who runs the candidate graph; auto picks TensorRT when it imports, else ONNX Runtime."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@dataclass(frozen=True)
class UserData:
    """The user's own verification inputs: a --load-inputs file or a --data-loader-script."""

    load_inputs: Path | None
    data_loader_script: str | None

    @classmethod
    def from_options(cls, load_inputs: Path | None, data_loader_script: str | None, input_shapes: tuple[str, ...]) -> UserData:
        if load_inputs is not None and data_loader_script is not None:
            raise OptionError("give --load-inputs or --data-loader-script, not both")
        if (load_inputs is not None or data_loader_script is not None) and input_shapes:
            raise OptionError("--input-shape shapes random inputs; with --load-inputs or --data-loader-script the data has its own shapes")
        return cls(load_inputs, data_loader_script)

    @property
    def given(self) -> bool:
        return self.load_inputs is not None or self.data_loader_script is not None

    def files(self) -> list[modelio.InputFile]:
        if self.load_inputs is not None:
            return [modelio.InputFile(self.load_inputs, "--load-inputs")]
        if self.data_loader_script is not None:
            script, _, _ = self.data_loader_script.partition(":")
            return [modelio.InputFile(Path(script), "--data-loader-script")]
        return []

    def input_sets(self, model: onnx.ModelProto) -> list[InputSet] | None:
        if self.load_inputs is not None:
            return load_input_sets(self.load_inputs, graph_inputs(model))
        if self.data_loader_script is not None:
            return script_input_sets(self.data_loader_script, graph_inputs(model))
        return None


def _tolerance_from_options(atol: float | None, rtol: float | None) -> Callable[[onnx.ModelProto], Tolerance]:
    """The tolerance for a model (its precision's default where not given); bad values are refused now."""
    Tolerance(atol=0.0 if atol is None else atol, rtol=0.0 if rtol is None else rtol)

    def for_model(model: onnx.ModelProto) -> Tolerance:
        default = default_tolerance(model)
        return Tolerance(atol=default.atol if atol is None else atol, rtol=default.rtol if rtol is None else rtol)

    return for_model


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Where to write the optimized model.")
@click.option("--passes", default="all", show_default=True,
              help="Pipeline spec, e.g. all, all(pad-channels.align=16) or fc-to-conv,pad-channels(align=16); +PASS runs a pass again.")
@click.option("--skip", multiple=True, metavar="PASS", help="Leave these passes out of the spec (repeatable or comma-separated).")
@click.option("--set", "settings", multiple=True, metavar="PASS.OPTION=VALUE",
              help="Set an option of a pass the spec runs, e.g. pad-channels.precision=int8 (repeatable).")
@click.option("--report", "report_path", type=click.Path(path_type=Path), help="Write the JSON report here.")
@click.option("--no-verify", is_flag=True, help="Skip equivalence checking (passes that raise are still rolled back).")
@click.option("--strict", is_flag=True, help="Exit 1 and write nothing if any rewrite fails verification.")
@click.option("--fixed-point", is_flag=True, help="Repeat the pipeline until no pass changes the graph.")
@click.option("--in-place", is_flag=True, help="Overwrite MODEL with the result (atomically).")
@click.option("--force", is_flag=True, help="Allow -o to name the input file.")
@click.option("-q", "--quiet", is_flag=True, help="Print only errors.")
@click.option("--lint", "show_lint", is_flag=True, help="Print how the lint findings changed from MODEL to the output.")
@_verification_options
@_handle_errors
def run(model: Path, output: Path | None, passes: str, skip: tuple[str, ...], settings: tuple[str, ...], report_path: Path | None, no_verify: bool,
        strict: bool, fixed_point: bool, in_place: bool, force: bool, quiet: bool, show_lint: bool, input_shapes: tuple[str, ...],
        atol: float | None, rtol: float | None, seed: int, backend: str, load_inputs_path: Path | None,
        data_loader_script: str | None) -> None:
    """Optimize MODEL and write the result to OUTPUT."""
    if output is None and not in_place:
        raise click.UsageError("give -o/--output, or --in-place to overwrite the input")
    if output is not None and in_place:
        raise click.UsageError("-o/--output and --in-place exclude each other")
    pipeline_passes = parse_spec(passes, skip, settings)  # a bad spec is reported before any slow work
    shapes = parse_input_shapes(input_shapes)
    user_data = UserData.from_options(load_inputs_path, data_loader_script, input_shapes)
    if no_verify and user_data.given:
        raise OptionError("--load-inputs and --data-loader-script are inputs for verification; drop --no-verify")
    tolerance = _tolerance_from_options(atol, rtol)  # a bad tolerance is refused before any slow work too
    source_file = modelio.read_model(model)
    source = source_file.model
    outputs = [modelio.OutputFile(output or model, "-o" if output else "--in-place", is_model=True,
                                  may_replace=model if in_place or force else None)]
    if report_path:
        outputs.append(modelio.OutputFile(report_path, "--report"))
    target, *report_target = modelio.check_outputs(outputs, source_file.inputs() + user_data.files())
    write_report = (lambda report: modelio.write_text_atomic(report_target[0], report.to_json())) if report_target else (lambda report: None)
    echo = (lambda message: None) if quiet else (lambda message: click.echo(message, err=True))
    pipeline = Pipeline(pipeline_passes, verify=not no_verify, strict=strict, fixed_point=fixed_point,
                        tolerance=tolerance(source) if not no_verify else None, input_shapes=shapes, seed=seed,
                        input_sets=user_data.input_sets(source), backend=backend, progress=echo,
                        canonicalize=CANONICALIZER not in {s.strip() for item in skip for s in item.split(",")})
    try:
        optimized, report = pipeline.run(source)
    except EquivalenceError as err:
        if isinstance(err.report, Report):
            write_report(err.report)
            if not quiet:
                click.echo(format_summary(err.report))
        raise EquivalenceError(f"{err}; nothing was written") from None
    if report.final is not None and not report.final.passed:
        # Each pass verified on its own but together they drifted: never write an unproven model.
        write_report(report)
        raise EquivalenceError(f"the optimized model differs from the input: {report.final.detail}; nothing was written")
    modelio.save_model(optimized, target)
    write_report(report)
    if not quiet:
        click.echo(format_summary(report))
        click.echo(f"wrote {output or model}", err=True)
    if show_lint and not quiet:  # the run itself shows what the passes fix: no forecast needed
        # Lint judges float32 and int8 layers as the run's pad-channels did (its defaults if it did not run).
        padding = next((p.options for p in pipeline_passes if p.name == "pad-channels"), None)
        options = {} if padding is None else {"precision": padding.precision, "int8_align": padding.int8_align}
        before = lint_model(source, name=model.name, fixes=False, **options)
        click.echo(diff_findings(before, lint_model(optimized, fixes=False, **options)))


def format_summary(report: Report) -> str:
    rows = [("pass", "status", "nodes", "time", "verified by", "max rel err")]
    for p in report.passes:
        rows.append((
            _step_label(p),
            p.status,
            f"{p.nodes_before} -> {p.nodes_after}",
            f"{p.seconds:.2f}s",
            (p.verified_by + (" (layer-wise)" if p.judged else "")) if p.verified_by else ("-" if not report.verify or not p.changed else "?"),
            "-" if p.max_rel_err is None else f"{p.max_rel_err:.1e}",
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.insert(0, f"pipeline: {report.pipeline}")
    for p in report.passes:
        for site in p.rolled_back:
            lines.append(f"rolled back {p.name} at {site.site}: {site.reason}")
        lines.extend(f"warning: {w}" for w in p.warnings)
    lines.extend(f"warning: {w}" for w in report.warnings)
    flops = f", FLOPs {_si(report.flops_before)} -> {_si(report.flops_after)}" if report.flops_before else ""
    lines.append(f"nodes {report.nodes_before} -> {report.nodes_after}{flops}, {report.seconds:.2f}s")
    if report.final is not None:
        verdict = "equivalent" if report.final.passed else "NOT equivalent"
        lines.append(f"whole pipeline: {verdict} on {report.final.verified_by} ({report.final.detail})")
        if report.final.judged:
            lines.append(f"  {report.final.judged}")
    elif not report.verify:
        lines.append("whole pipeline: not verified (--no-verify)")
    return "\n".join(lines)


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--precision", type=click.Choice(list(LINT_PRECISIONS)), default=None,
              help="What float32 layers will run in, as pad-channels' precision option [default: pad-channels' default, fp16]; "
                   "Q/DQ and float16 layers run in their own types.")
@click.option("--int8-align", type=click.Choice(["16", "32"]), default=None,
              help="Channel multiple of an int8 layer, as pad-channels' int8_align option [default: 32].")
@click.option("--json", "json_path", type=click.Path(path_type=Path),
              help="Also write the findings as JSON (schema in docs/lint.md).")
@click.option("--no-fixes", is_flag=True,
              help="Do not run the passes (unverified) to learn which fix each finding: faster, and no finding names a fix.")
@_handle_errors
def lint(model: Path, precision: str | None, int8_align: str | None, json_path: Path | None, no_fixes: bool) -> None:
    """Report what keeps TensorRT from running MODEL well, and which passes fix each finding.

    Exit status: 0 when the ONNX-TensorRT parser would accept MODEL, 1 when it would reject it,
    2 for bad input.
    """
    sys.exit(lint_command_impl(model, precision, json_path, fixes=not no_fixes, int8_align=None if int8_align is None else int(int8_align)))


def _step_label(record: PassRecord) -> str:
    label = record.name if record.iteration == 1 else f"{record.name} #{record.iteration}"
    if record.after == INPUT:
        return f"{label} (canonical form)"
    return f"  {label} (after {record.after})" if record.canonicalization else label


def _si(value: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.3g}{unit}"
    return f"{value:.3g}"


@main.command(name="list")
@_handle_errors
def list_passes() -> None:
    """List every registered pass, its summary and options."""
    order = default_order()
    passes = available_passes()
    # `all` order first, as users will run them; passes outside `all` after, by name
    for name in order + [n for n in passes if n not in order]:
        cls = passes[name]
        position = f"all #{order.index(name) + 1}" if name in order else "not in all"
        click.echo(f"{name}  [{position}]\n    {cls.summary}\n    options: {describe_options(cls)}")


@main.command()
@click.argument("reference", type=click.Path(path_type=Path))
@click.argument("candidate", type=click.Path(path_type=Path), required=False)
@click.option("--save-outputs", "save_outputs_path", type=click.Path(path_type=Path),
              help="Save the reference outputs (polygraphy RunResults JSON).")
@click.option("--save-inputs", "save_inputs_path", type=click.Path(path_type=Path),
              help="Save the inputs used (polygraphy input-data JSON).")
@click.option("--load-outputs", "load_outputs_path", type=click.Path(path_type=Path),
              help="Compare against saved outputs (e.g. from polygraphy run --save-outputs) instead of a reference model.")
@_verification_options
@_handle_errors
def verify(reference: Path, candidate: Path | None, save_outputs_path: Path | None, save_inputs_path: Path | None,
           load_outputs_path: Path | None, load_inputs_path: Path | None, data_loader_script: str | None,
           input_shapes: tuple[str, ...], atol: float | None, rtol: float | None, seed: int, backend: str) -> None:
    """Check that CANDIDATE computes what REFERENCE computes (exit 0) or not (exit 1).

    With --load-outputs, give one model: it is checked against the saved outputs.
    """
    shapes = parse_input_shapes(input_shapes)
    user_data = UserData.from_options(load_inputs_path, data_loader_script, input_shapes)
    tolerance = _tolerance_from_options(atol, rtol)
    if load_outputs_path is not None and candidate is not None:
        raise click.UsageError("with --load-outputs give one model: the one to check against the saved outputs")
    if load_outputs_path is None and candidate is None:
        raise click.UsageError("give two models (REFERENCE CANDIDATE), or one model with --load-outputs")
    reference_file = modelio.read_model(reference)
    candidate_file = modelio.read_model(candidate) if candidate is not None else reference_file
    inputs = reference_file.inputs("the reference model") + candidate_file.inputs("the candidate model") + user_data.files()
    inputs += [modelio.InputFile(load_outputs_path, "--load-outputs")] if load_outputs_path else []
    outputs = [modelio.OutputFile(path, option) for path, option in ((save_outputs_path, "--save-outputs"), (save_inputs_path, "--save-inputs")) if path]
    targets = dict(zip((out.option for out in outputs), modelio.check_outputs(outputs, inputs)))
    reference_model, candidate_model = reference_file.model, candidate_file.model
    expected = load_outputs(load_outputs_path, candidate_model) if load_outputs_path else None
    verifier = Verifier(reference_model, input_shapes=shapes, seed=seed, backend=backend, input_sets=user_data.input_sets(reference_model),
                        tolerance=tolerance(reference_model))
    if expected is None:
        try:
            expected = verifier.reference_of_input(reference_model)
        except Exception as err:  # ORT raises its own types for a graph or a feed it cannot run
            raise ModelError(f"cannot verify: ONNX Runtime cannot run {reference} ({type(err).__name__}: {_one_line(err)}); "
                             "give inputs it runs on with --load-inputs") from None
    elif len(expected) != len(verifier.input_sets):
        raise InputDataError(f"--load-outputs {load_outputs_path} has {len(expected)} iterations for {len(verifier.input_sets)} input sets; "
                             "give the inputs they were computed from with --load-inputs")
    if "--save-outputs" in targets:
        save_outputs(targets["--save-outputs"], expected)
    if "--save-inputs" in targets:
        save_inputs(targets["--save-inputs"], verifier.feeds)
    for warning in verifier.warnings:
        click.echo(f"warning: {warning}", err=True)
    tol = verifier.tolerance
    try:
        verdict, _ = verifier.check(tuple(expected), candidate_model, None if load_outputs_path else reference_model)
    except Exception as err:  # the reference ran on these inputs and the candidate does not: a difference
        click.echo(f"NOT equivalent: {verifier.backend} cannot run {candidate or reference}: {type(err).__name__}: {_one_line(err)}")
        sys.exit(EXIT_NOT_EQUIVALENT)
    graph_outputs = {o.name for o in candidate_model.graph.output}
    for output in verdict.outputs:  # judged layer-wise: the graph outputs, and any region that failed
        if verdict.layerwise is None or output.name in graph_outputs or not output.passed:
            click.echo(f"{'PASS' if output.passed else 'FAIL'}  {output.describe()}")
    if verdict.layerwise is not None:
        click.echo(verdict.layerwise.describe())
    sets = f"{len(verifier.input_sets)} input set{'s' if len(verifier.input_sets) > 1 else ''}"
    if not verdict.passed:
        click.echo(f"NOT equivalent on {verdict.backend} over {sets} (atol={tol.atol:g}, rtol={tol.rtol:g}); worst: {verdict.worst.describe()}")
        sys.exit(EXIT_NOT_EQUIVALENT)
    click.echo(f"equivalent on {verdict.backend} over {sets} (atol={tol.atol:g}, rtol={tol.rtol:g}); worst: {verdict.worst.describe()}")


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."
