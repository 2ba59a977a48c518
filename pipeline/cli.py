"""Command line: ``ablation-response demo | phantom | assess | serve-nightly``."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Annotated, NoReturn, Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="MRI follow-up after percutaneous ablation: IWG-IGTA call per study.")
console = Console()
# Outside a terminal (CI logs, pipes) rich assumes 80 columns and folds every cell.
table_console = console if console.is_terminal else Console(width=170)


def cohort_table(rows: list[dict[str, str]], title: str = "") -> Table:
    """cohort.csv's rows as a table readable at 80 columns: IDs and dates never cut, the call and
    the flag reasons in words, wrapped at word boundaries (never cut)."""
    from rich import box

    table = Table(title=title, box=box.SIMPLE, pad_edge=False, expand=True)
    width = max([len("patient")] + [len(r["patient_id"]) for r in rows])
    table.add_column("patient", no_wrap=True, min_width=width)
    table.add_column("date", no_wrap=True, min_width=10)
    table.add_column("call", ratio=2, overflow="fold")
    table.add_column("axes mm\nvol mL", justify="right", no_wrap=True)
    table.add_column("flagged: why", ratio=3, overflow="fold")
    for r in rows:
        call = f"{r['timepoint'].replace('_', ' ')}: {r['category'].replace('_', ' ')}"
        size = f"{r['az_long_axis_mm']}/{r['az_short_axis_mm']}\n{r['az_volume_ml']}" if r["az_long_axis_mm"] else ""
        reasons = "; ".join(part.strip().replace("_", " ") for part in r["flag_reasons"].split(";") if part.strip())
        if r["flagged"] == "true" and not reasons:
            reasons = "yes"
        table.add_row(r["patient_id"], r["study_date"], call, size, reasons)
    return table


def print_cohort(out_dir: Path) -> None:
    """Print cohort.csv as a table."""
    with (out_dir / "cohort.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    table_console.print(cohort_table(rows, f"{len(rows)} studies  ->  {out_dir / 'cohort.csv'}"))


def _fail(message: str, code: int = 2) -> NoReturn:
    """One line on stderr, no traceback, a non-zero exit."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=code)


def _check_inputs(procedures: Path | None, config: Path | None) -> None:
    """Fail fast, with the reason, on a bad procedures file or config (before any work)."""
    from pipeline.run.inputs import RunInputError, check_config, check_procedures

    try:
        check_config(config)
        check_procedures(procedures)
    except RunInputError as exc:
        _fail(str(exc))


def _check_run(export_dir: Path, out: Path, procedures: Path | None, config: Path | None, device: str,
               *, require_dicom: bool, engine: str | None = None, scheduler: str | None = None) -> None:
    """Every input of a run checked before Prefect starts and before ``out`` is created."""
    from pipeline.run.inputs import RunInputError, check_export_has_dicom, check_run_inputs

    try:
        check_run_inputs(export_dir, out, procedures, config, device, engine, scheduler)
    except RunInputError as exc:
        _fail(str(exc))
    try:
        check_export_has_dicom(export_dir, out)
    except RunInputError as exc:
        if require_dicom:
            _fail(str(exc), code=1)
        # The nightly deployment may be set up before the first study arrives.
        typer.echo(f"warning: {exc}; the nightly run will look again", err=True)


def _version(value: bool) -> None:
    if value:
        from pipeline import __version__

        typer.echo(f"ablation-response {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="print the version and exit")] = False,
) -> None:
    """MRI follow-up after percutaneous ablation: IWG-IGTA call per study."""


DEVICE_HELP = "where the network runs: auto (CUDA when usable, else CPU) | cpu | cuda (refused without a CUDA device)"
ENGINE_HELP = ("where patients run: threads (this process) | dask (worker processes: a local cluster of --workers, "
               "or --scheduler's); default: the config's execution.engine (docs/cluster.md)")
SCHEDULER_HELP = "tcp://host:port of an existing Dask scheduler (implies --engine dask)"


@app.command()
def phantom(
    out: Annotated[Path, typer.Argument(help="folder to write export/, truth.json, procedures.csv into")],
    patients: Annotated[int, typer.Option(min=1, help="number of patients")] = 8,
    seed: Annotated[int, typer.Option(help="random seed (same seed, same export)")] = 0,
    profile: Annotated[str, typer.Option(help="generator settings: default | heldout")] = "default",
    messy: Annotated[bool, typer.Option(help="mix vendors, transfer syntaxes, multi-frame files and defects")] = False,
) -> None:
    """Generate a synthetic PACS export with ground truth."""
    from phantom import generate_export

    truth = generate_export(out, patients, seed, profile=profile, messy=messy)
    n = sum(len(p["studies"]) for p in truth["patients"])
    console.print(f"wrote {len(truth['patients'])} patients, {n} studies to {out}/export "
                  f"(truth: {out}/truth.json, procedures: {out}/procedures.csv)")


@app.command()
def assess(
    export_dir: Annotated[Path, typer.Argument(exists=True, file_okay=False, help="PACS export directory")],
    out: Annotated[Path, typer.Option("--out", help="output directory")],
    procedures: Annotated[Optional[Path], typer.Option(exists=True, dir_okay=False, help="patient_id,ablation_date CSV")] = None,
    config: Annotated[Optional[Path], typer.Option(exists=True, dir_okay=False, help="YAML merged over configs/default.yaml")] = None,
    workers: Annotated[int, typer.Option(min=1, help="patients processed in parallel")] = 1,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
    engine: Annotated[Optional[str], typer.Option(help=ENGINE_HELP)] = None,
    scheduler: Annotated[Optional[str], typer.Option(help=SCHEDULER_HELP)] = None,
) -> None:
    """Assess every study of a PACS export (batch Prefect flow)."""
    _check_run(export_dir, out, procedures, config, device, require_dicom=True, engine=engine, scheduler=scheduler)
    from flows.assess import run_assessment

    summary = run_assessment(export_dir, out, procedures, config, workers, device, show_progress=True,
                             engine=engine, scheduler_address=scheduler)
    print_cohort(out)
    console.print(f"{summary['studies']} studies ({summary['studies_reused']} reused), {summary['flagged']} flagged, "
                  f"{summary['errors']} rows in errors.csv, {summary['seconds']} s")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="folder for the generated export and the outputs")] = Path("demo_out"),
    patients: Annotated[int, typer.Option(min=1)] = 4,
    seed: Annotated[int, typer.Option()] = 7,
    workers: Annotated[int, typer.Option(min=1)] = 2,
) -> None:
    """Generate the bundled synthetic export and assess it (the README's first command)."""
    from flows.assess import run_assessment
    from phantom import generate_export

    data = out / "data"
    if not (data / "truth.json").exists():
        console.print(f"generating a synthetic export of {patients} patients in {data} ...")
        generate_export(data, patients, seed)
    summary = run_assessment(data / "export", out / "results", data / "procedures.csv", None, workers, "auto",
                             show_progress=True)
    print_cohort(out / "results")
    console.print(f"{summary['studies']} studies, {summary['flagged']} flagged, {summary['seconds']} s. "
                  f"Outputs in {out / 'results'}; ground truth in {data / 'truth.json'}.")


@app.command("deploy-nightly")
def deploy_nightly(
    export_dir: Annotated[Path, typer.Argument(exists=True, file_okay=False, help="PACS export directory, re-read at every run")],
    out: Annotated[Path, typer.Option("--out", help="output directory (outputs, catalogue, run.log), outside the export")],
    pool: Annotated[str, typer.Option("--pool", help="work pool of the Prefect server whose workers run the flow")],
    cron: Annotated[str, typer.Option(help="cron schedule of the runs, in the server's time zone (default: 02:00 every night)")] = "0 2 * * *",
    procedures: Annotated[Optional[Path], typer.Option(exists=True, dir_okay=False, help="patient_id,ablation_date CSV, re-read at every run")] = None,
    config: Annotated[Optional[Path], typer.Option(exists=True, dir_okay=False, help="YAML merged over configs/default.yaml")] = None,
    workers: Annotated[int, typer.Option(min=1, help="patients processed in parallel")] = 1,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
    defer_seconds: Annotated[float, typer.Option(help="defer studies with files changed this recently (s): an export still being copied")] = 300.0,
    engine: Annotated[Optional[str], typer.Option(help=ENGINE_HELP)] = None,
    scheduler: Annotated[Optional[str], typer.Option(help=SCHEDULER_HELP)] = None,
) -> None:
    """Register the nightly deployment with the Prefect server at PREFECT_API_URL (a worker of --pool runs it).

    Returns at once; `prefect worker start --pool NAME` runs the scheduled runs (docs/operations.md).
    """
    from pipeline.run.inputs import RunInputError, check_prefect_server

    _check_run(export_dir, out, procedures, config, device, require_dicom=False, engine=engine, scheduler=scheduler)
    try:
        url = check_prefect_server(pool)
    except RunInputError as exc:
        _fail(str(exc))
    from flows.assess import deploy_nightly as deploy

    deployment_id = deploy(export_dir.resolve(), out.resolve(), cron, pool,
                           procedures.resolve() if procedures else None, config.resolve() if config else None,
                           workers, device, defer_seconds, engine, scheduler)
    console.print(f"deployment 'assess-export/nightly' ({deployment_id}) on {url}, work pool {pool!r}, cron {cron!r}; "
                  f"start a worker: prefect worker start --pool {pool}")


@app.command("serve-nightly")
def serve_nightly(
    export_dir: Annotated[Path, typer.Argument(exists=True, file_okay=False, help="PACS export directory, re-read at every run")],
    out: Annotated[Path, typer.Option("--out", help="output directory (outputs, catalogue, run.log), outside the export")],
    cron: Annotated[str, typer.Option(help="cron schedule of the runs, in the server's local time (default: 02:00 every night)")] = "0 2 * * *",
    procedures: Annotated[Optional[Path], typer.Option(exists=True, dir_okay=False, help="patient_id,ablation_date CSV, re-read at every run")] = None,
    config: Annotated[Optional[Path], typer.Option(exists=True, dir_okay=False, help="YAML merged over configs/default.yaml")] = None,
    workers: Annotated[int, typer.Option(min=1, help="patients processed in parallel")] = 1,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
    defer_seconds: Annotated[float, typer.Option(help="defer studies with files changed this recently (s): an export still being copied")] = 300.0,
    engine: Annotated[Optional[str], typer.Option(help=ENGINE_HELP)] = None,
    scheduler: Annotated[Optional[str], typer.Option(help=SCHEDULER_HELP)] = None,
) -> None:
    """Serve a scheduled Prefect deployment that re-reads the export (only new studies are processed).

    Blocks until stopped (Ctrl-C or SIGTERM); docs/operations.md shows it as a systemd service.
    """
    _check_run(export_dir, out, procedures, config, device, require_dicom=False, engine=engine, scheduler=scheduler)
    from flows.assess import serve_nightly as serve

    serve(export_dir, out, cron, procedures, config, workers, device, defer_seconds, engine, scheduler)


def _checked_catalogue(catalogue: str, config: Path | None):
    """The ingest section with ``catalogue_url`` set when ``catalogue`` is a database URL
    (checked: the database answers), else as configured."""
    from pipeline.core.config import load_config
    from pipeline.ingest.catalogue import is_database_url
    from pipeline.run.inputs import RunInputError, check_catalogue

    ingest = load_config(config).ingest
    if not is_database_url(catalogue):
        return ingest.model_copy(update={"catalogue_url": None})
    ingest = ingest.model_copy(update={"catalogue_url": catalogue, "pseudonymise_patient_ids": False})
    try:
        check_catalogue(ingest)
    except RunInputError as exc:
        _fail(str(exc).replace("ingest.catalogue_url", "--catalogue"))
    return ingest


@app.command()
def index(
    export_dir: Annotated[Path, typer.Argument(exists=True, file_okay=False, help="PACS export directory")],
    catalogue: Annotated[str, typer.Option(help="SQLite catalogue file, or a postgresql+psycopg:// URL, to create "
                                                "or update")] = "catalogue.sqlite",
    config: Annotated[Optional[Path], typer.Option(exists=True, dir_okay=False)] = None,
    workers: Annotated[Optional[int], typer.Option(min=1, help="header-reading processes")] = None,
) -> None:
    """Index an export into the catalogue (only new or changed files are read) and summarise it."""
    _check_inputs(None, config)
    from pipeline.ingest.catalogue import display_location
    from pipeline.ingest.catalogue_view import errors_table, index_summary_table
    from pipeline.ingest.index import index_export

    ingest = _checked_catalogue(catalogue, config)
    res = index_export(export_dir, ingest.catalogue_url or Path(catalogue), ingest, workers=workers)
    table_console.print(index_summary_table(res, export_dir, display_location(catalogue)))
    if res.errors:
        table_console.print(errors_table(res.errors))


@app.command()
def catalog(
    catalogue: Annotated[str, typer.Option(help="SQLite catalogue file, or a postgresql+psycopg:// URL, written by "
                                                "`index` or `assess`")] = "catalogue.sqlite",
    config: Annotated[Optional[Path], typer.Option(exists=True, dir_okay=False)] = None,
) -> None:
    """Print the catalogue: patients, studies, series and their roles (no file is read)."""
    _check_inputs(None, config)
    from pipeline.ingest.catalogue import CatalogueNotFound
    from pipeline.ingest.catalogue_view import catalogue_table, group_catalogue

    ingest = _checked_catalogue(catalogue, config)
    try:
        studies, _ = group_catalogue(ingest.catalogue_url or Path(catalogue), ingest)
    except CatalogueNotFound as exc:
        _fail(str(exc))
    table_console.print(catalogue_table(studies))


# Review commands: the bodies live in pipeline/review/cli_commands.py (one module, one job).
from pipeline.review.cli_commands import register as _register_review_commands  # noqa: E402

_register_review_commands(app, console)

# Training of the segmentation network: body in flows/train_cli.py.
from flows.train_cli import register as _register_train_command  # noqa: E402

_register_train_command(app, console)


if __name__ == "__main__":
    app()
