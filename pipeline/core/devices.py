"""Compute device selection (auto | cpu | cuda) and the threads a process's libraries use."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def limit_library_threads(threads: int) -> None:
    """Make SimpleITK's filters and torch's CPU kernels use ``threads`` threads in this process
    (both default to every core, which several worker processes on one machine would share)."""
    import SimpleITK as sitk
    import torch

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's CPU kernels on ``threads`` threads inside the block, the count before it after it
    (None: left as it is). With torch's OpenMP backend the count is the calling thread's once
    that thread has run a parallel kernel, so patients on other threads keep theirs."""
    import torch

    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    if before != threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


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
