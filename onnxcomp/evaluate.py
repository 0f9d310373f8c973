"""Original vs compressed, both run by onnxruntime: how far apart are the outputs?"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort

from .errors import OnnxcompError


PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def execution_providers(provider: str) -> list[str]:
    """onnxruntime's provider list for ``"cpu"`` or ``"cuda"``, or a one-line error if this install lacks it."""
    if provider not in PROVIDERS:
        raise OnnxcompError(f"unknown provider {provider!r}: use one of {sorted(PROVIDERS)}")
    if provider == "cpu":
        return ["CPUExecutionProvider"]
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        raise OnnxcompError(
            f"--provider cuda: this onnxruntime ({ort.__version__}) has no CUDAExecutionProvider "
            f"(it has {', '.join(available)}); install onnxruntime-gpu instead of onnxruntime"
        )
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def make_session(model: onnx.ModelProto | str, providers=None, threads: int | None = None,
                 profile_prefix: str | None = None) -> ort.InferenceSession:
    """A session that does not spin when idle; ``profile_prefix``: write onnxruntime's profile there."""
    options = ort.SessionOptions()
    # Idle sessions must not spin: in one process, a spinning session steals the cores of the other.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return ort.InferenceSession(source, options, providers=providers or ["CPUExecutionProvider"])


def output_errors(reference: list[np.ndarray], candidate: list[np.ndarray], names: list[str]) -> dict:
    """Per output: relative L2 error, max absolute error, cosine similarity."""
    errors = {}
    for name, ref, new in zip(names, reference, candidate, strict=True):
        if np.shape(ref) != np.shape(new):
            raise ValueError(f"output {name!r} has shape {np.shape(new)}, the original {np.shape(ref)}")
        ref = np.asarray(ref, dtype=np.float64).ravel()
        new = np.asarray(new, dtype=np.float64).ravel()
        norm = np.linalg.norm(ref)
        denominator = norm * np.linalg.norm(new)
        errors[name] = {
            "relative_l2": float(np.linalg.norm(new - ref) / norm) if norm > 0 else float(np.linalg.norm(new)),
            "max_abs": float(np.max(np.abs(new - ref))) if ref.size else 0.0,
            # Two all-zero outputs agree perfectly; one all-zero output does not agree at all.
            "cosine": float(ref @ new / denominator) if denominator > 0 else float(norm == np.linalg.norm(new)),
        }
    return errors


def compare_outputs(original: onnx.ModelProto, compressed: onnx.ModelProto, feeds: dict, providers=None) -> dict:
    """Run both models on one feed dict and compare every output."""
    reference = make_session(original, providers).run(None, feeds)
    session = make_session(compressed, providers)
    names = [o.name for o in session.get_outputs()]
    return output_errors(reference, session.run(None, feeds), names)
