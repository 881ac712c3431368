"""Training: catalog labels + stored features → an ensemble of fusion networks, its test predictions,
and metrics beside the baselines fitted on the same time-ordered split.

Entry point: `train(catalog, features_dir, output_dir, ...)`; deterministic per seed on a given machine.

Memory is bounded whatever the number of rows: feature vectors are streamed from Parquet into disk-backed
matrices in a temporary directory (removed at the end; TMPDIR chooses where), model inputs are built from
them chunk by chunk, and every minibatch, validation pass and test prediction reads its rows back with
explicit reads (model.data.StoredInputs). The results are those of building every tensor in memory.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import tempfile
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from featurizers.core import storage
from featurizers.core.contracts import TARGETS, UTC_TIMESTAMP
from model import baselines
from model.artifact import (
    FORMAT,
    LoadedModel,
    autocast,
    build_networks,
    json_default,
    load_model,
    model_version,
    quantiles_to_counts,
    save_model,
)
from model.data import (
    DEFAULT_VALIDATION_FRACTION,
    Batch,
    ModalityLayout,
    ModelDataError,
    Split,
    StoredFeatures,
    StoredInputs,
    build_inputs,
    catalog_arrays,
    check_featurizers,
    fit_stored_layout,
    log_age,
    observed_arrays,
    stream_features,
    training_fingerprint,
)
from model.blend import blend_matrix, fit_tree_blend
from model.calibration import interval_offsets
from model.metrics import all_target_metrics, mean_mae
from model.samples import (NOWCAST_MIN_GAP_DAYS, Samples, observation_samples, split_samples,
                           video_balanced_weights)
from model.network import QUANTILES, NetworkConfig, PopularityNet, pinball_loss
from model.young_age import (DEFAULT_EXPONENT_RANGE, DEFAULT_EXPONENTS, EXPONENT_RANGE_LEVELS, GROWTH_DAYS,
                              fit_growth_exponents)

__all__ = ["TrainingConfig", "train"]

log = logging.getLogger("popcast.train")


@dataclass
class TrainingConfig:
    """Optimisation settings (JSON-able, stored in config.json)."""
    epochs: int = 60
    batch_size: int = 128
    learning_rate: float = 2e-3
    weight_decay: float = 1e-3
    warmup_epochs: int = 2
    patience: int = 10
    ensemble_size: int = 5
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION
    refit_full_train: bool = True     # after early stopping, retrain on train+validation for the best epochs
    blend_trees: bool = True          # mix LightGBM into the median, weights picked on validation (model.blend)
    balance_videos: bool = True       # each video's (earlier → later) pairs weigh 1 in all (video_balanced_weights)
    # Of each video's weight, the share on its first-to-last pair (video_balanced_weights): the longest growth
    # a video shows, the one a night's scoring asks for (its latest count to a horizon) and the one evaluated.
    first_to_last_share: float = 0.5
    # Rows younger than the trained ages (model.young_age): "off" (flat, as the network's age clamp), "prior"
    # (exponents from the catalog's own young pairs, else the shipped prior), or {target: exponent}.
    young_age_growth: str | dict = "off"


@contextmanager
def deterministic(seed: int, threads: int | None):
    """Seeded, deterministic torch for the duration of a run; restores global settings afterwards."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")   # needed by deterministic CUDA GEMMs
    torch.use_deterministic_algorithms(True, warn_only=True)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0])
        torch.set_num_threads(previous[1])


def _lr_factor(epoch: int, step: int, steps: int, total_epochs: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 5% over the planned epochs."""
    progress = (epoch + step / max(steps, 1))
    if progress < warmup:
        return (progress + 1e-3) / warmup
    t = min(1.0, (progress - warmup) / max(total_epochs - warmup, 1))
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t))


def _evaluate_loss(net: PopularityNet, batch: Batch | StoredInputs, device: str, bs: int = 4096,
                   groups: np.ndarray | None = None, weights: np.ndarray | None = None) -> tuple[float, float]:
    """(pinball loss, MAE of the median) on normalised labels over known labels.

    groups (an int per row, e.g. cold start 0 / nowcast pair 1): the MAE is the mean of each group's MAE, so a
    small group with small errors (nowcasts) steers early stopping as much as a large noisy one. weights (a
    float per row, model.samples.video_balanced_weights): weighted means, as training weighs the rows."""
    net.eval()
    total_loss = count = 0.0
    groups = np.zeros(len(batch), dtype=np.int64) if groups is None else np.asarray(groups, dtype=np.int64)
    weights = np.ones(len(batch)) if weights is None else np.asarray(weights, dtype=np.float64)
    abs_sums = np.zeros(int(groups.max(initial=0)) + 1)
    abs_counts = np.zeros_like(abs_sums)
    with torch.inference_mode(), autocast(device):
        for start in range(0, len(batch), bs):
            rows = torch.arange(start, min(start + bs, len(batch)))
            part = batch.index(rows).to(device)
            pred = net(part).float()
            row_weights = weights[start:start + len(rows)]
            row_known = part.label_mask.sum(dim=1).double().cpu().numpy() * row_weights
            known = float(row_known.sum())
            total_loss += pinball_loss(pred, part.labels, part.label_mask,
                                       torch.from_numpy(row_weights).to(device)).item() * known
            err = (pred[..., 1] - part.labels).abs()
            row_abs = (torch.where(part.label_mask, err, torch.zeros_like(err)).sum(dim=1).double().cpu().numpy()
                       * row_weights)
            np.add.at(abs_sums, groups[start:start + len(rows)], row_abs)
            np.add.at(abs_counts, groups[start:start + len(rows)], row_known)
            count += known
    present = abs_counts > 0
    group_mae = abs_sums[present] / abs_counts[present]
    mae = float(np.mean(group_mae)) if present.any() else 0.0
    if len(group_mae) > 1:
        log.info("validation MAE per group (cold start, nowcast): %s", ", ".join(f"{v:.4f}" for v in group_mae))
    return total_loss / max(count, 1), mae


def fit_network(net: PopularityNet, train_batch: Batch | StoredInputs, val_batch: Batch | StoredInputs | None,
                cfg: TrainingConfig, seed: int, device: str, fixed_epochs: int | None = None, tag: str = "",
                val_groups: np.ndarray | None = None, train_weights: np.ndarray | None = None,
                val_weights: np.ndarray | None = None) -> tuple[PopularityNet, list[dict]]:
    """AdamW + warm-up/cosine schedule; early stopping on validation MAE (restores the best epoch).

    The batches are anything with len() and index(rows) → Batch: an in-memory Batch or disk-backed
    StoredInputs (the same minibatches, value for value). With fixed_epochs, trains exactly that many
    epochs without validation (the refit on all training rows). train_weights / val_weights: a weight per
    row of each batch for the loss and the early-stopping MAE (None: every row counts once).
    """
    net.to(device)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    epochs = fixed_epochs or cfg.epochs
    steps = max(1, math.ceil(len(train_batch) / cfg.batch_size))
    best, best_state, history, bad = float("inf"), None, [], 0
    for epoch in range(epochs):
        start_time = time.perf_counter()
        net.train()
        order = torch.randperm(len(train_batch), generator=generator)
        running = 0.0
        for step in range(steps):
            rows = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            if len(rows) < 2:
                continue
            part = train_batch.index(rows).to(device)
            for group in optimizer.param_groups:
                group["lr"] = cfg.learning_rate * _lr_factor(epoch, step, steps, epochs, cfg.warmup_epochs)
            with autocast(device):
                pred = net(part)
            row_weights = None if train_weights is None else torch.from_numpy(train_weights[rows.numpy()]).to(device)
            loss = pinball_loss(pred.float(), part.labels, part.label_mask, row_weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 5.0)
            optimizer.step()
            running += loss.item()
        record = {"epoch": epoch + 1, "train_loss": running / steps}
        if val_batch is not None and fixed_epochs is None:
            record["val_loss"], record["val_mae"] = _evaluate_loss(net, val_batch, device, groups=val_groups,
                                                                   weights=val_weights)
            if record["val_mae"] < best - 1e-5:
                best, bad = record["val_mae"], 0
                best_state = copy.deepcopy(net.state_dict())
                record["best"] = True
            else:
                bad += 1
        history.append(record)
        log.info("%sepoch %d/%d train_loss %.4f%s (%.1fs)", tag, epoch + 1, epochs, record["train_loss"],
                 f" val_loss {record['val_loss']:.4f} val_mae {record['val_mae']:.4f}" if "val_mae" in record else "",
                 time.perf_counter() - start_time)
        if val_batch is not None and fixed_epochs is None and bad >= cfg.patience:
            break
    if best_state is not None:
        net.load_state_dict(best_state)
    net.eval()
    return net, history


def _apply_warm_start(nets: list[PopularityNet], source: LoadedModel, freeze: tuple[str, ...]) -> None:
    """Copy matching weights from an earlier model (member i → member i, else member 0); freeze branches."""
    for i, net in enumerate(nets):
        src = source.networks[min(i, len(source.networks) - 1)].state_dict()
        own = net.state_dict()
        own.update({k: v for k, v in src.items() if k in own and own[k].shape == v.shape})
        net.load_state_dict(own)
        for name in freeze:
            if name in net.encoders:
                for p in net.encoders[name].parameters():
                    p.requires_grad_(False)
            elif name in ("trunk", "head"):
                for module in ((net.trunk, net.film) if name == "trunk" else (net.head, net.age_curve)):
                    for p in module.parameters():
                        p.requires_grad_(False)
            else:
                raise ValueError(f"cannot freeze {name!r}: branches are {list(net.encoders)} + trunk, head")


def train(catalog: pa.Table, features_dir: str, output_dir: str, split_quantile: float = 0.8,
          seed: int = 0, init_from: str | None = None, freeze: tuple[str, ...] | list[str] = (),
          device: str = "cpu", modalities: tuple[str, ...] | None = None,
          network: NetworkConfig | None = None, training: TrainingConfig | None = None,
          threads: int | None = None, baselines_enabled: bool = True, clamp_age: bool = True) -> dict:
    """Train, evaluate on the time-ordered test split and write MODEL_DIR. Returns metrics.json content.

    `catalog` is the conformed catalog table (pipelines.catalog.read_catalog reads one from a path)."""
    started = time.perf_counter()
    training = training or TrainingConfig()
    samples = observation_samples(catalog_arrays(catalog))
    arrays = samples.arrays
    split = split_samples(samples, split_quantile, training.validation_fraction)
    training_pairs = int((~samples.cold[np.concatenate([split.train, split.validation])]).sum())
    nowcast = training_pairs > 0
    if nowcast:
        log.info("observation log: %d (earlier → later) training pairs beside the cold samples", training_pairs)
    with ExitStack() as cleanup:
        workdir = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="popcast-train-"))
        data = _TrainingData.prepare(samples, split, features_dir, modalities, init_from, workdir, nowcast)
        cleanup.callback(data.inputs.close)
        network = _network_config(network, data.source, arrays, data.fit_rows, clamp_age, nowcast)
        config = _model_config(data, network, training, seed=seed, split_quantile=split_quantile,
                               init_from=init_from, freeze=freeze, device=device)
        config["young_age_growth"] = _young_age_growth(samples, data.fit_rows, training.young_age_growth)
        ensemble = _EnsembleFit(config, data, training, device, data.source, tuple(freeze))
        networks, histories, validation_q = ensemble.fit(seed, threads)
        config["model_version"] = model_version(config)
        config["history"] = histories
        validation = _ValidationSample.draw(data, validation_q, seed, training)
        blend = _fit_blend(data, validation, seed, config, training) if training.blend_trees else None
        config["calibration"] = validation.calibration(blend)
        model = LoadedModel(config=config, networks=networks, layouts=data.layouts, device="cpu", blend=blend)

        q = _test_predictions(model, data)
        metrics = _test_metrics(q, data, seed, baselines_enabled)
        nowcasts = None
        if data.nowcast_test.size:
            nowcasts = _nowcast_table(q, data)
            metrics["nowcast"] = nowcast_metrics(data, q[data.nowcast_positions], seed, baselines_enabled,
                                                 training)
        if blend is not None:   # the ablation: the network alone on the same rows
            q_network = _test_predictions(model, data, blend=False)
            metrics["network"] = _cold_metrics(q_network, data)
            if data.nowcast_test.size:
                metrics["nowcast"]["network"] = _quantile_metrics(q_network[data.nowcast_positions],
                                                                  data.arrays["log_labels"][data.nowcast_test])
    config["metrics"] = {"test": metrics, "train_seconds": round(time.perf_counter() - started, 1)}
    result = _metrics_json(config)
    _write_artifact(output_dir, networks, config, _prediction_table(q, data), result, nowcasts, blend)
    _log_summary(result, started)
    return result


def _fit_layouts(split: Split, slots: np.ndarray, features: dict[str, StoredFeatures],
                 source: LoadedModel | None) -> dict[str, ModalityLayout]:
    """Each modality's inputs and normalisation: a warm start keeps its source's (the weights expect them);
    a fresh model fits them on its training rows only (slots: the catalog rows the features were read for)."""
    if source is not None:
        layouts = dict(source.layouts)
        check_featurizers(layouts, features)
    else:
        train_slots = np.searchsorted(slots, split.train)
        layouts = {name: fit_stored_layout(stored, train_slots) for name, stored in features.items()}
    # One canonical (sorted) modality order: config.json is written with sorted keys, and the order of the
    # modality tokens is part of the architecture.
    return {name: layouts[name] for name in sorted(layouts)}


def _network_config(network: NetworkConfig | None, source: LoadedModel | None, arrays: dict[str, np.ndarray],
                    fit_rows: np.ndarray, clamp_age: bool, nowcast: bool = False) -> NetworkConfig:
    """The architecture: a warm start must rebuild its source's, whatever was asked for. fit_rows: the
    train + validation rows (the refit's), whose ages the age input is clamped to.

    The caller's NetworkConfig is completed in place (and returned), as callers may read it afterwards.
    """
    if source is not None:
        network = NetworkConfig(**source.config["network"])
    network = network or NetworkConfig()
    network.n_targets = len(TARGETS)
    if source is None:
        network.nowcast = nowcast
    if source is None and clamp_age:
        network.log_age_min = float(np.min(log_age(arrays["age_days"][fit_rows])))
        network.log_age_max = float(np.max(log_age(arrays["age_days"][fit_rows])))
    return network


def _young_age_growth(samples: Samples, fit_rows: np.ndarray, setting: str | dict) -> dict | None:
    """config["young_age_growth"]: the exponents rows younger than the trained ages grow with, their range
    (the intervals' slow and fast growth; None for given exponents) and where they come from
    (model.young_age: the young pairs among fit_rows, the train + validation rows); None when off."""
    if setting == "off":
        return None
    if isinstance(setting, dict):
        return {"exponents": {t: float(setting[t]) for t in TARGETS}, "exponent_range": None, "source": "given",
                "growth_days": GROWTH_DAYS}
    pairs = fit_rows[~samples.cold[fit_rows]]
    arrays = samples.arrays
    fitted = None
    if len(pairs):
        fit = partial(fit_growth_exponents, arrays["input_age_days"][pairs], arrays["age_days"][pairs],
                      arrays["input_log_labels"][pairs], arrays["log_labels"][pairs],
                      video_balanced_weights(samples, pairs))
        fitted = fit()
    if fitted is not None:
        slow, fast = (fit(level=level) for level in EXPONENT_RANGE_LEVELS)
        return {"exponents": fitted, "exponent_range": {t: [slow[t], fast[t]] for t in TARGETS},
                "source": f"the catalog's training pairs ({len(pairs)})", "growth_days": GROWTH_DAYS}
    return {"exponents": dict(DEFAULT_EXPONENTS),
            "exponent_range": {t: list(DEFAULT_EXPONENT_RANGE[t]) for t in TARGETS},
            "source": "prior (bilibili-popular-2023, model.young_age)", "growth_days": GROWTH_DAYS}


@dataclass
class _TargetNormalisation:
    """Per-target center and scale of log1p labels, fitted on training rows: the network learns unit-scale
    targets, and config.json carries both so that scoring can undo them."""
    center: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, train_labels: np.ndarray) -> "_TargetNormalisation":
        center = np.nan_to_num(np.nanmedian(train_labels, axis=0), nan=0.0)
        scale = np.nan_to_num(np.nanstd(train_labels, axis=0), nan=1.0)
        # A constant target would divide by ~0.
        return cls(center, np.where(scale > 1e-6, scale, 1.0))

    def normalise(self, log_labels: np.ndarray) -> np.ndarray:
        return (log_labels - self.center) / self.scale


@dataclass
class _TrainingData:
    """The catalog arrays, split, fitted layouts and the model inputs of every split row (disk-backed,
    StoredInputs) that every training step reads."""
    samples: Samples
    split: Split
    layouts: dict[str, ModalityLayout]
    targets: _TargetNormalisation
    log_ages: np.ndarray
    slots: np.ndarray             # sorted samples of train + validation + test: the rows of `inputs`
    inputs: StoredInputs
    source: LoadedModel | None = None

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        """Per-sample arrays (model.samples): a single-observation catalog's are its catalog_arrays."""
        return self.samples.arrays

    @property
    def cold_test(self) -> np.ndarray:
        """Test samples without an input observation: the cold-start evaluation (every test catalog row)."""
        return self.split.test[self.samples.cold[self.split.test]]

    @property
    def nowcast_test(self) -> np.ndarray:
        """Test samples predicting a video's latest observation from its earliest (the nowcast evaluation)."""
        return self.split.test[~self.samples.cold[self.split.test]]

    @property
    def cold_positions(self) -> np.ndarray:
        return np.flatnonzero(self.samples.cold[self.split.test])

    @property
    def nowcast_positions(self) -> np.ndarray:
        return np.flatnonzero(~self.samples.cold[self.split.test])

    def cold_split(self) -> Split:
        """The split restricted to cold samples: what the cold-start baselines are fitted and scored on."""
        cold = self.samples.cold
        return Split(self.split.train[cold[self.split.train]], self.split.validation[cold[self.split.validation]],
                     self.cold_test, self.split.cutoff_s, self.split.validation_cutoff_s)

    @classmethod
    def prepare(cls, samples: Samples, split: Split, features_dir: str, modalities: tuple[str, ...] | None,
                init_from: str | None, workdir: str, nowcast: bool = False) -> "_TrainingData":
        """Stream the feature tables of the split samples to `workdir`, fit the layouts, build the inputs."""
        arrays = samples.arrays
        started = time.perf_counter()
        slots = np.sort(np.concatenate([split.train, split.validation, split.test]))
        features = stream_features(features_dir, modalities, arrays["video_id"][slots], workdir)
        try:
            if not features:
                raise ModelDataError(f"no feature tables under {features_dir}")
            log.info("features: %s for %d rows streamed in %.1fs", ", ".join(sorted(features)), len(slots),
                     time.perf_counter() - started)
            source = load_model(init_from) if init_from else None
            layouts = _fit_layouts(split, slots, features, source)
            cold_train = split.train[samples.cold[split.train]]
            targets = _TargetNormalisation.fit(arrays["log_labels"][cold_train])
            log_ages = log_age(arrays["age_days"])
            observed = (observed_arrays(arrays["input_log_labels"][slots], arrays["input_age_days"][slots],
                                        targets.center, targets.scale)
                        if nowcast or (source is not None and source.config["network"].get("nowcast")) else None)
            inputs = build_inputs(layouts, features, log_ages[slots], targets.normalise(arrays["log_labels"][slots]),
                                  workdir, release=True, observed=observed)
        finally:
            for stored in features.values():
                stored.close()
        log.info("inputs: %d rows ready in %.1fs", len(slots), time.perf_counter() - started)
        return cls(samples, split, layouts, targets, log_ages, slots, inputs, source)

    @property
    def fit_rows(self) -> np.ndarray:
        """Train + validation rows, sorted: what the refit trains on and what the fingerprint covers."""
        return np.sort(np.concatenate([self.split.train, self.split.validation]))

    def weights(self, rows: np.ndarray, training: TrainingConfig) -> np.ndarray | None:
        """Training weights of the given sample rows (None: all 1): video_balanced_weights when balancing."""
        return (video_balanced_weights(self.samples, rows, training.first_to_last_share)
                if training.balance_videos else None)

    def batch(self, rows: np.ndarray) -> StoredInputs:
        """Network inputs of the given catalog rows (split rows), with normalised labels: index(i) reads the
        Batch of the i-th of them."""
        return self.inputs.view(np.searchsorted(self.slots, rows))

    def tabular(self, rows: np.ndarray) -> Batch:
        """The given catalog rows' inputs without vectors and sequences (for the tabular baselines)."""
        return self.inputs.tabular(np.searchsorted(self.slots, rows))


def _model_config(data: _TrainingData, network: NetworkConfig, training: TrainingConfig, *, seed: int,
                  split_quantile: float, init_from: str | None, freeze: tuple[str, ...] | list[str],
                  device: str) -> dict:
    """config.json without the results: everything needed to rebuild, reload and identify the model."""
    layouts = data.layouts
    return {
        "format": FORMAT, "network": asdict(network), "training": asdict(training),
        "layouts": {k: v.to_json() for k, v in layouts.items()},
        "featurizers": {k: v.featurizer for k, v in layouts.items()},
        "targets": list(TARGETS), "target_center": data.targets.center.tolist(),
        "target_scale": data.targets.scale.tolist(),
        "quantiles": list(QUANTILES), "ensemble_size": training.ensemble_size, "seed": seed,
        "split": {"quantile": split_quantile, **data.split.to_json()},
        "fingerprint": training_fingerprint(data.arrays, data.fit_rows, [v.featurizer for v in layouts.values()]),
        "init_from": init_from, "freeze": list(freeze), "device": device,
    }


@dataclass
class _EnsembleFit:
    """What every ensemble member is trained from; members differ only by their seed."""
    config: dict
    data: _TrainingData
    training: TrainingConfig
    device: str
    source: LoadedModel | None
    freeze: tuple[str, ...]

    def fit(self, seed: int, threads: int | None) -> tuple[list[PopularityNet], list[dict], np.ndarray]:
        """The trained members (on CPU, eval mode), their training histories, and the validation rows' log1p
        quantiles (N_val, T, 3) of the early-stopping members averaged: predictions by networks that never
        trained on those rows, which the tree blend's weights and the interval calibration are fitted on."""
        train_batch, val_batch = self.data.batch(self.data.split.train), self.data.batch(self.data.split.validation)
        networks, histories = [], []
        validation = np.zeros((len(val_batch), len(TARGETS), 3), dtype=np.float64)
        with deterministic(seed, threads):
            for member in range(self.training.ensemble_size):
                net, history, quantiles = self._fit_member(member, seed * 1000 + member, train_batch, val_batch)
                networks.append(net.to("cpu").eval())
                histories.append(history)
                validation += quantiles / self.training.ensemble_size
        return networks, histories, validation

    def _initial_network(self, member_seed: int) -> PopularityNet:
        # Seeded here, so that the refit starts from the very weights the early-stopping run started from.
        torch.manual_seed(member_seed)
        net = build_networks({**self.config, "ensemble_size": 1})[0]
        if self.source is not None:
            _apply_warm_start([net], self.source, self.freeze)
        return net

    def _fit_member(self, member: int, member_seed: int, train_batch: StoredInputs, val_batch: StoredInputs
                    ) -> tuple[PopularityNet, dict, np.ndarray]:
        # Early stopping weighs cold starts and nowcasts equally (each group's MAE, averaged).
        val_groups = (~self.data.samples.cold[self.data.split.validation]).astype(np.int64)
        net, history = fit_network(self._initial_network(member_seed), train_batch, val_batch, self.training,
                                   member_seed, self.device, tag=f"[m{member}] ", val_groups=val_groups,
                                   train_weights=self.data.weights(self.data.split.train, self.training),
                                   val_weights=self.data.weights(self.data.split.validation, self.training))
        best_epoch = max([h["epoch"] for h in history if h.get("best")] or [len(history)])
        quantiles = self._validation_quantiles(net, val_batch)
        if not self.training.refit_full_train:
            return net, {"early_stopping": history, "best_epoch": best_epoch}, quantiles
        # The latest videos are the most informative for the future: retrain on train+validation for
        # the early-stopped number of epochs (the validation set was only needed to pick that number).
        net, refit_history = fit_network(self._initial_network(member_seed), self.data.batch(self.data.fit_rows),
                                         None, self.training, member_seed + 1, self.device, fixed_epochs=best_epoch,
                                         tag=f"[m{member} refit] ",
                                         train_weights=self.data.weights(self.data.fit_rows, self.training))
        return net, {"early_stopping": history, "refit": refit_history, "best_epoch": best_epoch}, quantiles

    def _validation_quantiles(self, net: PopularityNet, val_batch: StoredInputs) -> np.ndarray:
        """(N_val, T, 3) log1p quantiles of the early-stopped member on the validation rows."""
        member = LoadedModel(config=self.config, layouts=self.data.layouts, networks=[net.eval()],
                             device=self.device)
        return _predict_rows(member, val_batch, blend=False).astype(np.float64)


def _test_predictions(model: LoadedModel, data: _TrainingData, batch_size: int = 4096, blend: bool = True
                      ) -> np.ndarray:
    """(N_test, T, 3) log1p quantiles of the test rows, through the scoring path of the finished model
    (LoadedModel.predict_batch_log, in predict_log's batches), reading the test inputs in bounded chunks."""
    return _predict_rows(model, data.batch(data.split.test), batch_size, blend)


def _predict_rows(model: LoadedModel, inputs: StoredInputs, batch_size: int = 4096, blend: bool = True
                  ) -> np.ndarray:
    out = np.empty((len(inputs), len(TARGETS), 3), dtype=np.float32)
    for start in range(0, len(inputs), batch_size):
        stop = min(start + batch_size, len(inputs))
        out[start:stop] = model.predict_batch_log(inputs.index(np.arange(start, stop)), blend=blend)
    return out


def _quantile_metrics(q: np.ndarray, truth: np.ndarray) -> dict:
    return all_target_metrics(truth, q[..., 1], q[..., 0], q[..., 2])


def _cold_metrics(q: np.ndarray, data: _TrainingData) -> dict:
    return _quantile_metrics(q[data.cold_positions], data.arrays["log_labels"][data.cold_test])


# Validation rows the blend weights and the interval calibration are fitted on (a seeded sample beyond this).
BLEND_MAX_VALIDATION_ROWS = 50_000


@dataclass
class _ValidationSample:
    """The validation rows the blend and the calibration are fitted on, read once: their blend matrix, group,
    log1p labels and the early-stopping networks' quantiles (N, T, 3)."""
    matrix: np.ndarray
    nowcast: np.ndarray
    labels: np.ndarray
    quantiles: np.ndarray
    weights: np.ndarray | None

    @classmethod
    def draw(cls, data: _TrainingData, validation_q: np.ndarray, seed: int, training: TrainingConfig
             ) -> "_ValidationSample":
        positions = _sample_rows(np.arange(len(data.split.validation)), BLEND_MAX_VALIDATION_ROWS, seed + 8)
        rows = data.split.validation[positions]
        matrix, nowcast = blend_matrix(data.tabular(rows), data.layouts, *_label_units(data))
        return cls(matrix, nowcast, data.arrays["log_labels"][rows], validation_q[positions],
                   data.weights(rows, training))

    def calibration(self, blend) -> dict:
        """Split-conformal offsets of the p10–p90 interval per group and target (model.calibration), from the
        quantiles after the blend."""
        q = self.quantiles.astype(np.float32)
        if blend is not None:
            q = blend.apply(q, self.matrix, self.nowcast)
        return interval_offsets(q, self.labels, self.nowcast, self.weights)


def _label_units(data: _TrainingData) -> tuple[np.ndarray, np.ndarray]:
    return data.targets.center.astype(np.float64), data.targets.scale.astype(np.float64)


def _fit_blend(data: _TrainingData, validation: _ValidationSample, seed: int, config: dict,
               training: TrainingConfig):
    """The trees of model.blend, fitted on (at most BASELINE_MAX_TRAIN_ROWS) training rows; the network's
    weight per target picked on the validation sample against the early-stopping networks' medians. Records
    the weights and the validation MAEs in config["blend"]; None when lightgbm is missing or no group has trees."""
    train_rows = _sample_rows(data.split.train, BASELINE_MAX_TRAIN_ROWS, seed + 7)
    train_batch = data.tabular(train_rows)
    train_x, train_nowcast = blend_matrix(train_batch, data.layouts, *_label_units(data))
    # The categorical columns (language, platform category, ...) split as categories, not as ordered ids.
    categorical = baselines.tabular_matrix(train_batch.index(torch.arange(1)), data.layouts)[2]
    blend, report = fit_tree_blend(train_x, data.arrays["log_labels"][train_rows], train_nowcast, validation.matrix,
                                   validation.labels, validation.nowcast, validation.quantiles[..., 1], seed,
                                   categorical, train_weights=data.weights(train_rows, training),
                                   val_weights=validation.weights)
    if blend is not None:
        config["blend"] = {"weights": blend.weights(), "validation": report,
                           "train_rows": int(len(train_rows)), "validation_rows": int(len(validation.labels))}
        log.info("tree blend, network weight per target: %s", blend.weights())
    return blend


def _test_metrics(q: np.ndarray, data: _TrainingData, seed: int, baselines_enabled: bool) -> dict:
    """The network's cold-start test metrics (every test catalog row, no counts known), and the baselines' on
    the same rows."""
    q = q[data.cold_positions]
    truth = data.arrays["log_labels"][data.cold_test]
    metrics = {"model": all_target_metrics(truth, q[..., 1], q[..., 0], q[..., 2])}
    if baselines_enabled:
        metrics.update(fit_baselines(data.arrays, data.cold_split(), data.layouts, data.tabular, seed))
    return metrics


def _prediction_table(q: np.ndarray, data: _TrainingData) -> pa.Table:
    """test_predictions.parquet: expected counts and p10/p90 of each test row at its observed age (cold start)."""
    test = data.cold_test
    counts = quantiles_to_counts(q[data.cold_positions])
    columns = {"video_id": pa.array(data.arrays["video_id"][test].astype(str), pa.string()),
               "observed_age_days": pa.array(data.arrays["age_days"][test])}
    for target in TARGETS:
        for prefix in ("pred", "p10", "p90"):
            columns[f"{prefix}_{target}"] = pa.array(counts[f"{prefix}_{target}"])
    return pa.table(columns)


def _metrics_json(config: dict) -> dict:
    """metrics.json (and what train() returns): the results part of a finished config."""
    return {"model_version": config["model_version"], "split": config["split"], "seed": config["seed"],
            "featurizers": config["featurizers"], "test": config["metrics"]["test"],
            "train_seconds": config["metrics"]["train_seconds"], "history": config["history"]}


def _timestamps(seconds: np.ndarray) -> pa.Array:
    micros = np.round(seconds * 1e6)
    return pa.array(np.where(np.isfinite(micros), micros, 0).astype(np.int64), pa.int64(),
                    mask=~np.isfinite(micros)).cast(UTC_TIMESTAMP)


def _nowcast_table(q: np.ndarray, data: _TrainingData) -> pa.Table:
    """test_nowcasts.parquet: for each test video observed at least NOWCAST_MIN_GAP_DAYS apart, its counts at its
    latest observation predicted from its earliest (and p10/p90)."""
    rows = data.nowcast_test
    counts = quantiles_to_counts(q[data.nowcast_positions])
    arrays = data.arrays
    columns = {"video_id": pa.array(arrays["video_id"][rows].astype(str), pa.string()),
               "input_observed_at": _timestamps(arrays["input_observed_s"][rows]),
               "target_observed_at": _timestamps(arrays["observed_s"][rows]),
               "input_age_days": pa.array(arrays["input_age_days"][rows]),
               "target_age_days": pa.array(arrays["age_days"][rows])}
    for prefix in ("pred", "p10", "p90"):
        for target in TARGETS:
            columns[f"{prefix}_{target}"] = pa.array(counts[f"{prefix}_{target}"])
    return pa.table(columns)


def _write_artifact(output_dir: str, networks: list[PopularityNet], config: dict, predictions: pa.Table,
                    metrics: dict, nowcasts: pa.Table | None = None, blend=None) -> None:
    """MODEL_DIR: weights + config.json, test_predictions.parquet, test_nowcasts.parquet (observation logs) and
    metrics.json."""
    save_model(output_dir, networks, config, blend)
    fs, root = storage.filesystem_and_path(output_dir)
    with fs.open_output_stream(f"{root}/test_predictions.parquet") as out:
        pq.write_table(predictions, out)
    if nowcasts is not None:
        with fs.open_output_stream(f"{root}/test_nowcasts.parquet") as out:
            pq.write_table(nowcasts, out)
    storage.write_bytes(storage.join(output_dir, "metrics.json"),
                        json.dumps(metrics, indent=1, default=json_default).encode())


def _log_summary(result: dict, started: float) -> None:
    metrics = result["test"]
    log.info("trained %s in %.0fs: mean MAE(log1p) model %.3f%s", result["model_version"],
             time.perf_counter() - started, mean_mae(metrics["model"]),
             "".join(f", {k} {mean_mae(v):.3f}" for k, v in metrics.items() if k != "model" and isinstance(v, dict)
                     and "views" in v))


# LightGBM fits up to 2000 trees per target and objective on one thread (8 models): on a million-row catalog
# that takes longer than training the network. Past this many training rows it is fitted on a seeded uniform
# sample of them (and of a quarter as many validation rows), recorded in metrics.json under "sampled"; it
# still predicts every test row. Smaller catalogs use every row, as before.
BASELINE_MAX_TRAIN_ROWS = 100_000


def _sample_rows(rows: np.ndarray, limit: int, seed: int) -> np.ndarray:
    if len(rows) <= limit:
        return rows
    return np.sort(np.random.default_rng(seed).choice(rows, limit, replace=False))


def fit_baselines(arrays: dict, split: Split, layouts: dict[str, ModalityLayout],
                  tabular: Callable[[np.ndarray], Batch], seed: int) -> dict:
    """Global median, creator-history mean and LightGBM on the tabular features, same split.

    tabular(catalog rows) gives those rows' inputs (numerics, categories, presence, age; vectors are not
    needed): a few float64 columns per row, so the baselines stay small next to the network's inputs.
    LightGBM trains on at most BASELINE_MAX_TRAIN_ROWS training rows (a seeded sample beyond)."""
    y = arrays["log_labels"]
    truth = y[split.test]
    train_all = np.sort(np.concatenate([split.train, split.validation]))
    out = {}
    med = baselines.global_median(y[train_all], len(split.test))
    out["global_median"] = all_target_metrics(truth, med["pred"], med["p10"], med["p90"])
    labelled = np.flatnonzero(np.isfinite(y).any(axis=1))
    hist = baselines.creator_history_mean(arrays["author_id"], arrays["publish_s"], y, labelled, split.test,
                                          med["pred"][0])
    out["creator_history_mean"] = all_target_metrics(truth, hist)
    out["creator_history_mean"]["note"] = ("mean log1p label of the creator's labelled videos published strictly "
                                           "earlier (train or test); training median when none")
    train_rows = _sample_rows(split.train, BASELINE_MAX_TRAIN_ROWS, seed)
    validation_rows = _sample_rows(split.validation, BASELINE_MAX_TRAIN_ROWS // 4, seed + 1)
    tr_x, names, cats = baselines.tabular_matrix(tabular(train_rows), layouts)
    va_x, _, _ = baselines.tabular_matrix(tabular(validation_rows), layouts)
    te_x, _, _ = baselines.tabular_matrix(tabular(split.test), layouts)
    for label, objective in (("lightgbm", "regression"), ("lightgbm_l1", "regression_l1")):
        pred = baselines.lightgbm_predictions(tr_x, y[train_rows], va_x, y[validation_rows], te_x, cats, seed,
                                              objective)
        if pred is None:
            out["lightgbm"] = {"skipped": "lightgbm is not installed (pip install lightgbm, in the dev extra)"}
            break
        out[label] = all_target_metrics(truth, pred)
        out[label]["features"] = names
        if len(train_rows) < len(split.train) or len(validation_rows) < len(split.validation):
            out[label]["sampled"] = {"train_rows": len(train_rows), "validation_rows": len(validation_rows),
                                     "of_train_rows": len(split.train), "of_validation_rows": len(split.validation)}
    return out


# Buckets of the nowcast report (days): the input observation's age, and the gap to the target observation.
NOWCAST_INPUT_AGE_BUCKETS = (0.0, 0.5, 1.0, 2.0, 4.0, math.inf)
NOWCAST_GAP_BUCKETS = (0.5, 1.0, 2.0, 4.0, math.inf)


def nowcast_metrics(data: _TrainingData, q: np.ndarray, seed: int, peers_enabled: bool = True,
                    training: TrainingConfig | None = None) -> dict:
    """Nowcast test metrics of the network (q: its quantiles on data.nowcast_test) beside the in-house peers
    fitted on the training videos' pairs, overall and by input age and gap."""
    arrays, rows = data.arrays, data.nowcast_test
    truth = arrays["log_labels"][rows]
    predictions = {"model": q[..., 1]}
    out: dict = {"protocol": ("each test video observed twice or more, at least "
                              f"{NOWCAST_MIN_GAP_DAYS * 24:g} h apart: its counts at its latest observation "
                              "predicted from its content and its earliest observation"),
                 "n_videos": int(len(rows)), "model": all_target_metrics(truth, q[..., 1], q[..., 0], q[..., 2])}
    if peers_enabled:
        fit = data.split.train[~data.samples.cold[data.split.train]]
        val = data.split.validation[~data.samples.cold[data.split.validation]]
        peers = baselines.nowcast_peers(arrays, np.sort(np.concatenate([fit, val])), rows)
        train_rows = _sample_rows(fit, BASELINE_MAX_TRAIN_ROWS, seed)
        val_rows = _sample_rows(val, BASELINE_MAX_TRAIN_ROWS // 4, seed + 1)
        matrix = lambda r: baselines.nowcast_matrix(data.tabular(r), data.layouts, arrays, r)   # noqa: E731
        tr_x, names, cats = matrix(train_rows)
        va_x, te_x = matrix(val_rows)[0], matrix(rows)[0]
        # The peers (every pair counts once), and the same trees with each video's pairs weighing 1
        # in all, its first-to-last pair holding the same share as popcast gives it
        # (model.samples.video_balanced_weights): the stronger of the two is the bar.
        share = (training or TrainingConfig()).first_to_last_share
        balanced = tuple(video_balanced_weights(data.samples, r, share) for r in (train_rows, val_rows))
        for label, objective, weights in (("lightgbm", "regression", (None, None)),
                                          ("lightgbm_l1", "regression_l1", (None, None)),
                                          ("lightgbm_balanced", "regression", balanced),
                                          ("lightgbm_l1_balanced", "regression_l1", balanced)):
            pred = baselines.lightgbm_predictions(tr_x, arrays["log_labels"][train_rows], va_x,
                                                  arrays["log_labels"][val_rows], te_x, cats, seed, objective,
                                                  *weights)
            if pred is not None:
                peers[label] = pred
        for name, pred in peers.items():
            predictions[name] = pred
            out[name] = all_target_metrics(truth, pred)
        if "lightgbm" in peers:
            out["lightgbm"]["features"] = names
    out["by_input_age"] = _bucket_metrics(truth, predictions, arrays["input_age_days"][rows], NOWCAST_INPUT_AGE_BUCKETS)
    out["by_gap"] = _bucket_metrics(truth, predictions, arrays["age_days"][rows] - arrays["input_age_days"][rows],
                                    NOWCAST_GAP_BUCKETS)
    return out


def _bucket_metrics(truth: np.ndarray, predictions: dict[str, np.ndarray], days: np.ndarray,
                    edges: tuple[float, ...]) -> dict:
    """{"lo–hi d": {"n": rows, name: {target: MAE(log1p)}}} for each bucket of `days` holding test rows."""
    out = {}
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (days >= lo) & (days < hi)
        if not inside.any():
            continue
        label = f"{lo:g}–{hi:g} d" if math.isfinite(hi) else f"≥ {lo:g} d"
        out[label] = {"n": int(inside.sum()), **{
            name: {t: m["mae_log1p"] for t, m in all_target_metrics(truth[inside], pred[inside]).items()}
            for name, pred in predictions.items()}}
    return out
