"""CLI commands of the review: ``review``, ``review-export``, ``review-user``, ``review-sync``.

Registered on the main typer app by ``pipeline/cli.py``; imports of the web stack are inside
the commands so that ``ablation-response assess`` does not pay for them.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console


def register(app: typer.Typer, console: Console) -> None:
    @app.command()
    def review(
        out: Annotated[Path, typer.Option("--out", exists=True, file_okay=False, help="a run's output folder")],
        users: Annotated[Optional[Path], typer.Option(exists=True, dir_okay=False,
                                                      help="user file (default: OUT/review_users.txt)")] = None,
        db_url: Annotated[Optional[str], typer.Option(help="database URL (default: sqlite OUT/review.sqlite)")] = None,
        host: Annotated[str, typer.Option(help="address to listen on (keep 127.0.0.1 behind a TLS proxy)")] = "127.0.0.1",
        port: Annotated[int, typer.Option(min=1, max=65535)] = 8765,
        insecure_http: Annotated[bool, typer.Option(
            "--insecure-http", help="send the session cookie over plain HTTP too (a trusted host only; "
            "by default the cookie is Secure: HTTPS, or http://localhost in current browsers)")] = False,
        https_only: Annotated[bool, typer.Option(help="the default (kept for old scripts)", hidden=True)] = True,
    ) -> None:
        """Serve the radiologist's review web app over a run's outputs."""
        import uvicorn

        from pipeline.review.app import create_app
        from pipeline.review.auth import UserFileError

        users_file = users or out / "review_users.txt"
        try:
            web = create_app(out, users_file, db_url=db_url, https_only=not insecure_http)
        except (UserFileError, FileNotFoundError) as exc:
            console.print(f"[red]error:[/red] {exc}\nadd a user first: ablation-response review-user {users_file} NAME")
            raise typer.Exit(code=2) from None
        # Browsers keep a Secure cookie from http://localhost (a secure context), not from other http hosts.
        shown = "localhost" if host == "127.0.0.1" else host
        scheme = "http" if insecure_http or shown == "localhost" else "https (behind your TLS proxy)"
        console.print(f"review app on {scheme}://{shown}:{port}/  (users: {users_file})")
        uvicorn.run(web, host=host, port=port, log_level="info")

    @app.command("review-export")
    def review_export(
        out: Annotated[Path, typer.Option("--out", exists=True, file_okay=False, help="a run's output folder")],
        db_url: Annotated[Optional[str], typer.Option(help="database URL (default: sqlite OUT/review.sqlite)")] = None,
        to: Annotated[Optional[Path], typer.Option(help="CSV to write (default: OUT/review_export.csv)")] = None,
    ) -> None:
        """Export the adjudicated results (every worklist item with its verdict) as CSV."""
        from pipeline.review.db import database_url, export_csv, open_engine

        engine = open_engine(database_url(out, db_url))
        path = export_csv(engine, to or out / "review_export.csv")
        console.print(f"wrote {path}")

    @app.command("review-user")
    def review_user(
        users_file: Annotated[Path, typer.Argument(dir_okay=False, help="user file to create or update")],
        username: Annotated[str, typer.Argument(help="user name (letters, digits, . _ @ -)")],
        password_stdin: Annotated[bool, typer.Option(help="read the password from standard input")] = False,
    ) -> None:
        """Add a user (or change a password) in the review app's user file (salted scrypt hash)."""
        from pipeline.review.auth import UserFileError, add_user

        if password_stdin:
            password = sys.stdin.readline().rstrip("\n")
        else:
            password = typer.prompt("password", hide_input=True, confirmation_prompt=True)
        try:
            add_user(users_file, username, password)
        except (ValueError, UserFileError) as exc:
            console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(code=2) from None
        console.print(f"user {username} saved in {users_file}")

    @app.command("review-sync")
    def review_sync(
        out: Annotated[Path, typer.Option("--out", exists=True, file_okay=False, help="a run's output folder")],
        db_url: Annotated[Optional[str], typer.Option(help="database URL (default: sqlite OUT/review.sqlite)")] = None,
    ) -> None:
        """Put the flagged studies of a run already on disk on the worklist (the flow does this itself)."""
        from pipeline.review.sync import records_of_run, review_after_run

        _, result = review_after_run(out, records_of_run(out), db_url)
        console.print(f"worklist: {result.added} added, {result.updated} refreshed, "
                      f"{result.kept_adjudicated} adjudicated kept as they are")
