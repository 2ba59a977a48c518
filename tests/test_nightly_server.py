"""The nightly deployment on a real Prefect server with a work pool and a process worker (issue 20).

``prefect server start`` on a free port, a process work pool, ``ablation-response deploy-nightly``
with a cron of every minute over the shared ``assessed_run`` export (its outputs copied to a new
folder), then ``prefect worker start``: the server's scheduler must create a run on the minute,
the worker must run it to Completed, and the run must do only what is new (nothing: every study
reused from the copied outputs). This is also the test that the server's scheduler works with the
pinned SQLAlchemy (with 2.1 it failed on every schedule, so no scheduled run ever fired).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait(predicate, timeout_s: float, what: str, poll_s: float = 1.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _flow_runs(url: str) -> list[dict]:
    request = urllib.request.Request(f"{url}/flow_runs/filter", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_a_scheduled_nightly_run_fires_on_a_prefect_server_and_does_only_what_is_new(assessed_run, tmp_path):
    root, threads_out, _truth, threads_summary = assessed_run
    out = tmp_path / "out"
    shutil.copytree(threads_out, out)  # every study already assessed: the run must reuse them all
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": url,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "WARNING"}
    processes = []
    try:
        server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        processes.append(server)
        _wait(lambda: _healthy(url), 180, "the Prefect server")
        subprocess.run([str(BIN / "prefect"), "work-pool", "create", "nightly-test", "--type", "process"],
                       env=env, check=True, capture_output=True, timeout=120)
        deployed = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "deploy-nightly", str(root / "data" / "export"), "--out", str(out),
             "--pool", "nightly-test", "--cron", "* * * * *", "--procedures", str(root / "data" / "procedures.csv"),
             "--workers", "2", "--device", "cpu", "--defer-seconds", "0"],  # the export is minutes old
            env=env, capture_output=True, text=True, timeout=300)
        assert deployed.returncode == 0, deployed.stderr
        assert "nightly-test" in deployed.stdout
        worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "nightly-test",
                                   "--type", "process"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        processes.append(worker)

        def completed_run():
            runs = [r for r in _flow_runs(url) if r["state_type"] == "COMPLETED"]
            return runs[0] if runs else None

        run = _wait(completed_run, 420, "a scheduled run to complete", poll_s=3)
        assert run["auto_scheduled"] is True  # created by the server's scheduler, not by hand
        summary = json.loads((out / "run_summary.json").read_text())
        assert summary["studies"] == threads_summary["studies"] > 0
        assert summary["studies_reused"] == summary["studies"]  # nothing new: nothing recomputed
        assert not [r for r in _flow_runs(url) if r["state_type"] in ("FAILED", "CRASHED")]
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
