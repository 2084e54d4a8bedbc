"""Turning section data into HTML: one Jinja2 environment with autoescape on.

Report text comes from corpora, models and users (story prompts, decoded tokens, model names,
generated samples), so every value a template prints is escaped. The only exceptions are the
figures in :mod:`emoscope.report.plots`, which mark themselves safe because emoscope builds them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import jinja2

from emoscope.errors import MissingPackageError
from emoscope.files import atomic_write_text


@dataclass(frozen=True)
class Styled:
    """A table cell drawn with a CSS class, e.g. a target that is met or missed."""

    text: str
    css: str

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class Table:
    """Headers and rows of plain values; the ``table`` macro escapes every cell."""

    headers: list[str]
    rows: list[list[Any]]


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def mark(ok: bool) -> Styled:
    return Styled("met", "ok") if ok else Styled("not met", "miss")


@cache
def environment() -> jinja2.Environment:
    """Templates shipped in ``emoscope/report/templates``; a missing one is an install problem."""
    try:
        loader: jinja2.BaseLoader = jinja2.PackageLoader("emoscope.report", "templates")
    except ValueError:
        raise MissingPackageError(
            "emoscope's report templates are missing; reinstall with: pip install emoscope"
        ) from None
    env = jinja2.Environment(
        loader=loader,
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.tests["styled"] = lambda value: isinstance(value, Styled)
    return env


def render(template: str, **context: Any) -> str:
    try:
        return environment().get_template(template).render(**context)
    except jinja2.TemplateNotFound as exc:
        raise MissingPackageError(
            f"emoscope's report template {exc.name} is missing; reinstall with: pip install emoscope"
        ) from None


def write_page(path: Path, template: str, **context: Any) -> Path:
    """Render ``template`` and write it so that a reader never sees half a page."""
    return atomic_write_text(path, render(template, **context))
