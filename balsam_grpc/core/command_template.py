"""Command templates that cannot inject (pure).

An app's command template is Jinja2, Balsam's own templating: `{{ expr }}` outputs a
value (a parameter, a filter, an expression), `{% if %}`, `{% for %}` and `{% set %}` shape
the command. Every `{{ }}` output is a *value*: it never becomes template or shell text.
The literal text around the tags is split into words by POSIX rules (as `shlex.split`).

Two forms, chosen by the app (`shell`):

- argv (default): the rendered words are the program's argument vector and the program
  runs without a shell. A value is exactly one argument when its `{{ }}` stands alone
  (`prog {{ x }}`), or an exact part of one argument when it touches literal text in
  the same word (`--out={{ name }}.h5`, `{{ run }}-{{ step }}`). Words are not re-split,
  quotes in a value stay quotes, `;`, `$()` and globs in a value are plain characters.
- shell: the template is a bash script. Each `{{ }}` becomes `"${N}"`, a reference to a
  positional parameter, and the values are passed after the script
  (`bash -c SCRIPT APP v1 v2 ...`): bash reads them as data, never as script text.
  (Bash still evaluates a value used in arithmetic, `$(( ))` or `[[ -eq ]]`, as an
  expression, as it would any "$1": such parameters should be declared int.)

Rules, checked when the app is registered (and again before each run):

- A `{{ }}` is never inside quotes or after a backslash: every quote opens and closes
  within one stretch of literal text, so also no quote spans a `{% %}` tag. A quoted
  placeholder (`echo "{{ x }}"`, `sh -c '... {{ x }} ...'`) is the form that used to
  inject: the string is re-parsed by a shell. The message shows the right form.
- argv form: no shell syntax outside single quotes (pipes, redirections, `;`, `&`,
  `$` expansions, backticks, globs, a leading `~`, a leading `NAME=value`): without a
  shell they would be literal arguments. Quote them, or declare the app `shell`.
- Only declared parameters (and Jinja's own globals such as `range`) are used, and no
  statement captures output as text (`macro`, `call`, `filter`, `set` blocks, `include`,
  `extends`, `import`, `block`): that would turn values back into template text.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import jinja2
from jinja2 import meta, nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from balsam_grpc.core.errors import InvalidArgument

_BLANKS = " \t\r\n"  # the separators of shlex.split (POSIX mode)
# A value's place in the rendered text. NUL can be neither in a template nor in an argument.
_SENTINEL = re.compile("\x00([0-9]+)\x00")
_RECORDER = "balsam:values"  # not an identifier: no template can reach it
_ALLOWED_STATEMENTS = (nodes.Output, nodes.If, nodes.For, nodes.Assign, nodes.With)
_UNQUOTED_SYNTAX = set("|&;<>()*?[$`")
_DOUBLE_QUOTED_SYNTAX = set("$`")
_ASSIGNMENT = re.compile(r"\s*[A-Za-z_][A-Za-z0-9_]*=")

_DECLARE_SHELL = "declare the app a shell script (`shell = True`; `App.shell` over the API)"
RIGHT_FORM = (
    "A value is always passed as exactly one argument and needs no quotes: write it unquoted, for example "
    "`prog --title={{ x }}` or `prog {{ x }}`. To hand a value to a shell or an interpreter, pass it as an "
    f"argument: `sh -c 'sleep \"$1\"' sh {{{{ x }}}}`, or {_DECLARE_SHELL} and write `sleep {{{{ x }}}}`: the "
    "script then reads the value as \"$1\".")


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


@jinja2.pass_context
def _record(context: jinja2.runtime.Context, value: Any) -> str:
    """Every `{{ }}` output: its text is kept aside and a sentinel takes its place."""
    recorded: list[str] = context[_RECORDER]
    recorded.append(_as_text(value))
    return f"\x00{len(recorded) - 1}\x00"


# Sandboxed: a template can read its parameters but not reach Python internals (the
# launcher that renders it holds the site's credential). Strict: a misspelt name fails.
_ENV = ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, autoescape=False, finalize=_record,
                                    keep_trailing_newline=True)


@dataclass
class _Scan:
    words: list[str]
    open_quote: str = ""  # "'", '"', or "\\" for a dangling backslash; "" when closed
    syntax: str = ""  # first shell syntax met outside single quotes (argv form), with its context


def _scan(text: str, *, shell: bool) -> _Scan:
    """Split `text` into words as `shlex.split` does, and note where it stops (inside
    quotes or after a backslash) and any shell syntax outside single quotes.

    shlex itself cannot say whether a character was quoted, which is the whole question
    here; tests check this agrees with shlex.split word for word."""
    words: list[str] = []
    word: list[str] | None = None
    quote = ""
    syntax = ""
    i, n = 0, len(text)

    def note(at: int) -> None:
        nonlocal syntax
        if not syntax and not shell:
            syntax = f"{text[at]!r} in {text[max(0, at - 20):at + 21].strip()!r}"

    while i < n:
        c = text[i]
        if quote == "'":
            if c == "'":
                quote = ""
            else:
                word.append(c)  # type: ignore[union-attr]
        elif quote == '"':
            if c == '"':
                quote = ""
            elif c == "\\" and i + 1 < n and text[i + 1] in '"\\':
                word.append(text[i + 1])  # type: ignore[union-attr]
                i += 1
            else:
                if c in _DOUBLE_QUOTED_SYNTAX:
                    note(i)
                word.append(c)  # type: ignore[union-attr]
        elif c in _BLANKS:
            if word is not None:
                words.append("".join(word))
                word = None
        else:
            starts_word = word is None
            if starts_word:
                word = []
            if c == "\\":
                if i + 1 == n:
                    return _Scan(words, "\\", syntax)
                word.append(text[i + 1])  # type: ignore[union-attr]
                i += 1
            elif c in "'\"":
                quote = c
            elif shell and c == "#" and starts_word:
                word = None  # a comment, to the end of the line
                while i + 1 < n and text[i + 1] != "\n":
                    i += 1
            else:
                if c in _UNQUOTED_SYNTAX or (c == "~" and starts_word):
                    note(i)
                word.append(c)  # type: ignore[union-attr]
        i += 1
    if word is not None and not quote:
        words.append("".join(word))
    return _Scan(words, quote, syntax)


def split_words(text: str) -> list[str]:
    """POSIX word splitting as `shlex.split` (no comments); ValueError on an open quote."""
    scan = _scan(text, shell=False)
    if scan.open_quote:
        raise ValueError("no closing quotation" if scan.open_quote != "\\" else "no escaped character")
    return scan.words


# Generous for a command line, and small enough that checking one costs the server
# milliseconds: Jinja2 parses about 10,000 tags a second here.
MAX_TEMPLATE_CHARS = 16384
MAX_TEMPLATE_TAGS = 200


def _line(template: str, lineno: int) -> str:
    lines = template.splitlines() or [""]
    return lines[min(max(lineno, 1), len(lines)) - 1].strip()


@functools.lru_cache(maxsize=512)
def _parse(template: str, shell: bool, field: str) -> tuple[nodes.Template, tuple[str, ...]]:
    """The checked template and the names it reads (raises InvalidArgument naming `field`)."""
    if len(template) > MAX_TEMPLATE_CHARS:
        raise InvalidArgument(f"{field} is {len(template)} characters long; at most {MAX_TEMPLATE_CHARS}",
                              field=field)
    tags = template.count("{{") + template.count("{%")
    if tags > MAX_TEMPLATE_TAGS:
        raise InvalidArgument(f"{field} has {tags} {{{{ }}}} and {{% %}} tags; at most {MAX_TEMPLATE_TAGS}",
                              field=field)
    if "\x00" in template:
        raise InvalidArgument(f"{field} contains a NUL character", field=field)
    try:
        ast = _ENV.parse(template)
    except jinja2.TemplateSyntaxError as exc:
        raise InvalidArgument(f"{field}: line {exc.lineno}: {exc.message} (Jinja2 template syntax)",
                              field=field) from None
    except RecursionError:
        raise InvalidArgument(f"{field}: expressions nest too deeply", field=field) from None
    for stmt in ast.find_all(nodes.Stmt):
        if not isinstance(stmt, _ALLOWED_STATEMENTS):
            raise InvalidArgument(
                f"{field}: line {stmt.lineno}: {{% {type(stmt).__name__.lower()} %}} is not allowed in a command "
                "template (it would turn values into template text); use {{ }}, {% if %}, {% for %} and {% set %}",
                field=field)
    for data in ast.find_all(nodes.TemplateData):
        scan = _scan(data.data, shell=shell)
        where = data.lineno + data.data.count("\n")
        if scan.open_quote == "\\":
            raise InvalidArgument(f"{field}: a backslash escapes the {{{{ }}}} or {{% %}} tag that follows it "
                                  f"(line {where}: {_line(template, where)}). {RIGHT_FORM}", field=field)
        if scan.open_quote:
            raise InvalidArgument(
                f"{field}: a {{{{ }}}} value or a {{% %}} tag is inside quotes (line {where}: "
                f"{_line(template, where)}); every quote must close before the next tag. {RIGHT_FORM}", field=field)
        if scan.syntax:
            raise InvalidArgument(
                f"{field}: {scan.syntax} (line {data.lineno}) is shell syntax, but the app runs its "
                "command without a shell (words are split as by shlex; no pipes, redirections, ;, &, $ expansions, "
                f"backticks, globs or ~). Quote it ('...') to pass it literally, or {_DECLARE_SHELL} to run the "
                "template as a bash script.", field=field)
    first = ast.body[0] if ast.body else None
    if (not shell and isinstance(first, nodes.Output) and first.nodes
            and isinstance(first.nodes[0], nodes.TemplateData) and _ASSIGNMENT.match(first.nodes[0].data)):
        raise InvalidArgument(f"{field}: a leading NAME=value assignment needs a shell; set the variable in the "
                              f"app's environment instead, or {_DECLARE_SHELL}", field=field)
    return ast, tuple(sorted(meta.find_undeclared_variables(ast) - set(_ENV.globals)))


@functools.lru_cache(maxsize=512)
def _compiled(template: str, shell: bool) -> jinja2.Template:
    return _ENV.from_string(_parse(template, shell, "command_template")[0])


def check_template(template: str, parameters: Collection[str], *, shell: bool,
                   field: str = "app.command_template") -> None:
    """Refuse (InvalidArgument naming `field`) a template that could place a value where a
    shell would re-parse it, uses shell syntax without declaring `shell`, or names an
    undeclared parameter."""
    declared = set(parameters)
    for name in _parse(template, shell, field)[1]:
        if name not in declared:
            raise InvalidArgument(f"{field} uses {{{{ {name} }}}}, which is not among the app's parameters "
                                  f"({', '.join(sorted(declared)) or 'none declared'})", field=field)


@functools.lru_cache(maxsize=512)
def _static(template: str, shell: bool) -> str | None:
    """The text of a checked template that holds only text (no tag), which renders as
    that text whatever the values: rendering it through Jinja2 costs ~50 us a job."""
    body = _parse(template, shell, "command_template")[0].body
    if all(isinstance(n, nodes.Output) and all(isinstance(c, nodes.TemplateData) for c in n.nodes) for n in body):
        return "".join(c.data for n in body for c in n.nodes)
    return None


def _render(template: str, values: Mapping[str, Any], shell: bool) -> tuple[str, list[str]]:
    compiled = _compiled(template, shell)
    static = _static(template, shell)
    if static is not None:
        return static, []
    recorded: list[str] = []
    try:
        text = compiled.render({**values, _RECORDER: recorded})
    except jinja2.TemplateError as exc:
        raise InvalidArgument(f"command_template: rendering failed: {exc}", field="command_template") from None
    for value in recorded:
        if "\x00" in value:
            raise InvalidArgument(f"command_template: the value {value!r} contains a NUL character, which no "
                                  "program argument can carry", field="command_template")
    return text, recorded


@functools.lru_cache(maxsize=512)
def _static_argv(template: str) -> tuple[str, ...] | None:
    """The words of an argv-form template that holds only text, split once (a launcher
    renders it for every job)."""
    _compiled(template, False)  # refused as _render refuses it
    static = _static(template, False)
    return None if static is None else tuple(split_words(static))


def render_argv(template: str, values: Mapping[str, Any]) -> list[str]:
    """The argument vector of an argv-form template: each value is one argument or an exact
    part of one, whatever characters it holds."""
    static = _static_argv(template)
    if static:
        return list(static)
    text, recorded = _render(template, values, shell=False)
    words = split_words(text)  # the text holds no value, only sentinels
    argv = [_SENTINEL.sub(lambda m: recorded[int(m.group(1))], w) for w in words]
    if not argv or not argv[0]:
        raise InvalidArgument("command_template renders to no program to run", field="command_template")
    return argv


def render_script(template: str, values: Mapping[str, Any]) -> tuple[str, list[str]]:
    """A shell-form template as (bash script, positional parameters): each value is
    referenced as "${N}" in the script and passed as the N-th positional parameter."""
    text, recorded = _render(template, values, shell=True)
    return _SENTINEL.sub(lambda m: f'"${{{int(m.group(1)) + 1}}}"', text), recorded
