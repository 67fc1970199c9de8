"""The `quotagate` command line: one Typer app whose commands live in small modules.

Each command module has a ``register(app)`` function; :data:`COMMAND_MODULES` lists them.
Errors QuotaGate raises on purpose are printed as one red ``error:`` line on stderr,
never as a traceback: exit status 2 for bad input, 1 for everything else.
"""

from __future__ import annotations

import importlib
import sqlite3
import tomllib
from typing import Annotated, Any

import pydantic
import sqlalchemy.exc
import typer
from rich.markup import escape
from typer.core import TyperGroup

from quotagate.admin.common import CliState, database_url, err
from quotagate.core.errors import InvalidInput, QuotaGateError, UnknownModel, UnknownTicket
from quotagate.core.text import masked

#: Errors that mean "you typed something QuotaGate cannot accept": exit status 2.
BAD_INPUT = (InvalidInput, UnknownModel, UnknownTicket)

#: The modules whose ``register(app)`` adds commands, in the order `--help` lists them.
#: To add commands, write a module with ``register(app: typer.Typer) -> None`` and add
#: ONE line here.
COMMAND_MODULES: tuple[str, ...] = (
    "quotagate.admin.cli_setup",  # init, demo
    "quotagate.admin.cli_catalog",  # limits, users, groups, pools, wallet
    "quotagate.admin.cli_prices",  # prices
    "quotagate.admin.cli_reports",  # usage, status, reconcile, sweep
    "quotagate.admin.cli_gateway",  # serve, keys, channels
)


def fail(message: str, code: int) -> typer.Exit:
    """Print one ``error:`` line (passwords in URLs masked, never several lines)."""
    line = " ".join(masked(message).split())
    err.print(f"[bold red]error:[/bold red] {escape(line)}", soft_wrap=True)
    return typer.Exit(code)


class QuotaGateGroup(TyperGroup):
    """The root command: turns expected errors of any sub-command into an exit status."""

    def invoke(self, ctx: Any) -> Any:  # typer's own (vendored) click.Context
        try:
            return super().invoke(ctx)
        except BAD_INPUT as exc:
            raise fail(str(exc), 2) from None
        except QuotaGateError as exc:
            raise fail(str(exc), 1) from None
        except pydantic.ValidationError as exc:
            raise fail(f"invalid configuration: {_validation_message(exc)}", 1) from None
        except tomllib.TOMLDecodeError as exc:
            raise fail(f"invalid configuration file: {exc}", 1) from None
        except (sqlalchemy.exc.SQLAlchemyError, sqlite3.Error) as exc:
            raise fail(f"database error: {_first_line(exc)}", 1) from None
        except (typer.TyperException, typer.Exit, typer.Abort):
            raise  # usage errors, --help, exit codes: typer reports them itself
        except Exception as exc:  # a bug: still one line and an exit status, not a traceback
            raise fail(f"unexpected {type(exc).__name__}: {_first_line(exc)}", 1) from None


def _validation_message(exc: pydantic.ValidationError) -> str:
    parts = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"])
        parts.append(f"QUOTAGATE_{field.upper()}: {error['msg']}")
    return "; ".join(parts)


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc)
    return text.splitlines()[0] if text else type(exc).__name__


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"quotagate {version('quotagate')}")
        raise typer.Exit()


app = typer.Typer(
    cls=QuotaGateGroup,
    name="quotagate",
    help="Token quotas in front of large language models.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)


@app.callback()
def root(
    ctx: typer.Context,
    database: Annotated[
        str | None,
        typer.Option(
            "--database",
            "-d",
            help="database URL or SQLite file; default: QUOTAGATE_DATABASE_URL, "
            "quotagate.toml, else sqlite:///quotagate.db",
            show_default=False,
        ),
    ] = None,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="print the version"),
    ] = False,
) -> None:
    """Token quotas in front of large language models.

    Start with `quotagate init`, then set allowances with `quotagate limits set`.
    """
    ctx.obj = CliState(database_url(database) if database else None)


for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(app)


def main() -> None:
    """Entry point of the `quotagate` console script."""
    app(prog_name="quotagate")
