"""The `fedpt` command: the Typer app its commands register on, and the entry point that makes every error one
line (`fedpt: error: ...`, exit 2)."""

from __future__ import annotations

import sys
from typing import Annotated

import click
import typer

from fedpt import __version__
from fedpt.errors import FedptError
from fedpt.runtime import setup_process

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Federated proxy-tuning of large language models.")
models_app = typer.Typer(no_args_is_help=True, help="The offline model store.")
app.add_typer(models_app, name="models")


def _show_version(value: bool) -> None:
    if value:
        print(f"fedpt {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, typer.Option("--version", callback=_show_version, is_eager=True,
                                          help="Print fedpt's version and exit.")] = False,
) -> None:
    """Federated proxy-tuning of large language models."""


def main() -> None:
    setup_process()
    try:
        code = app(standalone_mode=False)
    except click.UsageError as e:  # bad options and arguments: one line, like every other error
        message = e.format_message()
        if message:  # empty when no arguments were given and the help was shown
            print(f"fedpt: error: {message}", file=sys.stderr)
        sys.exit(2)
    except (click.Abort, EOFError):
        print("fedpt: interrupted", file=sys.stderr)
        sys.exit(130)
    except FedptError as e:
        print(f"fedpt: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("fedpt: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
