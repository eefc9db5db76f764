"""A tiny, pure template renderer for batch scripts.

Supported: `{{ name }}` (the value; None renders as ""), and blocks
`{% if name %} ... {% else %} ... {% endif %}` (nestable; true when the value is truthy), so a
template can leave out `#SBATCH -A` when there is no project. A line holding only a block
tag disappears with its newline. Nothing else: no expressions, no filters, no loops.
A placeholder whose name is not in the context is an error naming it, never an empty line
in a script that a scheduler would misread.
"""

from __future__ import annotations

import re

from balsam_grpc.core.errors import InvalidArgument

_TOKEN = re.compile(
    r"(?P<tagline>^[ \t]*\{%\s*(?P<lkw>if|else|endif)\b\s*(?P<lname>[A-Za-z_][A-Za-z0-9_]*)?\s*%\}[ \t]*(?:\n|$))"
    r"|(?P<tag>\{%\s*(?P<kw>if|else|endif)\b\s*(?P<name>[A-Za-z_][A-Za-z0-9_]*)?\s*%\})"
    r"|(?P<var>\{\{\s*(?P<var_name>[A-Za-z_][A-Za-z0-9_]*)\s*\}\})",
    re.MULTILINE,
)


class TemplateError(InvalidArgument):
    default_reason = "BAD_TEMPLATE"


def template_names(template_text: str) -> set[str]:
    """Every name the template uses (placeholders and conditions)."""
    names = set()
    for m in _TOKEN.finditer(template_text):
        n = m.group("var_name") or m.group("lname") or m.group("name")
        if n:
            names.add(n)
    return names


def render_template(template_text: str, context: dict) -> str:
    out: list[str] = []
    # Stack of (condition value, in_else, parent_emitting) for open if-blocks.
    stack: list[tuple[bool, bool, bool]] = []
    emitting = True
    pos = 0
    for m in _TOKEN.finditer(template_text):
        if emitting:
            out.append(template_text[pos:m.start()])
        pos = m.end()
        if m.group("var"):
            if emitting:
                name = m.group("var_name")
                if name not in context:
                    raise TemplateError(f"batch script template uses {{{{ {name} }}}} but nothing provides it "
                                        f"(known: {', '.join(sorted(context))})", field=name)
                value = context[name]
                out.append("" if value is None else str(value))
            continue
        kw = m.group("lkw") or m.group("kw")
        name = m.group("lname") or m.group("name")
        line = template_text.count("\n", 0, m.start()) + 1
        if kw == "if":
            if not name:
                raise TemplateError(f"line {line}: {{% if %}} needs a name")
            cond = bool(context.get(name))
            stack.append((cond, False, emitting))
            emitting = emitting and cond
        elif kw == "else":
            if not stack or stack[-1][1]:
                raise TemplateError(f"line {line}: {{% else %}} without an open {{% if %}}")
            cond, _, parent = stack[-1]
            stack[-1] = (cond, True, parent)
            emitting = parent and not cond
        else:  # endif
            if not stack:
                raise TemplateError(f"line {line}: {{% endif %}} without an open {{% if %}}")
            _, _, emitting = stack.pop()
    if stack:
        raise TemplateError("template ends inside an {% if %} block (missing {% endif %})")
    out.append(template_text[pos:])
    return "".join(out)
