"""The network blended with gradient-boosted trees: one LightGBM per target and sample group, mixed into the
network's median with a weight chosen on the validation split.

Why: trees and the network err differently (trees split cleanly on early counts and ages; the network reads
the content), so their average beats both. On bilibili-popular-2023 a validation-weighted blend cut the
nowcast MAE 3–7% below the better of the two (README "Nowcasting").

Two groups, each with its own trees and weights: "cold" rows (no counts known: the tabular inputs of every
modality and the log age, as baselines.tabular_matrix) and "nowcast" rows (the same plus the input
observation's log1p counts and log age). The nowcast trees predict GROWTH, log1p(target count) minus the
input's log1p count of the same target, as the network's nowcaster does: a tree predicting the level has to
rebuild the identity from early to late counts out of steps. On bilibili-popular-2023 growth trees cut the
blend's nowcast MAE by 1–3% (README "Nowcasting"). A row whose input lacks that count keeps the network's
median for that target. The trees are fitted on the training split only and early-stopped
on the validation split. The weight of the network per target is picked on the validation split from the
early-stopping networks' predictions (never from test rows, never from networks that saw those rows). The
blend shifts the whole (p10, p50, p90) of a row by the change of its median, so intervals keep their width.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field

import numpy as np

from featurizers.core.contracts import TARGETS
from model.baselines import tabular_matrix
from model.data import Batch, ModalityLayout

__all__ = ["BLEND_FILE", "BLEND_GROUPS", "WEIGHT_GRID", "TreeBlend", "blend_matrix", "fit_tree_blend",
           "group_columns", "nowcast_rows", "tree_offset"]

BLEND_FILE = "blend.json"
BLEND_GROUPS = ("cold", "nowcast")
WEIGHT_GRID = np.round(np.linspace(0.0, 1.0, 21), 2)   # weight of the network; 1.0 = the trees are not used
MIN_GROUP_ROWS = 200   # fewer training rows in a group: no trees for it (the network alone)
TREE_PARAMS = dict(objective="regression_l1", learning_rate=0.03, num_leaves=31, min_child_samples=20,
                   subsample=0.8, subsample_freq=1, colsample_bytree=0.8, n_estimators=2000, n_jobs=1,
                   verbose=-1, deterministic=True)
# Growth is a smoother target than a level and the nowcast group has more rows per video: larger trees pay
# (bilibili validation MAE flat from 63 to 255 leaves; 127 is the middle).
GROUP_TREE_PARAMS = {"cold": TREE_PARAMS,
                     "nowcast": {**TREE_PARAMS, "num_leaves": 127, "min_child_samples": 80}}
# What a group's trees predict: the log1p count itself, or its growth from the input observation's count.
GROUP_PREDICTS = {"cold": "level", "nowcast": "growth"}


def nowcast_rows(batch: Batch) -> np.ndarray:
    """(N,) bool: the rows that know at least one count of their video (the "nowcast" group)."""
    if batch.observed is None:
        return np.zeros(len(batch.log_age), dtype=bool)
    return batch.observed.mask.cpu().numpy().any(axis=1)


def blend_matrix(batch: Batch, layouts: dict[str, ModalityLayout], center: np.ndarray, scale: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, F) with NaN for missing, nowcast (N,) bool): the tabular inputs plus, for every row, the
    input observation's log1p counts and log age (NaN where the row has none). Read from the Batch itself, so
    training and scoring build identical matrices."""
    matrix, _, _ = tabular_matrix(batch, layouts)
    n = len(matrix)
    counts = np.full((n, len(TARGETS)), np.nan)
    age = np.full(n, np.nan)
    if batch.observed is not None:
        mask = batch.observed.mask.cpu().numpy()
        raw = batch.observed.counts.cpu().numpy().astype(np.float64) * scale + center
        counts = np.where(mask, raw, np.nan)
        age = np.where(nowcast_rows(batch), batch.observed.log_age.cpu().numpy().astype(np.float64), np.nan)
    return np.column_stack([matrix, counts, age]), np.isfinite(age)


def group_columns(matrix: np.ndarray, group: str) -> np.ndarray:
    """The columns a group's trees read: cold rows carry no observation, so its columns (NaN) are left out."""
    return matrix if group == "nowcast" else matrix[:, :matrix.shape[1] - len(TARGETS) - 1]


def tree_offset(matrix: np.ndarray, target_index: int, predicts: str) -> np.ndarray | float:
    """What a tree's output is added to: 0 for "level" trees; the input observation's log1p count of the
    target for "growth" trees (NaN where the input lacks it)."""
    if predicts == "level":
        return 0.0
    return matrix[:, matrix.shape[1] - len(TARGETS) - 1 + target_index]


@dataclass
class TreeBlend:
    """Per group: one booster (LightGBM model text) and the network's weight per target."""
    groups: dict[str, dict[str, dict]] = field(default_factory=dict)   # group -> target -> {"weight", "trees"}
    _boosters: dict = field(default_factory=dict, repr=False)

    def weights(self) -> dict[str, dict[str, float]]:
        return {g: {t: spec["weight"] for t, spec in targets.items()} for g, targets in self.groups.items()}

    def apply(self, q: np.ndarray, matrix: np.ndarray, nowcast: np.ndarray) -> np.ndarray:
        """q (N, T, 3) log1p quantiles of the network → blended copy (see the module docstring)."""
        out = np.array(q, dtype=np.float32, copy=True)
        for group, rows in (("cold", ~nowcast), ("nowcast", nowcast)):
            if not rows.any() or group not in self.groups:
                continue
            for j, target in enumerate(TARGETS):
                spec = self.groups[group].get(target)
                if spec is None or spec["weight"] >= 1.0:
                    continue
                group_matrix = matrix[rows]
                trees = (self._booster(group, target).predict(group_columns(group_matrix, group))
                         + tree_offset(group_matrix, j, spec.get("predicts", "level")))
                median = out[rows, j, 1].astype(np.float64)
                shift = (1.0 - spec["weight"]) * (trees - median)
                shift = np.where(np.isfinite(shift), shift, 0.0)   # no input count: the network's median
                out[rows, j, :] += shift[:, None].astype(np.float32)
        return out

    def _booster(self, group: str, target: str):
        key = (group, target)
        if key not in self._boosters:
            import lightgbm as lgb
            self._boosters[key] = lgb.Booster(model_str=self.groups[group][target]["trees"])
        return self._boosters[key]

    def to_bytes(self) -> bytes:
        return json.dumps({"format": "popcast-blend/1", "groups": self.groups}, sort_keys=True).encode()

    @staticmethod
    def from_bytes(data: bytes) -> "TreeBlend":
        return TreeBlend(groups=json.loads(data)["groups"])

    def digest(self) -> str:
        return hashlib.sha256(self.to_bytes()).hexdigest()


def fit_tree_blend(train_x: np.ndarray, train_y: np.ndarray, train_nowcast: np.ndarray,
                   val_x: np.ndarray, val_y: np.ndarray, val_nowcast: np.ndarray, val_network: np.ndarray,
                   seed: int, categorical: tuple[int, ...] | list[int] = (),
                   train_weights: np.ndarray | None = None, val_weights: np.ndarray | None = None
                   ) -> tuple[TreeBlend | None, dict]:
    """Fit the trees of each group on the training rows (early-stopped on the validation rows) and pick the
    network's weight per target on the validation rows against val_network (N_val, T) medians. `categorical`:
    the matrix columns LightGBM splits as categories (tabular_matrix's categorical columns). train_weights /
    val_weights: a weight per row for the trees' fit, their early stopping and the weighted validation MAE the
    network's weight is picked by (model.samples.video_balanced_weights; None: every row counts once).

    Returns (the blend, or None when lightgbm is missing or no group has trees; a report of the validation
    MAE of the network, the trees and the blend per group and target)."""
    try:
        import lightgbm as lgb
    except ImportError:
        return None, {"skipped": "lightgbm is not installed"}
    blend, report = TreeBlend(), {}
    for group, train_rows, val_rows in (("cold", ~train_nowcast, ~val_nowcast), ("nowcast", train_nowcast, val_nowcast)):
        if train_rows.sum() < MIN_GROUP_ROWS or val_rows.sum() < 5:
            continue
        gx, vx = group_columns(train_x[train_rows], group), group_columns(val_x[val_rows], group)
        gw = None if train_weights is None else np.asarray(train_weights, dtype=np.float64)[train_rows]
        vw = None if val_weights is None else np.asarray(val_weights, dtype=np.float64)[val_rows]
        predicts = GROUP_PREDICTS[group]
        targets, group_report = {}, {}
        for j, target in enumerate(TARGETS):
            # Rows whose label (or, for growth, input count) is unknown teach nothing about this target.
            ty = train_y[train_rows, j] - tree_offset(train_x[train_rows], j, predicts)
            vy = val_y[val_rows, j]
            v_offset = np.broadcast_to(tree_offset(val_x[val_rows], j, predicts), vy.shape)
            tr, va = np.isfinite(ty), np.isfinite(vy) & np.isfinite(v_offset)
            if tr.sum() < MIN_GROUP_ROWS or va.sum() < 5:
                continue
            model = lgb.LGBMRegressor(**GROUP_TREE_PARAMS[group], random_state=seed)
            with warnings.catch_warnings():   # lightgbm 4.7 renames eval_set; older 4.x lack the new names
                warnings.simplefilter("ignore")
                model.fit(gx[tr], ty[tr], sample_weight=None if gw is None else gw[tr],
                          eval_set=[(vx[va], vy[va] - v_offset[va])],
                          eval_sample_weight=None if vw is None else [vw[va]],
                          callbacks=[lgb.early_stopping(100, verbose=False)],
                          **({"categorical_feature": list(categorical)} if len(categorical) else {}))
            trees = model.predict(vx[va]) + v_offset[va]
            network = val_network[val_rows, j][va]
            maes = [float(np.average(np.abs(w * network + (1 - w) * trees - vy[va]),
                                     weights=None if vw is None else vw[va])) for w in WEIGHT_GRID]
            best = int(np.argmin(maes))
            # At weight 1.0 the trees are never read: they are not stored.
            targets[target] = {"weight": float(WEIGHT_GRID[best]), "predicts": predicts,
                               "trees": model.booster_.model_to_string() if WEIGHT_GRID[best] < 1.0 else None}
            group_report[target] = {"weight_network": float(WEIGHT_GRID[best]), "validation_rows": int(va.sum()),
                                    "validation_mae": {"network": maes[-1], "trees": maes[0], "blend": maes[best]}}
        if targets:
            blend.groups[group] = targets
            report[group] = group_report
    return (blend if blend.groups else None), report
