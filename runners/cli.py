"""The `popcast` command: thin subcommands that parse flags and hand over to pipelines/ and model/.

Flags a subcommand does not know are Beam pipeline options and pass through to the pipeline.
"""
from __future__ import annotations

import argparse
import difflib
import gc
import json
import os
import sys
import warnings

__all__ = ["COMMANDS", "main"]

# Weights come from installed packages or configured directories; set before transformers is imported
# (set HF_HUB_OFFLINE=0 yourself to let hub ids download).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", os.environ["HF_HUB_OFFLINE"])
os.environ.setdefault("NO_GCE_CHECK", "true")
# Progress goes to popcast's log lines; model loaders' progress bars would interleave with them.
os.environ.setdefault("TQDM_DISABLE", "1")
# google-api-core and google-auth warn at import that grpcio < 1.83 lacks post-quantum TLS. Beam 2.70 pins
# grpcio < 1.66 on Python 3.11, so a user can do nothing about it; it would open every command's output.
warnings.filterwarnings("ignore", message=r".*Post-Quantum Cryptography", category=FutureWarning)


def _validate(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="popcast validate",
                                     description="Check a catalog against the contract and summarise it.")
    parser.add_argument("--catalog", required=True, help="Parquet file/dir/glob, CSV or JSON Lines; local or gs://")
    args = parser.parse_args(argv)
    from pipelines.catalog import CatalogError, read_catalog, static_conflicts, summarize
    try:
        table = read_catalog(args.catalog)
    except CatalogError as err:
        print(str(err), file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError, OSError) as err:
        print(f"cannot read catalog {args.catalog}: {err}", file=sys.stderr)
        return 1
    conflicts = static_conflicts(table)
    for problem in conflicts[:20]:
        print(f"warning: {problem}", file=sys.stderr)
    if len(conflicts) > 20:
        print(f"warning: ... and {len(conflicts) - 20} more videos whose observations disagree on a static field "
              "(their earliest observation is used)", file=sys.stderr)
    print(f"valid catalog {args.catalog}")
    print(json.dumps(summarize(table), indent=2, ensure_ascii=False))
    return 0


def _sample(argv: list[str]) -> int:
    from pipelines.job import StrictArgumentParser, check_output_dir, configure_logging, non_negative_int, positive_int
    from pipelines.sample_catalog import generate_sample
    parser = StrictArgumentParser(prog="popcast sample",
                                  description="Write N real MP4 sample videos and a catalog pointing at them "
                                              "(counts follow a documented synthetic rule).")
    parser.add_argument("--output", required=True, help="output directory")
    parser.add_argument("--videos", type=positive_int, default=12, help="number of videos")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="random seed (same seed, same catalog)")
    args = parser.parse_args(argv)
    check_output_dir(parser, "--output", args.output)
    configure_logging()   # progress of the renders, every few seconds
    table = generate_sample(args.output, args.videos, seed=args.seed)
    print(f"wrote {table.num_rows} videos and {os.path.join(args.output, 'catalog.parquet')}")
    return 0


def _migrate_features(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="popcast migrate-features",
                                     description="Rewrite the files of a features directory written before sorted "
                                                 "storage, sorted by video_id (score reads them faster). Idempotent.")
    parser.add_argument("--features", required=True, help="features directory (local or gs://)")
    args = parser.parse_args(argv)
    from featurizers.core.feature_table import sort_feature_files
    rewritten = sort_feature_files(args.features)
    print(f"rewrote {sum(rewritten.values())} files ({', '.join(f'{m} {n}' for m, n in rewritten.items()) or 'none'})"
          f" under {args.features}")
    return 0


def _pipeline(module: str, entry_name: str = "main"):
    def run(argv: list[str]) -> int:
        import importlib
        try:
            entry = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise
            print(f"this subcommand is not available yet: {module} is not built", file=sys.stderr)
            return 2
        result = getattr(entry, entry_name)(argv)
        return result if isinstance(result, int) else 0
    return run


COMMANDS = {
    "validate": (_validate, "check a catalog against the contract"),
    "sample": (_sample, "write sample MP4 videos and their catalog"),
    "featurize": (_pipeline("pipelines.featurize"), "Beam: decode and embed videos into Parquet features"),
    "train": (_pipeline("runners.model_commands", "train_main"), "train the fusion model on stored features"),
    "evaluate": (_pipeline("runners.model_commands", "evaluate_main"), "write the HTML evaluation report"),
    "score": (_pipeline("pipelines.score"), "Beam: attach predictions to a catalog, one partition per date"),
    "migrate-features": (_migrate_features, "sort an old features directory by video_id (faster scoring)"),
    "demo": (_pipeline("runners.demo"), "sample -> featurize -> train -> evaluate -> score"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: popcast COMMAND [flags]   (popcast COMMAND --help for each)\n\ncommands:")
        for name, (_, doc) in COMMANDS.items():
            print(f"  {name:<10} {doc}")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        close = difflib.get_close_matches(command, list(COMMANDS), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        print(f"popcast: unknown command {command!r}; {hint}run `popcast --help`", file=sys.stderr)
        return 2
    try:
        return COMMANDS[command][0](rest) or 0
    except (ValueError, FileNotFoundError, PermissionError, NotADirectoryError, IsADirectoryError) as err:
        # A user error (a bad catalog, path or value) is one line naming it; --debug / POPCAST_DEBUG=1 show
        # the traceback. Anything else is a bug and keeps its traceback.
        from pipelines.job import debugging, user_message
        if debugging(rest):
            raise
        print(f"popcast {command}: error: {user_message(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"popcast {command}: interrupted", file=sys.stderr)
        return 130
    finally:
        # An error leaves Arrow readers in reference cycles (exception -> traceback -> frames); freed only at
        # interpreter teardown, after Arrow's thread pools, they abort the process ("terminate called without
        # an active exception", exit 134) after the error line (apache/arrow#34314). Free them while Arrow lives.
        gc.collect()


if __name__ == "__main__":
    sys.exit(main())
