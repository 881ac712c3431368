"""What every popcast Beam job shares: run ids, the --profile/--run-id/--device flags, running the Beam
graph on the chosen runner, the run summary (error counts, rows unaccounted for) and the exit codes.

featurize.py and score.py are written on this scaffold, so both jobs behave the same way for a user.
"""
from __future__ import annotations

import argparse
import difflib
import functools
import importlib.metadata
import logging
import os
import sys
import uuid
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import date, datetime, timezone
from typing import Callable

import apache_beam as beam
import pyarrow as pa
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions, _BeamArgumentParser
from apache_beam.portability.api import beam_provision_api_pb2
from apache_beam.runners.portability.fn_api_runner import fn_runner
from apache_beam.runners.portability.portable_runner import JobServiceHandle
from apache_beam.runners.runner import PipelineRunner
from apache_beam.version import __version__ as beam_version

from featurizers.core import storage
from featurizers.core.storage import join
from pipelines import publish
from pipelines.catalog import CatalogError
from pipelines.profiles import PROFILES, expand
from pipelines.transforms import popcast_counters

__all__ = ["EXIT_OK", "EXIT_BAD_INPUT", "EXIT_USAGE", "EXIT_ROWS_UNACCOUNTED", "EXIT_TOO_MANY_ERRORS",
           "DEFAULT_MAX_ERROR_FRACTION", "StrictArgumentParser", "JobArgumentParser", "beam_option_names",
           "positive_int", "non_negative_int", "positive_float", "non_negative_float", "fraction", "open_fraction",
           "iso_date", "utc_instant", "device_name", "check_input_path", "check_output_dir", "debugging",
           "user_message", "JobSummary", "add_job_arguments", "new_run_id", "resolve_device", "RunPlaces",
           "RunRecord", "start_run", "TABLE_STATE_SUFFIX", "run_beam", "direct_runner_without_prism",
           "errors_by_reason", "finish", "job_main", "add_media_root_argument"]

# Exit codes of `popcast featurize` and `popcast score` (documented in the README).
EXIT_OK = 0
EXIT_BAD_INPUT = 1          # the catalog, a path or a value is wrong: the message says which
EXIT_USAGE = 2              # argparse's code for a bad command line
EXIT_ROWS_UNACCOUNTED = 3   # some input rows ended neither in the output nor as dead letters
EXIT_TOO_MANY_ERRORS = 4    # more than --max-error-fraction of the rows ended as dead letters (the rest published)
# Default of --max-error-fraction: a nightly run where more than 1 row in 20 fails is worth a page, not a
# silent success; a few broken videos in a large catalog are not.
DEFAULT_MAX_ERROR_FRACTION = 0.05

# Errors a user can fix; anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (CatalogError, ValueError, FileNotFoundError, PermissionError)
DEBUG_ENV = "POPCAST_DEBUG"   # =1: user errors show their traceback too

BEAM_OPTIONS_EPILOG = ("Flags not listed here are Beam pipeline options and pass through to the runner "
                       "(--runner, --direct_running_mode, --direct_num_workers, --temp_location, ...); a flag "
                       "that is neither is refused. --profile NAME expands to a runner profile first; explicit "
                       "Beam flags win.")


class StrictArgumentParser(argparse.ArgumentParser):
    """popcast's argument parser: no abbreviated flags (a typo must not silently become another flag),
    defaults shown in --help, and a usage error is one line naming the flag (exit EXIT_USAGE)."""

    def __init__(self, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(allow_abbrev=False, **kwargs)

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class JobArgumentParser(StrictArgumentParser):
    """The argument parser of a Beam job: popcast's flags, and Beam options passing through."""

    def __init__(self, **kwargs):
        super().__init__(epilog=BEAM_OPTIONS_EPILOG, **kwargs)

    def parse_job_args(self, argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
        """(popcast's flags, Beam's flags); anything that is neither ends the command with a usage error."""
        args, rest = self.parse_known_args(argv)
        known = beam_option_names()
        for arg in rest:
            if not arg.startswith("-"):
                continue   # a value of the Beam flag before it
            name = arg.split("=", 1)[0]
            if name not in known:
                ours = [o for action in self._actions for o in action.option_strings if o.startswith("--")]
                close = difflib.get_close_matches(name, ours + sorted(known), n=1, cutoff=0.6)
                hint = f"; did you mean {close[0]}?" if close else " (see --help)"
                self.error(f"unknown flag {name}: neither a popcast flag nor a Beam pipeline option{hint}")
        return args, rest


@functools.lru_cache(maxsize=1)
def beam_option_names() -> frozenset[str]:
    """Every flag some Beam PipelineOptions class defines (--runner, --temp_location, ...)."""
    parser = _BeamArgumentParser(allow_abbrev=False)
    pending = list(PipelineOptions.__subclasses__())
    seen: set[type] = set()
    while pending:
        cls = pending.pop()
        if cls in seen:
            continue
        seen.add(cls)
        pending += cls.__subclasses__()
        try:
            cls._add_argparse_args(parser)
        except argparse.ArgumentError:   # a flag two option classes both define
            continue
    return frozenset(o for action in parser._actions for o in action.option_strings)


def add_job_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags every Beam job takes, besides the Beam pipeline options that pass through."""
    parser.add_argument("--device", default="cpu", type=device_name,
                        help="cpu, cuda, cuda:N or auto (cuda when available on the driver)")
    parser.add_argument("--profile", default=None, choices=list(PROFILES),
                        help="runner profile (none given: direct, the in-process DirectRunner)")
    parser.add_argument("--run-id", default=None, type=run_id_text, help="run id (default: UTC time + random suffix)")
    parser.add_argument("--max-error-fraction", type=fraction, default=DEFAULT_MAX_ERROR_FRACTION, metavar="F",
                        help="when more than this fraction of the rows worked on end as dead letters, the run still "
                             f"publishes what succeeded and prints its summary, then exits {EXIT_TOO_MANY_ERRORS}")
    parser.add_argument("--debug", action="store_true",
                        help=f"show the traceback of a user error too (or set {DEBUG_ENV}=1)")


def add_media_root_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--media-root", action="append", default=[], metavar="PREFIX",
                        help="repeatable; when given, a video_uri outside every PREFIX (local dir or "
                             "gs://bucket/prefix, after resolving .. and symlinks) becomes a dead letter "
                             "read:outside_media_root instead of a read: for catalogs from upstream systems")


# ---------------------------------------------------------------- argparse types: a bad value is a usage error
def positive_int(text: str) -> int:
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def positive_float(text: str) -> float:
    value = _number(text, float)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = _number(text, float)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number of 0 or more, got {text}")
    return value


def fraction(text: str) -> float:
    value = _number(text, float)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def open_fraction(text: str) -> float:
    value = _number(text, float)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be strictly between 0 and 1, got {text}")
    return value


def iso_date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a date as YYYY-MM-DD, got {text!r}") from None


def utc_instant(text: str) -> datetime:
    """ISO date or date-time; naive values are UTC."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an ISO date or date-time (2025-03-15T10:00), got {text!r}") \
            from None
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def device_name(text: str) -> str:
    if text in ("cpu", "cuda", "auto") or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"must be cpu, cuda, cuda:N or auto, got {text!r}")


def run_id_text(text: str) -> str:
    if not text or not all(c.isalnum() or c in "-_." for c in text) or text.startswith("."):
        raise argparse.ArgumentTypeError(f"letters, digits, '-', '_' and '.' only (it names files), got {text!r}")
    return text


def _number(text: str, kind: type):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {'a whole number' if kind is int else 'a number'}, "
                                         f"got {text!r}") from None


def check_input_path(parser: argparse.ArgumentParser, flag: str, uri: str) -> None:
    """A local input that does not exist, or an object store that cannot be reached (no credentials, no
    endpoint), is a usage error naming the flag, within seconds."""
    problem = storage.unreachable(uri)
    if problem:
        parser.error(f"{flag}: {problem}")
    if storage.scheme_of(uri) in ("", "file") and not any(c in uri for c in "*?["):
        if not os.path.exists(storage.local_path(uri)):
            parser.error(f"{flag} {uri}: no such file or directory")


def check_output_dir(parser: argparse.ArgumentParser, flag: str, uri: str) -> None:
    """A local output directory must be creatable and writable before any work starts; an object store
    must be reachable."""
    problem = storage.unreachable(uri)
    if problem:
        parser.error(f"{flag}: {problem}")
    if storage.scheme_of(uri) not in ("", "file"):
        return
    path = storage.local_path(uri)
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".popcast-write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as err:
        parser.error(f"{flag} {uri}: cannot write there ({err.strerror or err})")


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]


def resolve_device(device: str) -> str:
    """"auto" becomes cuda or cpu by what the driver sees; other names pass as given (a CPU driver may
    submit a job for GPU workers)."""
    if device != "auto":
        return device
    from featurizers.visual import resolve_device as torch_device   # torch only when asked to look
    return str(torch_device("auto"))


# A scored table's root holds only the table; a score run keeps its work and records beside it.
TABLE_STATE_SUFFIX = ".popcast"
# A staging folder nothing wrote to for this long belongs to a run that crashed; the next run removes it.
STALE_STAGING_HOURS = 12.0


@dataclass(frozen=True)
class RunPlaces:
    """Where a run stages its work, records itself and leaves its dead letters."""
    staging_root: str
    runs: str
    errors: str

    @classmethod
    def inside(cls, output: str) -> "RunPlaces":
        """featurize: DIR/_staging, DIR/_runs, DIR/_errors (readers of DIR/<modality>/ never look there)."""
        return cls(join(output, "_staging"), join(output, "_runs"), join(output, "_errors"))

    @classmethod
    def beside_table(cls, table: str) -> "RunPlaces":
        """score: TABLE.popcast/{staging,runs,errors}, so TABLE holds only dt= partitions and any reader
        (polars, DuckDB, pyarrow) opens it as it is."""
        state = table.rstrip("/") + TABLE_STATE_SUFFIX
        return cls(join(state, "staging"), join(state, "runs"), join(state, "errors"))

    def staging(self, run_id: str) -> str:
        return join(self.staging_root, run_id)


@dataclass
class RunRecord:
    """What the run record (RUNS/<run_id>.json) holds besides the summary."""
    command: list[str]
    runner: str
    inputs: dict[str, str | None]
    outputs: dict[str, str]
    started_at: str
    versions: dict[str, str]


def start_run(job: str, argv: list[str] | None, profile: str | None, beam_args: list[str], places: RunPlaces,
              inputs: dict[str, str | None], outputs: dict[str, str]) -> RunRecord:
    """Note what the run is and where it reads and writes, and remove crashed runs' staging folders."""
    publish.remove_stale_staging(places.staging_root, STALE_STAGING_HOURS)
    options = expand(profile, beam_args)
    flags = dict(a.lstrip("-").split("=", 1) for a in options if a.startswith("--") and "=" in a)
    runner = flags.get("runner", "DirectRunner")
    if runner == "DirectRunner":
        runner += f" ({flags.get('direct_running_mode', 'in_memory')})"
    return RunRecord(command=["popcast", job, *(sys.argv[1:] if argv is None else argv)], runner=runner,
                     inputs=inputs, outputs={**outputs, "runs": places.runs, "errors": places.errors},
                     started_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                     versions={"popcast": _version("popcast"), "apache-beam": beam_version,
                               "python": sys.version.split()[0]})


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


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
    """The fields every job's run summary has; each job adds its own and its `lines()`.

    rows_worked: the rows the job tried (featurize: those needing work); rows_dead_lettered: distinct
    video_ids among them that ended as dead letters.
    """
    run_id: str
    rows_in: int
    errors_by_reason: dict[str, int]
    rows_unaccounted: int
    seconds: float
    rows_worked: int
    rows_dead_lettered: int
    max_error_fraction: float

    def lines(self) -> list[str]:
        raise NotImplementedError

    def exit_code(self) -> int:
        if self.rows_unaccounted:
            return EXIT_ROWS_UNACCOUNTED
        if self.rows_dead_lettered > self.max_error_fraction * self.rows_worked:
            return EXIT_TOO_MANY_ERRORS
        return EXIT_OK

    def verdict_lines(self) -> list[str]:
        """What the exit code means, when it is not 0."""
        if self.exit_code() == EXIT_TOO_MANY_ERRORS:
            return [f"  too many errors: {self.rows_dead_lettered} of {self.rows_worked} rows are dead letters "
                    f"(--max-error-fraction {self.max_error_fraction:g}); what succeeded is published; "
                    f"exit {EXIT_TOO_MANY_ERRORS}"]
        if self.exit_code() == EXIT_ROWS_UNACCOUNTED:
            return [f"  {self.rows_unaccounted} rows are unaccounted for; exit {EXIT_ROWS_UNACCOUNTED}"]
        return []

    def error_line(self) -> str:
        errors = ", ".join(f"{r} {n}" for r, n in sorted(self.errors_by_reason.items())) or "none"
        return f"  errors by reason: {errors}"


def finish(summary: JobSummary, record: RunRecord, places: RunPlaces) -> None:
    """Record the run (RUNS/<run_id>.json: the summary, command line, runner, versions, times, inputs and
    outputs), drop its staging folder and print the summary."""
    publish.write_run_summary(places.runs, summary.run_id, {
        **asdict(summary), **asdict(record), "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    publish.remove_staging(places.staging(summary.run_id))
    for line in summary.lines():
        print(line)


def job_main(run: Callable[[list[str] | None], JobSummary], argv: list[str] | None = None) -> int:
    """Run a job as a command: a user error is one line on stderr and EXIT_BAD_INPUT, never a traceback
    (unless --debug or POPCAST_DEBUG=1)."""
    configure_logging(debugging(argv))
    try:
        summary = run(argv)
    except USER_ERRORS as err:
        if debugging(argv):
            raise
        print(f"error: {user_message(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return summary.exit_code()


def configure_logging(debug: bool = False) -> None:
    """popcast's own progress at INFO; Beam's INFO chatter (type-hint conversions, worker handlers, ...) only
    with --debug: it made up 170 of 184 log lines of a small score run."""
    # force: importing Beam logs a warning through the root logger, which configures it at WARNING first.
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", force=True)
    if not debug:
        for noisy in ("apache_beam", "root.apache_beam"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


def debugging(argv: list[str] | None) -> bool:
    return "--debug" in (sys.argv[1:] if argv is None else argv) or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def user_message(err: BaseException) -> str:
    """One line for a user error: the message, or the class and the file for errors that lack one."""
    if isinstance(err, (FileNotFoundError, PermissionError)) and err.filename:
        return f"{err.strerror or type(err).__name__}: {err.filename}"
    text = str(err).strip() or type(err).__name__
    return text if isinstance(err, CatalogError) else " ".join(text.split())
