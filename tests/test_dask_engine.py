"""The Dask engine (issue 20, docs/cluster.md): each patient a task on a Dask worker process.

The cluster test runs the export of the shared ``assessed_run`` (2 patients, threads engine)
again on a real local Dask cluster of 2 worker processes (one patient's outputs removed first, so
that it is assessed afresh there, the other reused), kills the worker computing by its pid mid-
patient, and checks that every study is in cohort.csv and that the outputs are those of the
threads engine (benchmarks/compare_runs.py: cohort and error tables, every assessment.json and
timeline.json apart from timings, every label map exactly, subtraction within float32 noise).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import threading
import time
from pathlib import Path

from flows.engine import placement, task_runner_for, worker_threads
from pipeline.core.config import ExecutionConfig, load_config
from pipeline.run.log import ReportedEvents

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("compare_runs", ROOT / "benchmarks" / "compare_runs.py")
compare_runs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare_runs)


def test_the_engine_section_picks_the_task_runner():
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    threads = task_runner_for(ExecutionConfig(), workers=3)
    assert isinstance(threads, ThreadPoolTaskRunner)
    local = task_runner_for(ExecutionConfig(engine="dask"), workers=3)
    assert isinstance(local, DaskTaskRunner) and local.address is None
    assert local.cluster_kwargs["n_workers"] == 3 and local.cluster_kwargs["threads_per_worker"] == 1
    assert "resources" not in local.cluster_kwargs
    on_gpu = task_runner_for(ExecutionConfig(engine="dask"), workers=2, device="cuda")
    assert on_gpu.cluster_kwargs["resources"] == {"GPU": 1}
    remote = task_runner_for(ExecutionConfig(engine="dask", scheduler_address="tcp://10.0.0.5:8786"), workers=2)
    assert remote.address == "tcp://10.0.0.5:8786"


def test_a_cuda_patient_asks_for_the_gpu_resource_and_a_cpu_patient_for_none():
    import dask

    with placement("GPU", "cuda:0"):
        assert dask.get_annotations() == {"resources": {"GPU": 1}}
    with placement("GPU", "cpu"):
        assert dask.get_annotations() == {}
    with placement(None, "cuda"):
        assert dask.get_annotations() == {}


def test_worker_processes_share_the_cpus_out_and_a_given_count_wins(monkeypatch):
    import flows.engine

    monkeypatch.setattr(flows.engine, "usable_cpus", lambda: 8)
    assert worker_threads(ExecutionConfig(engine="dask"), workers=2) == 4
    assert worker_threads(ExecutionConfig(engine="dask"), workers=16) == 1
    assert worker_threads(ExecutionConfig(engine="dask", threads_per_worker=3), workers=2) == 3
    assert worker_threads(ExecutionConfig(engine="dask", scheduler_address="tcp://h:1"), workers=2) is None
    # The threads engine: each patient's thread gets its share too (torch's count is per thread).
    assert worker_threads(ExecutionConfig(), workers=2) == 4
    assert worker_threads(ExecutionConfig(), workers=1) == 8
    assert worker_threads(ExecutionConfig(threads_per_worker=3), workers=1) == 3


def test_a_thread_count_holds_inside_its_block_only():
    import torch

    from pipeline.core.devices import torch_threads

    before = torch.get_num_threads()
    with torch_threads(before + 2):
        assert torch.get_num_threads() == before + 2
        with torch_threads(None):
            assert torch.get_num_threads() == before + 2
    assert torch.get_num_threads() == before


def test_limiting_library_threads_reaches_simpleitk_and_torch():
    import SimpleITK as sitk
    import torch

    from pipeline.core.devices import limit_library_threads

    before = (sitk.ProcessObject.GetGlobalDefaultNumberOfThreads(), torch.get_num_threads())
    try:
        limit_library_threads(1)
        assert (sitk.ProcessObject.GetGlobalDefaultNumberOfThreads(), torch.get_num_threads()) == (1, 1)
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before[0])
        torch.set_num_threads(before[1])


def test_the_engine_changes_no_cache_key():
    cfg = load_config()
    moved = cfg.model_copy(update={"execution": ExecutionConfig(engine="dask", scheduler_address="tcp://h:1")})
    assert moved.digest() == cfg.digest()


def test_progress_recorded_on_a_worker_reaches_the_run_log(tmp_path):
    import pickle

    from pipeline.run.log import RunReporter
    from tests.helpers import study

    events = ReportedEvents()
    events.study_done(study("s1", 30), 2.5, timings={"register_intra": 1.0})
    events.patient_done("P1", 1, 0.4)
    events = pickle.loads(pickle.dumps(events))  # as it comes back from a worker process
    with RunReporter(tmp_path, echo=False) as reporter:
        events.replay(reporter)
    log = (tmp_path / "run.log").read_text()
    assert "imaging 2.5 s" in log and "patient P1: 1 studies" in log


def test_a_local_dask_cluster_writes_the_threads_engines_outputs_even_when_a_worker_dies(assessed_run):
    from distributed import Client, LocalCluster

    from flows.assess import run_assessment

    root, threads_out, _truth, threads_summary = assessed_run
    out = root / "out_dask"  # beside the threads run: compare_runs neutralises the run folder
    # One patient already assessed (the Dask task reuses it), the other assessed afresh on the
    # cluster: half the suite's time, and the worker killed is the one computing.
    shutil.copytree(threads_out, out)
    recomputed = sorted(p for p in (out / "patients").iterdir() if p.is_dir())[0]
    shutil.rmtree(recomputed)
    killed: dict[str, float | int] = {}
    finished = threading.Event()

    with LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        def kill_a_busy_worker():
            while not finished.is_set():
                busy = [addr for addr, tasks in client.processing().items() if tasks]
                if busy and any(recomputed.glob("*/")):  # mid-patient: a study folder written
                    pid = client.run(os.getpid, workers=[busy[0]])[busy[0]]
                    os.kill(pid, signal.SIGKILL)
                    killed.update(pid=pid, at=time.monotonic())
                    return
                time.sleep(0.2)

        killer = threading.Thread(target=kill_a_busy_worker, daemon=True)
        killer.start()
        summary = run_assessment(root / "data" / "export", out, root / "data" / "procedures.csv", workers=2,
                                 device="cpu", engine="dask", scheduler_address=cluster.scheduler_address)
        finished_at = time.monotonic()
        finished.set()
        killer.join(timeout=5)
        assert killed and killed["at"] < finished_at, "no worker was killed while the patients ran"
        assert killed["pid"] not in client.run(os.getpid).values()

    assert (summary["patients"], summary["studies"]) == (threads_summary["patients"], threads_summary["studies"])
    assert 0 < summary["studies_reused"] < summary["studies"]
    differences, compared = compare_runs.compare(threads_out, out, atol=1e-4)
    assert compared > 10
    assert not differences, "\n".join(differences)
