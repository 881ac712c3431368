"""What every popcast Beam job shares: run ids, the --profile/--run-id/--device flags, running the Beam
graph on the chosen runner, the run summary (error counts, rows unaccounted for) and the exit codes.

featurize.py and score.py are written on this scaffold, so both jobs behave the same way for a user.
"""
from __future__ import annotations

import argparse
import logging
import sys
import uuid
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Callable

import apache_beam as beam
import pyarrow as pa
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.portability.api import beam_provision_api_pb2
from apache_beam.runners.portability.fn_api_runner import fn_runner
from apache_beam.runners.portability.portable_runner import JobServiceHandle
from apache_beam.runners.runner import PipelineRunner

from featurizers.core.storage import join
from featurizers.visual import resolve_device as torch_device
from pipelines import publish
from pipelines.catalog import CatalogError
from pipelines.profiles import PROFILES, expand
from pipelines.transforms import popcast_counters

__all__ = ["EXIT_OK", "EXIT_BAD_INPUT", "EXIT_USAGE", "EXIT_ROWS_UNACCOUNTED", "JobSummary", "add_job_arguments",
           "new_run_id", "resolve_device", "staging_dir", "run_beam", "direct_runner_without_prism",
           "errors_by_reason", "finish", "job_main"]

# Exit codes of `popcast featurize` and `popcast score` (documented in the README).
EXIT_OK = 0
EXIT_BAD_INPUT = 1          # the catalog, a path or a value is wrong: the message says which
EXIT_USAGE = 2              # argparse's code for a bad command line
EXIT_ROWS_UNACCOUNTED = 3   # some input rows ended neither in the output nor as dead letters

# Errors a user can fix; anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (CatalogError, ValueError, FileNotFoundError)


def add_job_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags every Beam job takes, besides the Beam pipeline options that pass through."""
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (cuda when available on the driver)")
    parser.add_argument("--profile", default=None,
                        help=f"runner profile: {', '.join(PROFILES)} (default direct; Beam flags given "
                             "explicitly win)")
    parser.add_argument("--run-id", default=None, help="run id (default: UTC time + random suffix)")


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]


def resolve_device(device: str) -> str:
    """"auto" becomes cuda or cpu by what the driver sees; other names pass as given (a CPU driver may
    submit a job for GPU workers)."""
    if device != "auto":
        return device
    return str(torch_device("auto"))


def staging_dir(output: str, run_id: str) -> str:
    """Where a run writes before it publishes: OUTPUT/_staging/<run_id>/."""
    return join(output, "_staging", run_id)


def run_beam(build: Callable[[beam.Pipeline], None], profile: str | None, beam_args: list[str],
             test_pipeline: beam.Pipeline | None = None) -> dict[str, int]:
    """Build the graph with `build(pipeline)`, run it to the end on the profile's runner and return the
    popcast counters. `test_pipeline` replaces the pipeline in tests."""
    if test_pipeline is None:
        options = PipelineOptions(expand(profile, beam_args))
        test_pipeline = beam.Pipeline(runner=direct_runner_without_prism(options), options=options)
    pipeline = test_pipeline
    build(pipeline)
    result = pipeline.run()
    result.wait_until_finish()
    return popcast_counters(result)


def direct_runner_without_prism(options: PipelineOptions) -> PipelineRunner | None:
    """For --runner=DirectRunner (or none), the DirectRunner's in-process engine itself (FnApiRunner, which
    honours --direct_running_mode and --direct_num_workers); None for any other runner.

    Beam's DirectRunner first tries the Prism runner, downloading its binary from GitHub: offline that
    fails and falls back, online the job would silently run on another runner. popcast never does either.
    """
    runner = options.view_as(StandardOptions).runner
    if runner not in (None, "DirectRunner", "direct", "SwitchingDirectRunner"):
        return None
    encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
    return fn_runner.FnApiRunner(provision_info=fn_runner.ExtendedProvisionInfo(
        beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded)))


def errors_by_reason(errors: pa.Table) -> dict[str, int]:
    """Dead letters counted by "stage:error_class"."""
    return dict(Counter(f"{s}:{c}" for s, c in zip(errors.column("stage").to_pylist(),
                                                    errors.column("error_class").to_pylist())))


@dataclass
class JobSummary:
    """The fields every job's run summary has; each job adds its own and its `lines()`."""
    run_id: str
    rows_in: int
    errors_by_reason: dict[str, int]
    rows_unaccounted: int
    seconds: float

    def lines(self) -> list[str]:
        raise NotImplementedError

    def exit_code(self) -> int:
        return EXIT_OK if self.rows_unaccounted == 0 else EXIT_ROWS_UNACCOUNTED

    def error_line(self) -> str:
        errors = ", ".join(f"{r} {n}" for r, n in sorted(self.errors_by_reason.items())) or "none"
        return f"  errors by reason: {errors}"


def finish(summary: JobSummary, output: str, staging: str) -> None:
    """Record the run (OUTPUT/_runs/<run_id>.json), drop its staging folder and print the summary."""
    publish.write_run_summary(output, summary.run_id, asdict(summary))
    publish.remove_staging(staging)
    for line in summary.lines():
        print(line)


def job_main(run: Callable[[list[str] | None], JobSummary], argv: list[str] | None = None) -> int:
    """Run a job as a command: a user error is one line on stderr and EXIT_BAD_INPUT, never a traceback."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        summary = run(argv)
    except USER_ERRORS as err:
        print(str(err), file=sys.stderr)
        return EXIT_BAD_INPUT
    return summary.exit_code()
