"""One way to open ONNX Runtime CPU sessions for every featurizer that uses them (YAMNet, EfficientNet)."""
from __future__ import annotations

from pathlib import Path

__all__ = ["cpu_session"]


def cpu_session(model_path: str | Path, threads: int):
    """An onnxruntime CPU session with `threads` intra-op threads that never spin when idle.

    Idle intra-op threads would otherwise busy-wait after each run, on the cores that decoding (or the
    other encoders of the same worker) need next.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(model_path), sess_options=options, providers=["CPUExecutionProvider"])
