"""Command templates (core.command_template): Jinja2 rendering into an argument vector in
which every value is exactly one argument or an exact part of one; shell apps that get
values as positional parameters; templates refused at registration with the right form."""

from __future__ import annotations

import os
import shlex
import subprocess
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from balsam_grpc.core.appdef import command_argv
from balsam_grpc.core.command_template import check_template, render_argv, render_script, split_words
from balsam_grpc.core.errors import InvalidArgument
from balsam_grpc.v1 import app_pb2
from tests.support.hostile import HOSTILE, RIGHT_FORM

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NUL_FREE = st.text(st.characters(blacklist_characters="\x00"), max_size=30)


@SETTINGS
@given(st.one_of(st.text(st.characters(blacklist_characters="\x00"), max_size=60),
                 st.text(st.sampled_from(list("ab \t\n'\"\\$|;*#~")), max_size=30)))
def test_words_split_exactly_as_shlex(text: str) -> None:
    try:
        expected = shlex.split(text)
    except ValueError:
        with pytest.raises(ValueError):
            split_words(text)
        return
    assert split_words(text) == expected


WORD = st.from_regex(r"[A-Za-z0-9_./=,:+@%-]{1,8}", fullmatch=True)


@SETTINGS
@given(st.lists(st.tuples(st.sampled_from(["literal", "alone", "prefixed", "quoted-literal"]), WORD, NUL_FREE),
                min_size=1, max_size=6))
def test_each_value_is_one_argument_or_an_exact_part_of_one(parts: list[tuple[str, str, str]]) -> None:
    """Random templates of literal words, quoted literals and placeholders (alone or glued to
    text) with arbitrary values: the argv is exactly what the template's words say."""
    template, expected, values = ["prog"], ["prog"], {}
    for i, (kind, word, value) in enumerate(parts):
        name = f"v{i}"
        values[name] = value
        if kind == "literal":
            template.append(word)
            expected.append(word)
        elif kind == "quoted-literal":
            template.append(shlex.quote(word + " x"))
            expected.append(word + " x")
        elif kind == "alone":
            template.append(f"{{{{ {name} }}}}")
            expected.append(value)
        else:
            template.append(f"{word}{{{{ {name} }}}}{word}")
            expected.append(f"{word}{value}{word}")
    text = " ".join(template)
    check_template(text, list(values), shell=False)
    assert render_argv(text, values) == expected


def test_hostile_values_are_literal_arguments() -> None:
    values = {f"v{i}": v for i, v in enumerate(HOSTILE)}
    template = "prog " + " ".join(f"{{{{ {n} }}}}" for n in values) + " --pre={{ v0 }}.txt"
    assert render_argv(template, values) == ["prog", *HOSTILE, f"--pre={HOSTILE[0]}.txt"]


def test_jinja_filters_conditionals_and_loops_keep_working() -> None:
    template = ("sim {{ name | upper }} --steps {{ n * 2 }} {% if verbose %}-v{% endif %} "
                "{% for f in files.split(',') %}--in {{ f }} {% endfor %}{# a comment #}")
    values = {"name": "run; id", "n": 5, "verbose": True, "files": "a b,$(c)"}
    assert render_argv(template, values) == ["sim", "RUN; ID", "--steps", "10", "-v", "--in", "a b", "--in", "$(c)"]
    assert render_argv(template, {**values, "verbose": False})[4] == "--in"


def test_typed_parameters_render_in_their_own_words() -> None:
    app = app_pb2.App(name="a", command_template="p {{ n }} {{ flag }} {{ x }}",
                      parameters=[app_pb2.AppParameter(name="n", type=app_pb2.PARAMETER_TYPE_INT),
                                  app_pb2.AppParameter(name="flag", type=app_pb2.PARAMETER_TYPE_BOOL),
                                  app_pb2.AppParameter(name="x", default_value="d e")])
    assert command_argv(app, {"n": "7", "flag": "yes"}) == ["p", "7", "true", "d e"]


def test_shell_apps_get_values_as_positional_parameters() -> None:
    """Through a real bash: every hostile value arrives as "$N", unchanged, and nothing in
    it runs (PWNED would be created in the working directory)."""
    values = {f"v{i}": v for i, v in enumerate(HOSTILE)}
    body = " ".join(f"{{{{ {n} }}}}" for n in values)
    template = f"cd \"$TMPDIR\" && printf '%s\\0' {body} | cat; echo '# done' >&2"
    check_template(template, list(values), shell=True)
    script, args = render_script(template, values)
    assert args == list(values.values()) and not any(v in script for v in values.values() if len(v) > 3)
    app = app_pb2.App(name="shellapp", command_template=template, shell=True,
                      parameters=[app_pb2.AppParameter(name=n) for n in values])
    argv = command_argv(app, values)
    assert argv[:2] == ["/bin/bash", "-c"] and argv[3] == "shellapp"
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(argv, capture_output=True, timeout=30, env={"TMPDIR": tmp, "PATH": "/usr/bin:/bin"},
                             check=True)
        assert os.listdir(tmp) == []
    assert out.stdout.decode().split("\0")[:-1] == list(values.values())


@pytest.mark.parametrize(("template", "shell", "needle"), [
    ('echo "{{ x }}"', False, "inside quotes"),
    ("echo '{{ x }}'", False, "inside quotes"),
    ("sh -c 'sleep {{ x }}; echo done'", False, "inside quotes"),
    ("/bin/sh -c \"echo start; sleep {{ x }}\"", False, "inside quotes"),
    ("python -c 'print({{ x }})'", False, "inside quotes"),
    ("echo '{% if x %}a{% endif %}'", False, "inside quotes"),
    ('echo "{{ x }}"', True, "inside quotes"),
    ("bash -c 'echo {{ x }}'", True, "inside quotes"),
    ("echo \\{{ x }}", False, "backslash"),
    ("echo {{ x }} > out.txt", False, "shell syntax"),
    ("echo a | wc", False, "shell syntax"),
    ("echo $HOME", False, "shell syntax"),
    ('echo "$HOME"', False, "shell syntax"),
    ("ls *.h5", False, "shell syntax"),
    ("cat ~/x", False, "shell syntax"),
    ("X=1 prog", False, "NAME=value"),
    ("echo {{ y }}", False, "{{ y }}, which is not among"),
    ("echo {{ x", False, "Jinja2 template syntax"),
    ("{% macro m() %}{{ x }}{% endmacro %}{{ m() }}", False, "macro"),
    ("{% set s %}{{ x }}{% endset %}{{ s }}", False, "assignblock"),
    ("{% filter upper %}{{ x }}{% endfilter %}", False, "filterblock"),
    ("{% include 'other' %}", False, "include"),
    ("echo \x00 {{ x }}", False, "NUL"),
    ("x" * 20000, False, "at most 16384"),
    ("p " + "{{ x }}" * 201, False, "at most 200"),
])
def test_refused_templates_name_the_field_and_show_the_right_form(template: str, shell: bool, needle: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        check_template(template, ["x"], shell=shell)
    assert err.value.field == "app.command_template" and needle in err.value.message, err.value.message
    if needle in ("inside quotes", "backslash"):
        assert RIGHT_FORM in err.value.message and "shell = True" in err.value.message


@pytest.mark.parametrize("template", [
    "echo {{ x }}", "prog --title={{ x }} '--lit=a b' \"c d\"", "prog '$HOME|x' {{ x }}", "echo Hello, {{ x }}!",
    "prog 'a'{{ x }}\"b\"", "{% if x %}-v {{ x }}{% else %}-q{% endif %}", "sh -c 'sleep \"$1\"' sh {{ x }}",
])
def test_accepted_argv_templates(template: str) -> None:
    check_template(template, ["x"], shell=False)


@pytest.mark.parametrize("template", [
    "sleep {{ x }}; echo done > out.txt", "echo \"$HOME\" {{ x }} | wc -c",
    "for f in *.h5; do run \"$f\" {{ x }}; done", "echo hi # it's {{ x }}",
])
def test_accepted_shell_templates(template: str) -> None:
    check_template(template, ["x"], shell=True)


@SETTINGS
@given(st.text(max_size=40), st.dictionaries(st.from_regex(r"[a-z]{1,3}", fullmatch=True), NUL_FREE, max_size=3),
       st.booleans())
def test_any_template_renders_or_refuses_cleanly(template: str, values: dict[str, str], shell: bool) -> None:
    """Any text: refused with InvalidArgument naming the field, or rendered so that no value
    is ever part of the text a parser reads."""
    try:
        check_template(template, list(values), shell=shell)
        if shell:
            script, _ = render_script(template, values)
            assert "\x00" not in script
        else:
            render_argv(template, values)
    except InvalidArgument as err:
        assert err.field in ("app.command_template", "command_template")


@pytest.mark.parametrize("template, shell", [("/bin/true", False), ("prog 'a b'\r\n  c", False), ("", False),
                                              ("echo hi > out.txt; ls | wc -l", True)])
def test_a_template_without_tags_renders_as_jinja_would(template, shell):
    """Text-only templates skip Jinja2 (command_template._static): the same text and argv."""
    from balsam_grpc.core import command_template as ct

    assert ct._static(template, shell) == ct._compiled(template, shell).render({ct._RECORDER: []})
    assert ct._static("prog {{ x }}", False) is None and ct._static("{% if x %}a{% endif %}", False) is None
    if not shell and template:
        assert ct.render_argv(template, {}) == ct.split_words(template.replace("\r\n", "\n"))
