"""The data contracts of popcast, written once: catalog, feature tables, dead letters, scored output.

Every reader, writer, test and the README table derive from the pyarrow schemas in this module.
It imports pyarrow only, so featurizers/, model/ and the CLI can use it without Beam.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import pyarrow as pa

__all__ = ["TARGETS", "Column", "UTC_TIMESTAMP", "CATALOG_COLUMNS", "CATALOG_SCHEMA", "REQUIRED_COLUMNS",
           "OBSERVATION_KEY", "STATIC_COLUMNS",
           "LABEL_COLUMNS", "SUPPORTED_URI_SCHEMES", "ERRORS_SCHEMA", "MODALITIES", "MEDIA_MODALITIES",
           "OPTIONAL_MODALITIES", "SCORE_RECOMPUTED_MODALITIES", "DEFAULT_FEATURIZE_MODALITIES", "MIN_AGE_DAYS",
           "MISSING_VECTOR", "FEATURE_KEY_COLUMNS",
           "embedding_type", "FeatureSpec", "PREDICTION_COLUMNS", "markdown_table", "readme_contracts"]

TARGETS: tuple[str, ...] = ("views", "likes", "comments", "shares")


@dataclass(frozen=True)
class Column:
    name: str
    type: pa.DataType
    role: str  # "required", "optional" or "label"
    doc: str


UTC_TIMESTAMP = pa.timestamp("us", tz="UTC")

CATALOG_COLUMNS: tuple[Column, ...] = (
    Column("video_id", pa.string(), "required", "unique id of the video"),
    Column("publish_time", UTC_TIMESTAMP, "required", "when the video was published (UTC)"),
    Column("video_uri", pa.string(), "optional",
           "local path, file:// or gs:// URI of the media; null = no media"),
    Column("title", pa.string(), "optional", "caption text"),
    Column("hashtags", pa.list_(pa.string()), "optional",
           "hashtags without '#'; CSV/JSON may give them pipe- or comma-separated"),
    Column("duration_s", pa.float64(), "optional", "duration in seconds as listed by the platform"),
    Column("author_id", pa.string(), "optional", "creator id"),
    Column("author_followers", pa.int64(), "optional", "creator follower count at crawl time"),
    Column("music_id", pa.string(), "optional", "sound / music track id"),
    Column("language", pa.string(), "optional", "caption language code"),
    Column("category", pa.string(), "optional", "platform category / section of the video (e.g. Bilibili's)"),
    Column("observed_at", UTC_TIMESTAMP, "label",
           "when the counts were read (UTC); a video may have several rows (observations), one per observed_at"),
    Column("views", pa.int64(), "label", "view count at observed_at; null = unknown (not zero)"),
    Column("likes", pa.int64(), "label", "like count at observed_at; null = unknown"),
    Column("comments", pa.int64(), "label", "comment count at observed_at; null = unknown"),
    Column("shares", pa.int64(), "label", "share count at observed_at; null = unknown"),
)

CATALOG_SCHEMA = pa.schema([pa.field(c.name, c.type, nullable=c.role != "required")
                            for c in CATALOG_COLUMNS])
REQUIRED_COLUMNS: tuple[str, ...] = tuple(c.name for c in CATALOG_COLUMNS if c.role == "required")
# A catalog is an observation log: one row per (video, time its counts were read). Daily catalog partitions
# (catalog/dt=*/) read together form one.
OBSERVATION_KEY: tuple[str, ...] = ("video_id", "observed_at")
# What describes the video itself: every observation of a video must agree on these (followers are read at
# crawl time and may differ).
STATIC_COLUMNS: tuple[str, ...] = ("publish_time", "video_uri", "title", "hashtags", "duration_s", "author_id",
                                   "music_id", "language", "category")
LABEL_COLUMNS: tuple[str, ...] = tuple(c.name for c in CATALOG_COLUMNS if c.role == "label")
SUPPORTED_URI_SCHEMES: tuple[str, ...] = ("", "file", "gs")

# Dead letters: one row per input row that did not become features / predictions.
ERROR_COLUMNS: tuple[Column, ...] = (
    Column("video_id", pa.string(), "key", "the input row"),
    Column("stage", pa.string(), "output", "read, limits, decode, visual, audio, text, validate, score"),
    Column("error_class", pa.string(), "output", "exception class or reason (empty_file, max_bytes, corrupt, ...)"),
    Column("message", pa.string(), "output", "what went wrong, for a human"),
    Column("run_id", pa.string(), "output", "the run that wrote it"),
)
ERRORS_SCHEMA = pa.schema([pa.field(c.name, c.type) for c in ERROR_COLUMNS])

# Feature tables: DIR/<modality>/*.parquet, keyed by video_id, one row per video.
MODALITIES: tuple[str, ...] = ("visual", "audio", "text", "meta", "history", "retrieval")
# Only rows with a video_uri can have these.
MEDIA_MODALITIES: tuple[str, ...] = ("visual", "audio")
# History and retrieval depend on other rows' labels: opt-in, recomputed for every row on each run, never
# stored per id.
OPTIONAL_MODALITIES: tuple[str, ...] = ("history", "retrieval")
# Opt-in modalities a score job recomputes itself as of scoring (the others are read from the features dir).
SCORE_RECOMPUTED_MODALITIES: tuple[str, ...] = ("history",)
DEFAULT_FEATURIZE_MODALITIES: tuple[str, ...] = tuple(m for m in MODALITIES if m not in OPTIONAL_MODALITIES)
# Youngest age (days) an observation is taken at: younger ones carry no usable age (featurizers and model).
MIN_AGE_DAYS = 1.0 / 24.0
FEATURE_KEY_COLUMNS = (pa.field("video_id", pa.string(), nullable=False),
                       pa.field("featurizer", pa.string(), nullable=False))  # "name@version"


# A vector a row does not have (no audio stream, say) is stored as all-NaN, not as a null list:
# pyarrow 25 writes null fixed-size lists to Parquet but cannot read them back.
MISSING_VECTOR = float("nan")


def embedding_type(dim: int) -> pa.DataType:
    """An embedding (or a flattened K×D sequence) as fixed_size_list<float32>[dim]."""
    return pa.list_(pa.float32(), dim)


@dataclass(frozen=True)
class FeatureSpec:
    """What one featurizer writes: its identity, its vector columns and scalar columns.

    `shapes` maps each vector column to its logical shape, e.g. {"frames": (16, 1280)}; the column
    itself is stored flat as fixed_size_list<float32>[prod(shape)]. `scalars` are plain columns.
    """
    modality: str
    name: str
    version: str
    shapes: dict[str, tuple[int, ...]]
    scalars: tuple[tuple[str, pa.DataType], ...] = ()
    config: dict | None = None

    @property
    def featurizer_id(self) -> str:
        return f"{self.name}@{self.version}"

    def schema(self) -> pa.Schema:
        fields = list(FEATURE_KEY_COLUMNS)
        for column, shape in self.shapes.items():
            size = 1
            for d in shape:
                size *= d
            fields.append(pa.field(column, embedding_type(size)))
        fields += [pa.field(n, t) for n, t in self.scalars]
        metadata = {
            b"popcast.modality": self.modality.encode(),
            b"popcast.featurizer": self.featurizer_id.encode(),
            b"popcast.shapes": json.dumps({k: list(v) for k, v in self.shapes.items()}).encode(),
            b"popcast.config": json.dumps(self.config or {}, sort_keys=True, default=str).encode(),
        }
        return pa.schema(fields, metadata=metadata)


# Scored output: every catalog column plus these, partitioned TABLE/dt=YYYY-MM-DD/.
PREDICTION_COLUMNS: tuple[Column, ...] = tuple(
    Column(f"{prefix}_{t}", pa.float64(), "output", doc)
    for t in TARGETS
    for prefix, doc in (("pred", f"median (p50) prediction of {t} at the horizon: the point estimate, not the mean"),
                        ("p10", f"10th percentile of {t} at the horizon"),
                        ("p90", f"90th percentile of {t} at the horizon"))
) + (
    Column("horizon_days", pa.float64(), "output",
           "age at which the predictions apply: --horizon-days, or the age of the observation used when the video "
           "is already older"),
    Column("input_observed_at", UTC_TIMESTAMP, "output",
           "observed_at of the observation whose counts the prediction started from (nowcasting models); "
           "null = cold start (no counts known at the reference time)"),
    Column("model_version", pa.string(), "output", "model id (config fingerprint)"),
    Column("featurizer_versions", pa.string(), "output", "comma-separated name@version used"),
    Column("scored_at", UTC_TIMESTAMP, "output", "when this row was scored"),
    Column("run_id", pa.string(), "output", "id of the scoring run"),
)


def markdown_table(columns: tuple[Column, ...]) -> str:
    """The README rendering of a contract (so the README is written from this one place)."""
    lines = ["| column | type | role | meaning |", "|---|---|---|---|"]
    lines += [f"| `{c.name}` | `{c.type}` | {c.role} | {c.doc} |" for c in columns]
    return "\n".join(lines)



def readme_contracts() -> str:
    """The README's "Data contracts" tables, generated here (`python -m featurizers.core.contracts`)."""
    return "\n\n".join([
        "### Catalog (input of every job)\n\n" + markdown_table(CATALOG_COLUMNS),
        "### Scored table (output of `popcast score`, `TABLE/dt=YYYY-MM-DD/`)\n\n"
        "Every catalog column, then:\n\n" + markdown_table(PREDICTION_COLUMNS),
        "### Dead letters (featurize: `DIR/_errors/`; score: `TABLE.popcast/errors/`)\n\n"
        + markdown_table(ERROR_COLUMNS),
    ])


if __name__ == "__main__":
    print(readme_contracts())
