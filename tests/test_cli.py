"""The command line: fast paths only (the flow itself runs in test_end_to_end.py)."""

from __future__ import annotations

import json

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
