"""Compute device selection (auto | cpu | cuda)."""

from __future__ import annotations


def resolve_device(requested: str) -> str:
    """'auto' -> 'cuda' when a CUDA device is usable, else 'cpu'; 'cuda' without one is an error."""
    requested = requested.lower()
    if requested not in {"auto", "cpu", "cuda"}:
        raise ValueError(f"device must be auto, cpu or cuda, not {requested!r}")
    if requested == "cpu":
        return "cpu"
    try:
        import torch

        available = torch.cuda.is_available()
    except ImportError:  # torch is a dependency, but keep the CPU path alive without it
        available = False
    if requested == "cuda" and not available:
        raise ValueError("device 'cuda' requested but no CUDA device is available")
    return "cuda" if available else "cpu"
