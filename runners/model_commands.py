"""`popcast train` and `popcast evaluate`: argument parsing in front of model/ (runners/cli.py dispatches here)."""
from __future__ import annotations

import argparse
import inspect
import json
import logging

from pipelines.featurize import modality_list
from pipelines.job import (
    StrictArgumentParser,
    check_input_path,
    check_output_dir,
    device_name,
    non_negative_int,
    open_fraction,
)

__all__ = ["train_parser", "train_main", "evaluate_parser", "evaluate_main"]


def train_parser() -> argparse.ArgumentParser:
    # The defaults are model.train's own (train() and TrainingConfig), so that the CLI cannot drift from them.
    from model.train import TrainingConfig, train
    defaults = {name: param.default for name, param in inspect.signature(train).parameters.items()}
    training = TrainingConfig()
    p = StrictArgumentParser(prog="popcast train", description="Train the fusion model on stored features.")
    p.add_argument("--catalog", required=True, help="catalog (Parquet/CSV/JSONL, local or gs://)")
    p.add_argument("--features", required=True, help="features directory (DIR/<modality>/*.parquet)")
    p.add_argument("--output", required=True, help="MODEL_DIR to write")
    p.add_argument("--split-quantile", type=open_fraction, default=defaults["split_quantile"],
                   help="rows with publish_time ≥ this quantile are the test set")
    p.add_argument("--seed", type=non_negative_int, default=defaults["seed"],
                   help="random seed (runs are deterministic per seed)")
    p.add_argument("--init-from", default=defaults["init_from"], help="warm-start from an earlier MODEL_DIR")
    p.add_argument("--freeze", default="", help="comma-separated branches to freeze with --init-from "
                                                "(modality names, trunk, head)")
    p.add_argument("--device", default=defaults["device"], type=device_name,
                   help="cpu, cuda or cuda:N (bf16 autocast on CUDA)")
    p.add_argument("--epochs", type=non_negative_int, default=training.epochs,
                   help="maximum epochs per ensemble member (0: the default)")
    p.add_argument("--ensemble", type=non_negative_int, default=training.ensemble_size,
                   help="number of ensemble members (0: the default)")
    p.add_argument("--modalities", default=None, type=modality_list,
                   help="comma-separated subset of modalities to use (default: every modality with features "
                        "under --features)")
    p.add_argument("--young-age-growth", default=training.young_age_growth, type=_young_age_growth,
                   help="how counts of videos younger than every training video grow with age: off (flat: "
                        "predicted at the youngest trained age), prior (log-linear growth in the first week, "
                        "exponents from the catalog's own young observation pairs, else measured on a real "
                        "observation log; for catalogs that sample videos whatever their counts, not for "
                        "trending lists), or views=B,likes=B,comments=B,shares=B (default: %(default)s)")
    return p


def _young_age_growth(text: str):
    from model.young_age import parse_young_age_growth
    try:
        return parse_young_age_growth(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def train_main(argv: list[str] | None = None) -> dict:
    from model.train import TrainingConfig, train
    from pipelines.catalog import read_catalog
    parser = train_parser()
    args = parser.parse_args(argv)
    check_input_path(parser, "--catalog", args.catalog)
    check_input_path(parser, "--features", args.features)
    if args.init_from:
        check_input_path(parser, "--init-from", args.init_from)
    check_output_dir(parser, "--output", args.output)
    # force: importing Beam logs a warning through the root logger, which would otherwise have configured it
    # at WARNING already and hidden training's progress lines (and bench.train's epoch timings).
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", force=True)
    # 0 has always meant "the default" here, not "no training".
    overrides = {"epochs": args.epochs, "ensemble_size": args.ensemble}
    training = TrainingConfig(**{k: v for k, v in overrides.items() if v}, young_age_growth=args.young_age_growth)
    result = train(read_catalog(args.catalog), args.features, args.output, split_quantile=args.split_quantile,
                   seed=args.seed, init_from=args.init_from, freeze=tuple(x for x in args.freeze.split(",") if x),
                   device=args.device, training=training,
                   modalities=args.modalities)
    print(json.dumps({"model_version": result["model_version"], "test": {
        k: {t: v[t]["mae_log1p"] for t in ("views", "likes", "comments", "shares")}
        for k, v in result["test"].items() if isinstance(v, dict) and "views" in v}}))
    return result


def evaluate_parser() -> argparse.ArgumentParser:
    p = StrictArgumentParser(prog="popcast evaluate", description="HTML evaluation report of a trained model.")
    p.add_argument("--catalog", required=True, help="the catalog the model was trained on")
    p.add_argument("--features", required=True, help="features directory")
    p.add_argument("--model", required=True, help="MODEL_DIR")
    p.add_argument("--output", required=True, help="REPORT_DIR (index.html + metrics.json)")
    return p


def evaluate_main(argv: list[str] | None = None) -> dict:
    from model.report import evaluate
    from pipelines.catalog import read_catalog
    parser = evaluate_parser()
    args = parser.parse_args(argv)
    for flag, path in (("--catalog", args.catalog), ("--features", args.features), ("--model", args.model)):
        check_input_path(parser, flag, path)
    check_output_dir(parser, "--output", args.output)
    report = evaluate(read_catalog(args.catalog), args.features, args.model, args.output)
    print(f"wrote {args.output}/index.html")
    return report
