"""Fuzzing of the pure parsers and renderers that read text from outside the process.

Already covered elsewhere (not repeated here): the scheduler output parsers on short text
and odd JSON documents (tests/site/test_schedulers.py), the Slurm node list on a small
alphabet (tests/launcher/test_units.py). Here: the small helpers those parsers are built
from on long and odd input, node lists on any text and as a round trip, command and batch
script templates (quoting, single-pass substitution), workdir paths (never outside the
site's data folder), site settings documents, and the CLI's filter options.
"""

from __future__ import annotations

import os
import posixpath
import shlex
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from balsam_grpc.cli import filters
from balsam_grpc.cli.errors import UsageError
from balsam_grpc.core.appdef import command_argv
from balsam_grpc.core.command_template import check_template
from balsam_grpc.core.errors import InvalidArgument
from balsam_grpc.core.validation import clean_workdir, parse_tag
from balsam_grpc.launcher import nodes
from balsam_grpc.site.schedulers import cobalt, get_scheduler, lsf, pbs, slurm
from balsam_grpc.site.schedulers.base import (
    format_hms,
    parse_duration_min,
    parse_hms_min,
    parse_iso_local,
    shell_quote,
    to_int,
)
from balsam_grpc.site.schedulers.template import TemplateError, render_template, template_names
from balsam_grpc.site.settings import SettingsError, load_settings, parse_settings
from balsam_grpc.v1 import app_pb2

FUZZ = settings(settings.get_profile("balsam-fuzz"), max_examples=200)
SOME = settings(settings.get_profile("balsam-fuzz"), max_examples=60)
NOW = datetime(2024, 11, 21, 12, 0, tzinfo=UTC)

ANY_TEXT = st.text(max_size=300)
DIGITS = st.integers(1, 6000).map(lambda n: "9" * n)  # past Python's 4300-digit int() limit
ODD_OBJECTS = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                        st.floats(allow_nan=True, allow_infinity=True), ANY_TEXT, DIGITS,
                        st.lists(st.integers(), max_size=3),
                        st.dictionaries(st.text(max_size=4), st.integers(), max_size=3))


# -- scheduler parsing helpers ------------------------------------------------------------------

@FUZZ
@given(st.one_of(ANY_TEXT, DIGITS, DIGITS.map(lambda d: f"{d}:00"), DIGITS.map(lambda d: f"1-{d}:00:00"),
                 DIGITS.map(lambda d: f"{d}.5 min")))
def test_scheduler_helpers_never_raise_on_text(text: str) -> None:
    for parse in (parse_duration_min, parse_hms_min, to_int, lsf.parse_runtime_limit):
        value = parse(text)
        assert value is None or isinstance(value, int)
    assert parse_iso_local(text) is None or parse_iso_local(text).tzinfo is not None
    assert lsf.parse_lsf_time(text, now=NOW) is None or lsf.parse_lsf_time(text, now=NOW) <= NOW + timedelta(days=1)
    assert pbs.parse_ctime(text) is None or pbs.parse_ctime(text).tzinfo is not None
    ids = pbs.parse_qselect_output(text)
    assert ids is None or all(i and i[0].isdigit() for i in ids)
    assert all(isinstance(i, str) and i for i in pbs.unknown_ids_in(text))
    for mapper in (slurm.map_state, pbs.map_state, lsf.map_state, cobalt.map_state):
        assert mapper(text) in ("queued", "running", "finished", "failed", "unknown")


@FUZZ
@given(ODD_OBJECTS)
def test_scheduler_helpers_never_raise_on_json_values(value: object) -> None:
    """Values from a scheduler's JSON output can be of any JSON type."""
    assert to_int(value) is None or isinstance(to_int(value), int)
    assert lsf.parse_runtime_limit(value) is None or lsf.parse_runtime_limit(value) >= 0
    pbs.parse_ctime(value)
    lsf.parse_lsf_time(value, now=NOW)


@FUZZ
@given(st.integers(0, 10**7))
def test_wall_times_round_trip(minutes: int) -> None:
    assert parse_hms_min(format_hms(minutes)) == minutes
    assert parse_duration_min(format_hms(minutes)) == minutes


# -- node lists ------------------------------------------------------------------------------

@FUZZ
@given(st.one_of(ANY_TEXT, st.text(alphabet="n0123456789[]-,", max_size=60)))
def test_node_list_parsers_raise_only_value_error(text: str) -> None:
    for parse in (nodes.expand_slurm_nodelist, nodes.parse_cobalt_partname):
        try:
            hosts = parse(text, limit=5000)
        except ValueError:
            continue
        assert len(hosts) <= 5000 and all(h and h == h.strip() and "," not in h for h in hosts)
    for parse in (nodes.parse_host_file, nodes.parse_lsf_hostfile):
        hosts = parse(text)
        assert len(hosts) == len(set(hosts)) and all(h and not any(c.isspace() for c in h) for h in hosts)


@FUZZ
@given(st.dictionaries(st.sampled_from(["SLURM_JOB_NODELIST", "SLURM_NODELIST", "PBS_NODEFILE", "COBALT_PARTNAME",
                                        "LSB_DJOB_HOSTFILE", "HOME"]), ANY_TEXT, max_size=3), ANY_TEXT)
def test_scheduler_hosts_raise_only_value_error(env: dict[str, str], file_text: str) -> None:
    try:
        source, hosts = nodes.scheduler_hosts(env, read_file=lambda _path: file_text)
    except ValueError:
        return
    assert source in ("slurm", "pbs", "cobalt", "lsf", "local") and all(isinstance(h, str) and h for h in hosts)


@st.composite
def slurm_groups(draw: st.DrawFn) -> tuple[str, list[str]]:
    """A compressed Slurm node list and the host names it stands for."""
    text_parts, expected = [], []
    for _ in range(draw(st.integers(1, 3))):
        prefix = draw(st.text(alphabet="abcnidgpu-", min_size=1, max_size=5).filter(lambda p: not p[-1].isdigit()
                                                                                     and p[0] != "-"))
        width = draw(st.integers(1, 5))
        ranges, numbers = [], []
        for _ in range(draw(st.integers(1, 3))):
            lo = draw(st.integers(0, 10**width - 1))
            hi = draw(st.integers(lo, min(lo + 20, 10**width - 1)))
            ranges.append(f"{lo:0{width}d}" if lo == hi else f"{lo:0{width}d}-{hi:0{width}d}")
            numbers += list(range(lo, hi + 1))
        text_parts.append(f"{prefix}[{','.join(ranges)}]")
        expected += [f"{prefix}{n:0{width}d}" for n in numbers]
    return ",".join(text_parts), expected


@FUZZ
@given(slurm_groups())
def test_slurm_nodelist_round_trip(group: tuple[str, list[str]]) -> None:
    text, expected = group
    assert nodes.expand_slurm_nodelist(text) == expected


# -- command templates --------------------------------------------------------------------

IDENT = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,10}", fullmatch=True)


@FUZZ
@given(st.lists(IDENT, min_size=1, max_size=4, unique=True), st.data())
@example(["a"], None)
def test_render_command_quotes_every_value(names: list[str], data: st.DataObject | None) -> None:
    """Whatever a job's parameter values hold (quotes, $(...), newlines, braces), each is
    exactly one argument, unchanged: no injection, no splitting."""
    values = ({n: data.draw(st.text(max_size=40), label=n) for n in names} if data is not None
              else {"a": "'; rm -rf ~ #\n{{ a }}"})
    app = app_pb2.App(name="x", command_template="prog " + " ".join(f"{{{{ {n} }}}}" for n in names),
                      parameters=[app_pb2.AppParameter(name=n) for n in names])
    assume(all("\x00" not in v for v in values.values()))  # argv can never hold NUL
    assert command_argv(app, values) == ["prog", *values.values()]


@FUZZ
@given(ANY_TEXT, st.dictionaries(IDENT, st.text(max_size=10), max_size=3))
def test_command_templates_refuse_cleanly(template: str, params: dict[str, str]) -> None:
    """Any template text and parameters: a command or InvalidArgument naming a field."""
    app = app_pb2.App(name="x", command_template=template,
                      parameters=[app_pb2.AppParameter(name=n, default_value="d") for n in list(params)[:1]])
    try:
        check_template(template, list(params)[:1], shell=False)
        command_argv(app, params)
    except InvalidArgument as err:
        assert err.field


@FUZZ
@given(ANY_TEXT, st.dictionaries(IDENT, st.one_of(st.none(), st.text(max_size=10), st.integers()), max_size=4))
def test_batch_script_templates_refuse_cleanly(template: str, context: dict[str, object]) -> None:
    try:
        out = render_template(template, context)
    except TemplateError:
        return
    if "{{" not in template and "{%" not in template and "{#" not in template:
        assert out == template.replace("\r\n", "\n").replace("\r", "\n")  # Jinja2 writes \n line ends
    assert template_names(template) >= set()


@FUZZ
@given(st.text(max_size=30), st.text(max_size=30))
def test_batch_script_substitution_is_single_pass(value: str, other: str) -> None:
    """A value that looks like a placeholder or a block is printed, never expanded."""
    out = render_template("A {{ x }} B", {"x": value + "{{ y }}{% if y %}", "y": other})
    assert out == f"A {value}{{{{ y }}}}{{% if y %}} B"


@FUZZ
@given(st.dictionaries(st.text(max_size=12), st.text(max_size=12), max_size=4))
def test_scheduler_directives_never_smuggle_shell(params: dict[str, str]) -> None:
    for name in ("slurm", "pbs", "cobalt", "lsf"):
        try:
            text = get_scheduler(name).render_directives(params)
        except InvalidArgument as err:
            assert err.field == "optional_params"
            continue
        lines = text.splitlines() if text else []
        assert len(lines) == len(params)
        assert not any(c in text for c in ";&|$`'\"<>()\\")


@FUZZ
@given(st.text(max_size=40))
def test_shell_quote_round_trips(value: str) -> None:
    assume("\x00" not in value)
    assert shlex.split(f"echo {shell_quote(value)}") == ["echo", value]


# -- workdir paths ----------------------------------------------------------------------------

PATHISH = st.lists(st.sampled_from(["..", ".", "", "a", "b c", "~", "/", "//", "\\", "..\\..", "...", "x\x00",
                                    "é", "-rf", "$HOME", "*"]), max_size=8).map("/".join)


@FUZZ
@given(st.one_of(PATHISH, ANY_TEXT))
@example("a/../..")
@example("a/./../../b")
@example("./.")
def test_workdir_never_leaves_the_data_folder(workdir: str) -> None:
    base = "/site/data"
    try:
        cleaned = clean_workdir(workdir)
    except InvalidArgument as err:
        assert err.field == "workdir"
        return
    joined = posixpath.normpath(posixpath.join(base, cleaned))
    assert joined.startswith(base + "/"), (workdir, cleaned, joined)
    assert not cleaned.startswith("/") and ".." not in cleaned.split("/") and "\x00" not in cleaned
    assert clean_workdir(cleaned) == cleaned  # normal form: cleaning twice changes nothing


@SOME
@given(PATHISH.filter(lambda p: "\x00" not in p))
def test_workdir_on_a_real_filesystem(tmp_path_factory: pytest.TempPathFactory, workdir: str) -> None:
    """The same through the OS: the resolved path is inside the data folder."""
    try:
        cleaned = clean_workdir(workdir)
    except InvalidArgument:
        return
    base = tmp_path_factory.getbasetemp() / "data"
    base.mkdir(exist_ok=True)
    resolved = Path(os.path.realpath(base / cleaned))
    assert resolved.is_relative_to(base.resolve())


# -- site settings -------------------------------------------------------------------------------

SETTINGS_KEYS = ["site_id", "name", "server", "platform", "scheduler", "allowed_projects", "allowed_queues",
                 "launcher", "elastic_queue", "queue_maintainer", "processing", "cleanup", "max_in_flight",
                 "transfer_locations", "transfers", "batch_script_template", "poll_seconds", "enabled", "mode",
                 "min_nodes", "max_nodes", "check_seconds", "workers", "queue", "project", "nope"]
SETTING_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-5, 10), st.integers(-(2**70), 2**70),
              st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12)),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.one_of(st.sampled_from(SETTINGS_KEYS), st.integers(), st.none()),
                                            inner, max_size=4)),
    max_leaves=12)


def _valid_base() -> dict:
    return {"site_id": 1, "name": "theta", "scheduler": {"name": "local", "poll_seconds": 5}}


@FUZZ
@given(st.one_of(SETTING_VALUES, st.dictionaries(st.sampled_from(SETTINGS_KEYS), SETTING_VALUES, max_size=6).map(
    lambda extra: {**_valid_base(), **extra})))
@example({"site_id": 1, "name": "x", "scheduler": {"poll_seconds": float("nan")}})
@example({"site_id": 1, "name": "x", "scheduler": {"poll_seconds": float("inf")}})
@example({"site_id": 1, "name": "x", "elastic_queue": {"check_seconds": float("nan")}})
def test_settings_validation_raises_only_settings_error(data: object) -> None:
    try:
        parsed = parse_settings(data)
    except SettingsError:
        return
    # Accepted settings are usable: positive finite polling periods, known job modes.
    assert 0 < parsed.scheduler.poll_seconds < float("inf")
    assert 0 < parsed.elastic_queue.check_seconds < float("inf")
    assert parsed.launcher.mode in ("serial", "mpi") and parsed.site_id >= 1


@SOME
@given(st.one_of(ANY_TEXT, st.lists(st.sampled_from(["a:", " - b", "[", "]", "{", "}", ": :", "&x", "*x", "!!python/x",
                                                     "site_id: 1", "name: x", "\t", "'", '"', "? "]), max_size=12)
                 .map("\n".join), st.integers(1, 200).map(lambda d: "[" * d + "]" * d)))
def test_settings_file_errors_are_settings_errors(tmp_path_factory: pytest.TempPathFactory, text: str) -> None:
    path = tmp_path_factory.getbasetemp() / "settings.yml"
    path.write_text(text)
    try:
        load_settings(path)
    except SettingsError as err:
        assert str(path) in err.message


# -- CLI filter options --------------------------------------------------------------------

@FUZZ
@given(st.one_of(ANY_TEXT, DIGITS.map(lambda d: d + "d"), DIGITS.map(lambda d: d + "w"),
                 st.integers(0, 10**12).map(lambda n: f"{n}d"), st.sampled_from(["9999-12-31T23:59", "0001-01-01",
                                                                                 "1e9w", " 5m "])))
@example("99999999999d")
@example("0001-01-01T00:00")
def test_since_is_a_time_or_a_usage_error(text: str) -> None:
    try:
        since = filters.parse_since(text, now=NOW)
    except UsageError as err:
        assert "--since" in str(err)
        return
    assert since is None or since.tzinfo is not None


@FUZZ
@given(st.integers(0, 10**6), st.sampled_from(["s", "m", "h", "d", "w", "min", "hr", "day", "sec"]))
def test_relative_since_subtracts_the_age(n: int, unit: str) -> None:
    seconds = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600, "d": 86400, "day": 86400, "w": 604800}
    age = timedelta(seconds=n * seconds[unit])
    if age > NOW - datetime(1, 1, 2, tzinfo=UTC):
        with pytest.raises(UsageError, match="further back"):
            filters.parse_since(f"{n}{unit}", now=NOW)
    else:
        assert filters.parse_since(f"{n}{unit}", now=NOW) == NOW - age


@FUZZ
@given(st.lists(st.one_of(ANY_TEXT, DIGITS, st.sampled_from(["²", "١٢", "12,x", "-1", "+3", " 7 "])), max_size=4))
def test_id_state_and_tag_options_raise_only_usage_errors(values: list[str]) -> None:
    for parse in (filters.parse_ids, filters.parse_states, filters.parse_tags, filters.parse_refs):
        try:
            result = parse(values)
        except UsageError:
            continue
        if parse is filters.parse_ids:
            assert all(isinstance(i, int) and 0 <= i < 2**63 for i in result)
        if parse is filters.parse_refs:
            assert all(isinstance(r, str) or 0 <= r < 2**63 for r in result)
    try:
        filters.parse_key_values(values, "--param")
    except UsageError:
        pass


@FUZZ
@given(st.from_regex(r"[A-Za-z0-9_.:/-]{1,64}", fullmatch=True), st.text(max_size=20))
def test_tags_round_trip(key: str, value: str) -> None:
    assert parse_tag(f"{key}={value}") == (key, value)
    assert filters.parse_tags([f"{key}={value}"]) == {key: value}


def test_yaml_of_a_valid_site_round_trips(tmp_path: Path) -> None:
    """The fuzzed settings start from a document the validator accepts."""
    path = tmp_path / "settings.yml"
    path.write_text(yaml.safe_dump(_valid_base()))
    assert load_settings(path).name == "theta"
