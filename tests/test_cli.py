"""The command line: fast paths only (the flow itself runs in test_end_to_end.py)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from pipeline.cli import app

runner = CliRunner()


def test_help_lists_the_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("demo", "phantom", "assess", "serve-nightly"):
        assert command in result.output


def test_bad_procedures_file_is_a_clear_error_before_any_work(tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    procedures = tmp_path / "p.csv"
    procedures.write_text("patient_id,ablation_date\nA,not-a-date\n")
    result = runner.invoke(app, ["assess", str(export), "--out", str(tmp_path / "out"), "--procedures", str(procedures)])
    assert result.exit_code == 2
    assert "p.csv:2" in result.output and "ablation_date" in result.output
    assert not (tmp_path / "out").exists()


def test_bad_config_is_a_clear_error(tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    config = tmp_path / "c.yaml"
    config.write_text("enhancement:\n  relative_enhancement_threshold: 9\n")
    result = runner.invoke(app, ["assess", str(export), "--out", str(tmp_path / "out"), "--config", str(config)])
    assert result.exit_code == 2 and "relative_enhancement_threshold" in result.output


def test_phantom_command_writes_an_export_with_truth(tmp_path):
    result = runner.invoke(app, ["phantom", str(tmp_path / "d"), "--patients", "1", "--seed", "3"])
    assert result.exit_code == 0, result.output
    truth = json.loads((tmp_path / "d" / "truth.json").read_text())
    assert len(truth["patients"]) == 1 and (tmp_path / "d" / "procedures.csv").exists()
    assert any((tmp_path / "d" / "export").rglob("*"))


def test_nightly_deployment_is_scheduled_with_the_flow_parameters(tmp_path):
    from flows.assess import nightly_deployment

    deployment = nightly_deployment(tmp_path / "export", tmp_path / "out", "0 2 * * *", workers=2)
    assert deployment.name == "nightly"
    assert deployment.schedules[0].schedule.cron == "0 2 * * *"
    assert deployment.parameters["defer_recent_seconds"] == 300.0
    assert deployment.parameters["out_dir"] == str(tmp_path / "out")


# ----------------------------------------------------------------- inputs refused before any work (issue 18)
def _refused(args: list[str], code: int = 2) -> str:
    """Run the CLI; it must exit ``code`` with one line on stderr and no traceback."""
    result = runner.invoke(app, args)
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def _export_with_one_dicom(tmp_path):
    from tests.dicom_factory import write_sr

    export = tmp_path / "export"
    write_sr(export / "P1" / "doc.dcm")
    return export


def test_a_typo_in_the_config_names_the_key_and_the_file(tmp_path):
    export = _export_with_one_dicom(tmp_path)
    config = tmp_path / "site.yaml"
    config.write_text("foci:\n  min_focus_thickness_mmm: 4\n")
    line = _refused(["assess", str(export), "--out", str(tmp_path / "out"), "--config", str(config)])
    assert "foci.min_focus_thickness_mmm" in line and str(config) in line and "unknown config key" in line
    assert not (tmp_path / "out").exists()


def test_malformed_yaml_is_one_line_with_its_position(tmp_path):
    export = _export_with_one_dicom(tmp_path)
    config = tmp_path / "site.yaml"
    config.write_text("foci:\n  min_thickness_mm: 5\n  max: c: 2\n")
    line = _refused(["assess", str(export), "--out", str(tmp_path / "out"), "--config", str(config)])
    assert "not valid YAML" in line and str(config) in line and "line 3" in line


def test_an_invalid_device_is_refused_before_the_flow(tmp_path, monkeypatch):
    import flows.assess

    export = _export_with_one_dicom(tmp_path)
    monkeypatch.setattr(flows.assess, "run_assessment", lambda *a, **k: pytest.fail("the flow started"))
    line = _refused(["assess", str(export), "--out", str(tmp_path / "out"), "--device", "gpu"])
    assert "--device" in line and "'gpu'" in line
    assert not (tmp_path / "out").exists()


def test_cuda_without_a_gpu_is_refused_before_the_flow(tmp_path, monkeypatch):
    import torch

    import flows.assess

    export = _export_with_one_dicom(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(flows.assess, "run_assessment", lambda *a, **k: pytest.fail("the flow started"))
    line = _refused(["assess", str(export), "--out", str(tmp_path / "out"), "--device", "cuda"])
    assert "no CUDA device" in line
    assert not (tmp_path / "out").exists()


def test_out_inside_the_export_is_refused(tmp_path):
    export = _export_with_one_dicom(tmp_path)
    line = _refused(["assess", str(export), "--out", str(export / "results")])
    assert "inside the export" in line
    assert not (export / "results").exists()
    _refused(["assess", str(export), "--out", str(export)])


def test_out_an_existing_file_is_refused(tmp_path):
    export = _export_with_one_dicom(tmp_path)
    (tmp_path / "out").write_text("x")
    line = _refused(["assess", str(export), "--out", str(tmp_path / "out")])
    assert "existing file" in line and str(tmp_path / "out") in line


def test_an_unwritable_output_folder_is_named(tmp_path, monkeypatch):
    import pipeline.run.inputs

    export = _export_with_one_dicom(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    # The tests may run as root, for whom chmod locks nothing: the check (os.access) is replaced.
    real = pipeline.run.inputs._writable
    monkeypatch.setattr(pipeline.run.inputs, "_writable", lambda folder: folder != locked and real(folder))
    line = _refused(["assess", str(export), "--out", str(locked / "out")])
    assert "permission denied" in line and str(locked) in line
    line = _refused(["assess", str(export), "--out", str(locked)])
    assert "cannot write to the output folder" in line and str(locked) in line


def test_an_export_without_dicom_says_so_and_fails(tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    (export / "README.txt").write_text("nothing here\n" * 20)
    line = _refused(["assess", str(export), "--out", str(tmp_path / "out")], code=1)
    assert "no DICOM file found" in line and str(export) in line
    assert not (tmp_path / "out").exists()


def test_serve_nightly_on_a_still_empty_export_warns_and_serves(tmp_path, monkeypatch):
    import flows.assess

    export = tmp_path / "export"
    export.mkdir()
    served = []
    monkeypatch.setattr(flows.assess, "serve_nightly", lambda *args: served.append(args))
    result = runner.invoke(app, ["serve-nightly", str(export), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "warning: no DICOM file found" in result.stderr and len(served) == 1
    refused = runner.invoke(app, ["serve-nightly", str(export), "--out", str(tmp_path / "out"), "--device", "gpu"])
    assert refused.exit_code == 2 and len(served) == 1


def test_version_and_serve_nightly_help():
    from pipeline import __version__

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"ablation-response {__version__}"
    helped = runner.invoke(app, ["serve-nightly", "--help"], terminal_width=200)
    assert helped.exit_code == 0
    for words in ("cron schedule", "patients processed in parallel", "where the network runs",
                  "still being copied", "PACS export directory"):
        assert words in helped.output, words


def test_prefect_telemetry_is_off_in_the_project_settings():
    import os

    from prefect.settings import get_current_settings

    import flows  # noqa: F401 - sets Prefect's environment before Prefect is imported

    settings = get_current_settings()
    assert settings.server.analytics_enabled is False
    assert settings.cloud.enable_orchestration_telemetry is False
    assert os.environ["DO_NOT_TRACK"] == "1"  # Prefect's client-side SDK analytics


def test_sigterm_stops_the_nightly_runner_like_ctrl_c_without_an_unawaited_coroutine():
    """Prefect's handler calls Runner.stop() inside the loop: 'coroutine Runner.astop was never awaited'."""
    import asyncio
    import gc
    import warnings

    from flows.assess import graceful_runner

    runner = graceful_runner()

    async def in_the_loop():
        runner.handle_sigterm()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(KeyboardInterrupt):
            asyncio.run(in_the_loop())
        gc.collect()
    assert not [w for w in caught if "never awaited" in str(w.message)]


def test_the_results_table_is_readable_at_80_columns():
    """Issue 18: at 80 columns the IDs read "ABL-…" and the reasons were cut mid-word."""
    import io

    from rich.console import Console

    from pipeline.cli import cohort_table

    reason = ("rim_persisting: enhancing rim over 300 deg on day 400 (expected within 208 days);"
              "residual_unablated_tumour: nodular focus 14.2 mm thick at the margin")
    rows = [{"patient_id": f"ABL-{i:04d}-LONGID", "study_date": "2024-05-01", "timepoint": "follow_up",
             "category": "suspected_local_tumour_progression", "flagged": "true", "flag_reasons": reason,
             "az_long_axis_mm": "35.21", "az_short_axis_mm": "28.04", "az_volume_ml": "15.33"} for i in range(3)]
    console = Console(width=80, file=io.StringIO(), color_system=None)
    console.print(cohort_table(rows, "3 studies"))
    text = console.file.getvalue()
    assert all(len(line) <= 80 for line in text.splitlines())
    assert "…" not in text
    for row in rows:
        assert row["patient_id"] in text
    words = set(text.split())
    for word in reason.replace(";", " ").replace("_", " ").split():
        assert word in words or word + ";" in words, word  # wrapped at spaces, no word cut
    assert "35.21/28.04" in words and "suspected" in words


def test_an_unknown_engine_is_refused_before_the_flow(tmp_path, monkeypatch):
    import flows.assess

    export = _export_with_one_dicom(tmp_path)
    monkeypatch.setattr(flows.assess, "run_assessment", lambda *a, **k: pytest.fail("the flow started"))
    line = _refused(["assess", str(export), "--out", str(tmp_path / "out"), "--engine", "spark"])
    assert "--engine" in line and "threads, dask" in line
    assert not (tmp_path / "out").exists()


def test_a_scheduler_nobody_answers_or_mistyped_is_refused_before_the_flow(tmp_path, monkeypatch):
    import socket

    import flows.assess

    export = _export_with_one_dicom(tmp_path)
    monkeypatch.setattr(flows.assess, "run_assessment", lambda *a, **k: pytest.fail("the flow started"))
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    line = _refused(["assess", str(export), "--out", str(tmp_path / "out"), "--scheduler", f"tcp://127.0.0.1:{port}"])
    assert "no Dask scheduler answers" in line
    line = _refused(["assess", str(export), "--out", str(tmp_path / "out"), "--scheduler", "tcp://host"])
    assert "expected tcp://host:port" in line
    line = _refused(["assess", str(export), "--out", str(tmp_path / "out"), "--engine", "threads",
                     "--scheduler", f"tcp://127.0.0.1:{port}"])
    assert "--scheduler needs --engine dask" in line
    # The config's scheduler is checked the same way.
    config = tmp_path / "site.yaml"
    config.write_text(f"execution:\n  engine: dask\n  scheduler_address: tcp://127.0.0.1:{port}\n")
    line = _refused(["assess", str(export), "--out", str(tmp_path / "out"), "--config", str(config)])
    assert "no Dask scheduler answers" in line
    assert not (tmp_path / "out").exists()
