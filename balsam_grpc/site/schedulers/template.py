"""Batch-script templates, rendered with Jinja2 (pure).

`{{ name }}` is the value (None renders as ""), and `{% if name %} ... {% else %} ... {% endif %}`
blocks leave out lines such as `#SBATCH -A` when there is no project; a line holding only a
block tag disappears with its newline. A name the template prints but nothing provides is
an error naming it, never an empty line in a script a scheduler would misread (a name
only tested by `{% if %}` is false when missing). The values are the site's own settings
and checked batch-job fields; the one free-form part, scheduler directives, is checked
where it is rendered (`render_directives`).
"""

from __future__ import annotations

from typing import Any, NoReturn

import jinja2
from jinja2 import meta

from balsam_grpc.core.errors import InvalidArgument


class TemplateError(InvalidArgument):
    default_reason = "BAD_TEMPLATE"


class _MissingName(jinja2.StrictUndefined):
    """Printing a missing name fails; testing it in {% if %} is false."""

    def __bool__(self) -> bool:
        return False


_ENV = jinja2.Environment(undefined=_MissingName, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                          autoescape=False, finalize=lambda value: "" if value is None else value)


def _refuse(exc: jinja2.TemplateError, context: dict | None = None) -> NoReturn:
    line = f"line {exc.lineno}: " if isinstance(exc, jinja2.TemplateSyntaxError) and exc.lineno else ""
    known = f" (known: {', '.join(sorted(context))})" if context is not None else ""
    raise TemplateError(f"batch script template: {line}{exc.message or exc}{known}") from None


def template_names(template_text: str) -> set[str]:
    """Every name the template uses (placeholders and conditions)."""
    try:
        return set(meta.find_undeclared_variables(_ENV.parse(template_text)))
    except jinja2.TemplateError as exc:
        _refuse(exc)


def render_template(template_text: str, context: dict[str, Any]) -> str:
    try:
        return _ENV.from_string(template_text).render(context)
    except jinja2.UndefinedError as exc:
        _refuse(exc, context)
    except jinja2.TemplateError as exc:
        _refuse(exc)
