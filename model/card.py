"""What a model directory says about itself without loading its weights: config.json read and checked,
the modality layouts, the featurizer versions it needs, its version and trained ages.

Torch-free on purpose: a score driver plans a run (which features, which rows, which shards) from the card
alone, so the process that only coordinates Beam workers never pays for torch (about 500 MB resident);
the workers load the weights (model.artifact.load_model).
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field

import numpy as np

from featurizers.core import storage

__all__ = ["CHECKSUMS_KEY", "CONFIG_FILE", "FORMAT", "WEIGHTS_FILE", "ModalityLayout", "ModelCard",
           "ModelIntegrityError", "config_digest", "json_default", "model_version", "read_model_card",
           "sha256_of", "verify_model_dir"]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CHECKSUMS_KEY = "checksums"
FORMAT = "popcast-model/1"


@dataclass
class ModalityLayout:
    """What the model reads from one modality table; JSON-able, stored in config.json.

    sequences: 2-D vector columns (K, D), encoded by the temporal CNN+GRU branch.
    vectors: 1-D vector columns and their widths. numeric / categorical: scalar columns.
    The normalisation statistics (fitted on training rows) are part of the layout.
    """
    name: str
    featurizer: str
    sequences: dict[str, list[int]] = field(default_factory=dict)
    vectors: dict[str, int] = field(default_factory=dict)
    numeric: list[str] = field(default_factory=list)
    categorical: dict[str, list[str]] = field(default_factory=dict)   # column -> vocabulary (index+1)
    numeric_log: list[bool] = field(default_factory=list)
    numeric_mean: list[float] = field(default_factory=list)
    numeric_std: list[float] = field(default_factory=list)
    vector_mean: dict[str, list[float]] = field(default_factory=dict)
    vector_std: dict[str, list[float]] = field(default_factory=dict)

    @property
    def vector_width(self) -> int:
        return sum(self.vectors.values())

    @property
    def numeric_width(self) -> int:
        # Each numeric column comes with a "missing" indicator; each vector column with one too.
        return 2 * len(self.numeric) + len(self.vectors)

    @property
    def category_sizes(self) -> list[int]:
        return [len(v) + 1 for v in self.categorical.values()]   # index 0 = unknown / missing

    def to_json(self) -> dict:
        return dict(self.__dict__)

    @staticmethod
    def from_json(data: dict) -> "ModalityLayout":
        layout = ModalityLayout(**data)
        layout.sequences = {k: list(v) for k, v in layout.sequences.items()}
        return layout


def model_version(config: dict) -> str:
    """A short id of the model: hash of its architecture, inputs, data fingerprint and seed."""
    key = json.dumps({k: config.get(k) for k in ("network", "layouts", "fingerprint", "seed", "ensemble_size")},
                     sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def config_digest(config: dict) -> str:
    """SHA-256 of the config's canonical JSON (sorted keys), without its checksums."""
    body = {k: v for k, v in config.items() if k != CHECKSUMS_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=json_default).encode()).hexdigest()


class ModelIntegrityError(ValueError):
    """A model directory whose files do not match the checksums recorded when it was saved."""


def sha256_of(stream) -> str:
    digest = hashlib.sha256()
    while chunk := stream.read(8 << 20):
        digest.update(chunk)
    return digest.hexdigest()


def verify_model_dir(model_dir: str, config: dict) -> None:
    """Refuse a model directory that is truncated, edited or half-copied: the weights' and the config's
    SHA-256 must match those recorded at save time. Directories saved before checksums existed load with a
    warning."""
    checksums = config.get(CHECKSUMS_KEY)
    if not checksums:
        logging.getLogger("popcast").warning("%s records no checksums (saved by an older popcast): its files "
                                             "cannot be checked", model_dir)
        return
    if config_digest(config) != checksums.get(CONFIG_FILE):
        raise ModelIntegrityError(f"model directory {model_dir}: {CONFIG_FILE} was edited after the model was "
                                  "saved (its checksum does not match); train again or restore the file")
    fs, root = storage.filesystem_and_path(model_dir)
    try:
        with fs.open_input_stream(f"{root}/{WEIGHTS_FILE}") as f:
            actual = sha256_of(f)
    except FileNotFoundError:
        raise ModelIntegrityError(f"model directory {model_dir}: {WEIGHTS_FILE} is missing") from None
    if actual != checksums.get(WEIGHTS_FILE):
        raise ModelIntegrityError(f"model directory {model_dir}: {WEIGHTS_FILE} does not match the checksum "
                                  "recorded when it was saved (truncated or half-copied); copy the whole "
                                  "directory again or train again")


def json_default(value):
    """json.dumps `default=` for the numpy scalars and arrays that configs and metrics carry."""
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value)}")


@dataclass
class ModelCard:
    """config.json of a model directory and its modality layouts (no weights)."""
    config: dict
    layouts: dict[str, ModalityLayout]

    @property
    def version(self) -> str:
        return self.config["model_version"]

    @property
    def featurizers(self) -> dict[str, str]:
        return {k: v.featurizer for k, v in self.layouts.items()}

    @property
    def trained_age_days(self) -> tuple[float, float] | None:
        """(youngest, oldest) video age in days the model was trained on; None for unclamped models.

        Ages outside are clamped to it: a prediction "at 7 days" from a model that only saw videos
        older than 40 days is the 40-day prediction, which is higher than the truth at 7 days.
        """
        low, high = (self.config["network"].get(k) for k in ("log_age_min", "log_age_max"))
        if low is None or high is None:
            return None
        return float(np.expm1(low)), float(np.expm1(high))

    @property
    def nowcasts(self) -> bool:
        """Whether the model conditions on the counts a video already has (trained on an observation log)."""
        return bool(self.config["network"].get("nowcast"))


def read_model_card(model_dir: str) -> ModelCard:
    """config.json of MODEL_DIR, checked (format, checksums of config and weights), with its layouts."""
    fs, root = storage.filesystem_and_path(model_dir)
    try:
        with fs.open_input_stream(f"{root}/{CONFIG_FILE}") as f:
            config = json.loads(f.read())
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{model_dir} is not a popcast model directory (no {CONFIG_FILE})") from exc
    verify_model_dir(model_dir, config)
    if config.get("format") != FORMAT:
        raise ValueError(f"{model_dir}: unsupported model format {config.get('format')!r} (expected {FORMAT})")
    return ModelCard(config=config, layouts={k: ModalityLayout.from_json(config["layouts"][k])
                                             for k in sorted(config["layouts"])})
