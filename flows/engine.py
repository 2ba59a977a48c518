"""Where the batch flow's patients run: Prefect's task runner for ``execution.engine``.

``threads`` (the default): Prefect's ``ThreadPoolTaskRunner`` in the flow's process, ``workers``
patients at a time. ``dask``: ``prefect_dask.DaskTaskRunner``, each patient one task on a Dask
worker process, either on a local cluster of ``workers`` processes started for the run or on an
existing cluster (``execution.scheduler_address``). The NumPy/SciPy/SimpleITK stages hold the
GIL for much of a study, so processes scale where threads do not (benchmarks/scaling.py).

A patient task exchanges small records with the flow (its studies in, its assessment records
and error rows out), never volumes: the worker reads the study from the export and writes the
study's outputs itself, so the export and the output folder must be on a filesystem every
worker sees at the same path (docs/cluster.md).
"""

from __future__ import annotations

import logging
from contextlib import nullcontext

from prefect.task_runners import ThreadPoolTaskRunner

from pipeline.core.config import ExecutionConfig
from pipeline.core.devices import usable_cpus

ENGINES = ("threads", "dask")


def task_runner_for(execution: ExecutionConfig, workers: int, device: str = "cpu"):
    """The Prefect task runner of ``execution.engine`` for ``workers`` patients at a time;
    ``device``: the run's resolved device (a local cluster for a CUDA run gives each worker the
    GPU resource its patients ask for)."""
    if execution.engine == "threads":
        return ThreadPoolTaskRunner(max_workers=max(1, workers))
    from prefect_dask import DaskTaskRunner

    if execution.scheduler_address:
        return DaskTaskRunner(address=execution.scheduler_address)
    # One thread per worker process: a study's stages are already multi-threaded where it pays
    # (SimpleITK, torch), and a second patient in the same process would contend for the GIL.
    # silence_logs (the workers) and the level of "distributed" here (the local scheduler runs in
    # this process): the cluster's INFO lines (worker start, connections) would bury the run's own
    # progress; its warnings and errors still show.
    logging.getLogger("distributed").setLevel(logging.WARNING)
    cluster = {"n_workers": max(1, workers), "processes": True, "threads_per_worker": 1, "dashboard_address": None,
               "silence_logs": logging.WARNING}
    if execution.gpu_resource and device.startswith("cuda"):
        cluster["resources"] = {execution.gpu_resource: 1}
    return DaskTaskRunner(cluster_kwargs=cluster)


def worker_threads(execution: ExecutionConfig, workers: int) -> int | None:
    """Library threads of each patient at a time: ``execution.threads_per_worker``, or this
    machine's CPUs shared out between the ``workers`` patients (the threads engine: their threads
    in this process; dask on a local cluster: its worker processes); None (the worker's own
    setting) on an existing Dask cluster, whose machines this process does not see."""
    if execution.threads_per_worker:
        return execution.threads_per_worker
    if execution.engine == "dask" and execution.scheduler_address:
        return None
    return max(1, usable_cpus() // max(1, workers))


def placement(gpu_resource: str | None, device: str):
    """Context for submitting a patient task to Dask: a patient on CUDA asks for the worker
    resource ``gpu_resource`` (only workers started with ``--resources GPU=1`` take it); a CPU
    patient, or ``gpu_resource`` None, goes to any worker."""
    if not gpu_resource or not device.startswith("cuda"):
        return nullcontext()
    import dask

    return dask.annotate(resources={gpu_resource: 1})
