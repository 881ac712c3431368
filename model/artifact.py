"""MODEL_DIR on disk: model.safetensors (weights of every ensemble member) + config.json; loading and scoring.

Loading reads tensors with safetensors and JSON only: nothing is ever unpickled. A model refuses
feature tables made by featurizer versions other than the ones it was trained on.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from safetensors.torch import load_file, save_file

from featurizers.core import storage
from featurizers.core.contracts import MIN_AGE_DAYS, TARGETS
from featurizers.core.feature_table import FeatureTable
from model.card import (
    CHECKSUMS_KEY,
    CONFIG_FILE,
    FORMAT,
    WEIGHTS_FILE,
    ModalityLayout,
    ModelCard,
    ModelIntegrityError,
    config_digest,
    json_default,
    model_version,
    read_model_card,
    sha256_of,
    verify_model_dir,
)
from model.data import (
    Batch,
    catalog_arrays,
    check_featurizers,
    log_age,
    make_batch,
    observed_arrays,
)
from model.blend import BLEND_FILE, TreeBlend, blend_matrix, nowcast_rows
from model.calibration import apply_offsets
from model.network import NetworkConfig, PopularityNet
from model.samples import input_arrays
from model.young_age import GROWTH_DAYS, apply_young_age_growth

__all__ = ["ModelIntegrityError", "verify_model_dir", "CHECKSUMS_KEY", "FORMAT", "LoadedModel", "autocast",
           "build_networks", "json_default", "load_model", "model_version", "quantiles_to_counts", "save_model"]


def build_networks(config: dict) -> list[PopularityNet]:
    layouts = {k: ModalityLayout.from_json(config["layouts"][k]) for k in sorted(config["layouts"])}
    cfg = NetworkConfig(**config["network"])
    return [PopularityNet(layouts, cfg) for _ in range(config["ensemble_size"])]


def save_model(output_dir: str, networks: list[PopularityNet], config: dict, blend: TreeBlend | None = None) -> None:
    """Write model.safetensors, blend.json (when the model blends trees in) and config.json (local path or
    gs://); the config records the blend's SHA-256, so its own checksum covers it."""
    tensors = {f"member{i}.{name}": t.detach().to("cpu").contiguous()
               for i, net in enumerate(networks) for name, t in net.state_dict().items()}
    fs, root = storage.filesystem_and_path(output_dir)
    fs.create_dir(root, recursive=True)
    local = storage.scheme_of(output_dir) == ""
    if local:
        save_file(tensors, os.path.join(root, WEIGHTS_FILE))
    else:
        from safetensors.torch import save
        with fs.open_output_stream(f"{root}/{WEIGHTS_FILE}") as out:
            out.write(save(tensors))
    # The config records the weights' checksum and its own (over its content without them), so load_model
    # can refuse a truncated, edited or half-copied directory instead of half-loading it.
    with fs.open_input_stream(f"{root}/{WEIGHTS_FILE}") as f:
        checksums = {WEIGHTS_FILE: sha256_of(f)}
    config = {k: v for k, v in config.items() if k != CHECKSUMS_KEY}
    if blend is not None:
        with fs.open_output_stream(f"{root}/{BLEND_FILE}") as out:
            out.write(blend.to_bytes())
        config["blend"] = {**config.get("blend", {}), "file": BLEND_FILE, "sha256": blend.digest()}
    checksums[CONFIG_FILE] = config_digest(config)
    with fs.open_output_stream(f"{root}/{CONFIG_FILE}") as out:
        out.write(json.dumps({**config, CHECKSUMS_KEY: checksums}, indent=1, sort_keys=True,
                             default=json_default).encode())


@dataclass
class LoadedModel(ModelCard):
    """A trained model ready to score: the card (config, layouts) plus the ensemble networks."""
    networks: list[PopularityNet] = None
    device: str = "cpu"
    blend: TreeBlend | None = None   # trees mixed into the median (model.blend); None: the network alone

    def observed(self, input_log_labels: np.ndarray, input_age_days: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The network's observation inputs (model.data.observed_arrays) in this model's label units."""
        return observed_arrays(input_log_labels, input_age_days, np.asarray(self.config["target_center"]),
                               np.asarray(self.config["target_scale"]))

    def predict_log(self, catalog_rows: pa.Table, feature_tables: dict[str, FeatureTable],
                    log_ages: np.ndarray, drop_modalities: tuple[str, ...] = (),
                    batch_size: int = 4096,
                    observed: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        """(N, T, 3) p10/p50/p90 of log1p(count) at the given log1p(age) per row (ensemble mean); observed:
        the rows' observation inputs (self.observed), None = cold start for every row."""
        check_featurizers(self.layouts, feature_tables)
        video_ids = catalog_rows.column("video_id").to_numpy(zero_copy_only=False).astype(object)
        out = np.empty((len(video_ids), len(TARGETS), 3), dtype=np.float32)
        for start in range(0, len(video_ids), batch_size):
            stop = min(start + batch_size, len(video_ids))
            part = None if observed is None else tuple(a[start:stop] for a in observed)
            batch = make_batch(self.layouts, feature_tables, video_ids[start:stop], log_ages[start:stop],
                               observed=part)
            out[start:stop] = self.predict_batch_log(batch, drop_modalities)
        return out

    def predict_batch_log(self, batch: Batch, drop_modalities: tuple[str, ...] = (), blend: bool = True
                          ) -> np.ndarray:
        """(B, T, 3) p10/p50/p90 of log1p(count) of a prepared Batch (ensemble mean, then the tree blend when
        the model has one, then the calibrated interval; blend=False or a modality ablation gives the network
        alone; then the young-age growth of model.young_age on every path): predict_log's step,
        for callers that build inputs themselves (training reads its test rows from disk)."""
        center = np.asarray(self.config["target_center"], dtype=np.float32)
        scale = np.asarray(self.config["target_scale"], dtype=np.float32)
        on_device = batch.to(self.device)
        with torch.inference_mode(), autocast(self.device):
            preds = torch.stack([net(on_device, drop_modalities) for net in self.networks]).mean(0)
        q = preds.float().cpu().numpy() * scale[None, :, None] + center[None, :, None]
        if blend and not drop_modalities:
            if self.blend is not None:
                matrix, nowcast = blend_matrix(batch, self.layouts, center.astype(np.float64),
                                               scale.astype(np.float64))
                q = self.blend.apply(q, matrix, nowcast)
            else:
                nowcast = nowcast_rows(batch)
            q = apply_offsets(q, self.config.get("calibration"), nowcast)
        # Last, on every path: rows younger than the trained ages grow into them (model.young_age). Off (the
        # default), no batch tensor is copied off the device for it.
        growth = self.config.get("young_age_growth")
        if not growth:
            return q
        return apply_young_age_growth(q, batch.log_age.cpu().numpy(), self.config["network"].get("log_age_min"),
                                      growth["exponents"],
                                      None if batch.observed is None else batch.observed.mask.cpu().numpy(),
                                      growth.get("growth_days", GROWTH_DAYS), growth.get("exponent_range"))

    def predict(self, catalog_rows: pa.Table, feature_tables: dict[str, FeatureTable],
                horizon_days: float | np.ndarray | None, batch_size: int = 4096) -> dict[str, np.ndarray]:
        """Expected counts at `horizon_days` (None: each row's observed age, cold start) with p10/p90 intervals.

        Returns {"pred_views": (N,), "p10_views": ..., "p90_views": ..., ...} as float64 counts, and for a
        nowcasting model with a horizon also "input_observed_at" (datetime64[us], NaT = cold start: each row is
        its video's latest observation, used when it has a count) and "horizon_days" per row: a video already
        older than the horizon is predicted at its observation's age (its counts as of now; the past is not
        predicted). batch_size: rows per forward pass; each batch joins the feature tables anew, so callers
        holding a bounded shard pass its length.
        """
        n = catalog_rows.num_rows
        arrays = catalog_arrays(catalog_rows)
        if horizon_days is None:
            ages = arrays["age_days"]
            if not np.isfinite(ages).all():
                raise ValueError("horizon_days=None needs observed_at on every row")
            q = self.predict_log(catalog_rows, feature_tables, log_age(ages), batch_size=max(batch_size, 1))
            return quantiles_to_counts(q)
        ages = np.broadcast_to(np.maximum(np.asarray(horizon_days, dtype=np.float64), MIN_AGE_DAYS), (n,))
        if not self.nowcasts:
            q = self.predict_log(catalog_rows, feature_tables, log_age(ages), batch_size=max(batch_size, 1))
            return quantiles_to_counts(q)
        inputs = input_arrays(arrays["log_labels"], arrays["age_days"], arrays["observed_s"])
        known = np.isfinite(inputs["input_age_days"])
        ages = np.where(known, np.fmax(ages, inputs["input_age_days"]), ages)
        q = self.predict_log(catalog_rows, feature_tables, log_age(ages), batch_size=max(batch_size, 1),
                             observed=self.observed(inputs["input_log_labels"], inputs["input_age_days"]))
        out = quantiles_to_counts(q)
        micros = np.where(known, np.round(arrays["observed_s"] * 1e6), 0).astype(np.int64)
        out["input_observed_at"] = np.where(known, micros.astype("datetime64[us]"), np.datetime64("NaT", "us"))
        out["horizon_days"] = ages.astype(np.float64)
        return out


def quantiles_to_counts(q: np.ndarray) -> dict[str, np.ndarray]:
    """(N, T, 3) log1p quantiles → {"p10_t", "pred_t", "p90_t"} non-negative float64 counts."""
    out = {}
    for j, target in enumerate(TARGETS):
        for k, prefix in enumerate(("p10", "pred", "p90")):
            out[f"{prefix}_{target}"] = np.maximum(np.expm1(q[:, j, k].astype(np.float64)), 0.0)
    return out


class autocast:
    """bf16 autocast on CUDA; nothing on CPU (CPU bf16 is slower than float32 for these small layers)."""

    def __init__(self, device: str):
        self.ctx = torch.autocast("cuda", dtype=torch.bfloat16) if str(device).startswith("cuda") else None

    def __enter__(self):
        return self.ctx.__enter__() if self.ctx else None

    def __exit__(self, *exc):
        return self.ctx.__exit__(*exc) if self.ctx else False


def load_model(model_dir: str, device: str = "cpu") -> LoadedModel:
    """Read MODEL_DIR (safetensors + JSON only) into a LoadedModel in eval mode."""
    card = read_model_card(model_dir)
    fs, root = storage.filesystem_and_path(model_dir)
    if storage.scheme_of(model_dir) == "":
        tensors = load_file(os.path.join(root, WEIGHTS_FILE))
    else:
        from safetensors.torch import load
        with fs.open_input_stream(f"{root}/{WEIGHTS_FILE}") as f:
            tensors = load(f.read())
    networks = build_networks(card.config)
    for i, net in enumerate(networks):
        prefix = f"member{i}."
        net.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        net.to(device).eval()
    return LoadedModel(config=card.config, layouts=card.layouts, networks=networks, device=device,
                       blend=_load_blend(model_dir, card.config))


def _load_blend(model_dir: str, config: dict) -> TreeBlend | None:
    recorded = config.get("blend")
    if not recorded:
        return None
    try:
        data = storage.read_bytes(storage.join(model_dir, recorded["file"]))
    except FileNotFoundError:
        raise ModelIntegrityError(f"model directory {model_dir}: {recorded['file']} is missing") from None
    if hashlib.sha256(data).hexdigest() != recorded["sha256"]:
        raise ModelIntegrityError(f"model directory {model_dir}: {recorded['file']} does not match the checksum "
                                  "recorded when it was saved; copy the whole directory again or train again")
    return TreeBlend.from_bytes(data)
