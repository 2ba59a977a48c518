"""One patient, one run at a time (issue 20): pipeline/outputs/locks.py and assess_patient."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from pipeline.core.config import load_config
from pipeline.outputs.locks import PatientBusyError, patient_lock


def test_a_second_holder_waits_for_the_first(tmp_path):
    acquired = threading.Event()
    release = threading.Event()

    def first():
        with patient_lock(tmp_path, "P1-abcd", timeout_s=10):
            acquired.set()
            release.wait(10)

    thread = threading.Thread(target=first)
    thread.start()
    assert acquired.wait(10)
    threading.Timer(0.6, release.set).start()
    t0 = time.monotonic()
    with patient_lock(tmp_path, "P1-abcd", timeout_s=10, poll_s=0.05):
        waited = time.monotonic() - t0
    thread.join()
    assert waited >= 0.5
    with patient_lock(tmp_path, "P2-ef01", timeout_s=0):  # another patient is not held up
        pass


def test_a_holder_that_never_lets_go_makes_the_wait_give_up(tmp_path):
    with patient_lock(tmp_path, "P1-abcd", timeout_s=0):
        with pytest.raises(PatientBusyError, match="being assessed by another run"):
            with patient_lock(tmp_path, "P1-abcd", timeout_s=0.3, poll_s=0.05):
                pass


def test_the_lock_of_a_killed_process_is_free_at_once(tmp_path):
    code = ("import sys, time; from pathlib import Path; from pipeline.outputs.locks import patient_lock\n"
            "with patient_lock(Path(sys.argv[1]), 'P1-abcd', timeout_s=5):\n"
            "    print('held', flush=True); time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(PatientBusyError):
            with patient_lock(tmp_path, "P1-abcd", timeout_s=0):
                pass
        holder.kill()  # SIGKILL: no clean-up code runs
        holder.wait(10)
        with patient_lock(tmp_path, "P1-abcd", timeout_s=0):
            pass
    finally:
        holder.kill()


def test_assess_patient_holds_the_patients_lock_while_it_works(tmp_path):
    from pipeline.outputs.store import StudyStore
    from pipeline.run.patient import assess_patient
    from tests.helpers import study

    studies = [study("s1", 30), study("s2", 90)]
    name = StudyStore(tmp_path).patient_folder(studies[0]).name
    seen = []

    def imaging(study_record, cfg, out_dir, device):
        try:
            with patient_lock(out_dir, name, timeout_s=0):
                seen.append("free")
        except PatientBusyError:
            seen.append("held")
        raise OSError("no pixels in this test")

    result = assess_patient(studies, None, load_config(), tmp_path, imaging_fn=imaging)
    assert seen == ["held", "held"]
    assert [r.study_instance_uid for r in result.records] == ["s1", "s2"]
    assert all("no pixels in this test" in e.reason for e in result.errors)
    with patient_lock(tmp_path, name, timeout_s=0):  # released afterwards
        pass
