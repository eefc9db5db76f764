"""Output formats shared by every command: table, wide, json, yaml.

JSON is the protobuf JSON mapping (google.protobuf.json_format: lowerCamelCase names) in
the tables' vocabulary: 64-bit integers as numbers (json_format makes them strings) and
enum values without their type's prefix (JOB_FINISHED, not JOB_STATE_JOB_FINISHED), so
`jq 'select(.state=="JOB_FINISHED")'` matches what the table shows. Always one document:
a list. YAML is the same data. Tables are rich tables that fit the terminal (rich honours NO_COLOR and COLUMNS).

What the server stores is shown as it is: rich markup (`[bold]`, `[/]`, `[link=...]`) and
emoji codes in a workdir, tag or message are text, never styles, links or a crash; and
characters that would act on the terminal instead of showing (escape sequences, carriage
returns, bidirectional overrides) are shown escaped (`\\x1b`, `\\u202e`).
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from balsam_grpc.cli.terminal import visible
from balsam_grpc.core.structs import whole_numbers
from balsam_grpc.sdk.convert import JSON_VALUE_TYPES


class Format(str, Enum):
    table = "table"
    wide = "wide"
    json = "json"
    yaml = "yaml"


OutputOpt = Annotated[Format, typer.Option("--output", "-o", help="table, wide, json or yaml",
                                           rich_help_panel="Output")]
NoHeaderOpt = Annotated[bool, typer.Option("--no-header", help="tables without the header row",
                                           rich_help_panel="Output")]


@dataclass(frozen=True)
class Column:
    header: str
    value: Callable[[Any], Any]
    wide_only: bool = False
    no_wrap: bool = False
    justify: str = "left"
    # Columns that may be squeezed when the terminal is narrow (long free text).
    ratio: int | None = None


_stdout: Console | None = None
_stderr: Console | None = None


def stdout() -> Console:
    global _stdout
    if _stdout is None:
        _stdout = Console(highlight=False, soft_wrap=False, markup=False, emoji=False)
    return _stdout


def stderr() -> Console:
    global _stderr
    if _stderr is None:
        _stderr = Console(stderr=True, highlight=False, markup=False, emoji=False)
    return _stderr


_INT64_TYPES = frozenset({FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT64,
                          FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64})


def message_to_dict(message: Message) -> dict[str, Any]:
    """Every field, at its default value too (0, "", [], {}; null for an unset message or
    optional field), so a jq filter never meets a missing key; ids as numbers, enums as
    bare names (the table's vocabulary)."""
    data = json_format.MessageToDict(message, always_print_fields_with_no_presence=True)
    return _plain_message(data, message.DESCRIPTOR)


def enum_prefix(enum_type: EnumDescriptor) -> str:
    """JobState -> "JOB_STATE_" (AIP/buf style: every value starts with its type's name)."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", enum_type.name).upper() + "_"


def _plain_message(data: dict[str, Any], descriptor: Descriptor) -> dict[str, Any]:
    if descriptor.full_name in JSON_VALUE_TYPES:
        return whole_numbers(data)  # type: ignore[no-any-return]  # 3, not 3.0 (a Struct's doubles)
    if descriptor.full_name.startswith("google.protobuf."):
        return data  # well-known types keep their JSON forms (timestamps, Struct)
    for field in descriptor.fields:
        if field.json_name in data:
            data[field.json_name] = _plain_field(data[field.json_name], field)
        elif field.containing_oneof is None or field.containing_oneof.name.startswith("_"):
            # An unset message or proto3 `optional` field (never one alternative of a oneof).
            data[field.json_name] = None
    return data


def _plain_field(value: Any, field: FieldDescriptor) -> Any:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        value_field = field.message_type.fields_by_name["value"]
        return {k: _plain_value(v, value_field) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain_value(v, field) for v in value]
    return _plain_value(value, field)


def _plain_value(value: Any, field: FieldDescriptor) -> Any:
    if field.message_type is not None:
        if field.message_type.full_name in JSON_VALUE_TYPES:
            return whole_numbers(value)  # a Value may be a bare number, a ListValue a list
        return _plain_message(value, field.message_type) if isinstance(value, dict) else value
    if field.enum_type is not None and isinstance(value, str):
        return value.removeprefix(enum_prefix(field.enum_type))
    if field.type in _INT64_TYPES and isinstance(value, str):
        return int(value)
    return value


def to_plain(item: Any) -> Any:
    if isinstance(item, Message):
        return message_to_dict(item)
    if isinstance(item, Mapping):
        return {k: to_plain(v) for k, v in item.items()}
    if isinstance(item, (list, tuple)):
        return [to_plain(v) for v in item]
    return item


def dump(items: Iterable[Any], fmt: Format) -> str:
    """One json or yaml document holding a list of the items."""
    data = [to_plain(i) for i in items]
    if fmt is Format.json:
        return json.dumps(data, indent=2)
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)


def build_table(items: Iterable[Any], columns: Sequence[Column], *, wide: bool = False,
                header: bool = True, title: str | None = None) -> RenderableType:
    """A table; its title goes above it as text wrapped at the terminal's width (rich
    would wrap a table title at the table's width, often a narrow column)."""
    shown = [c for c in columns if wide or not c.wide_only]
    table = Table(show_header=header, header_style="bold", box=None, pad_edge=False)
    for col in shown:
        table.add_column(col.header, no_wrap=col.no_wrap, justify=col.justify,  # type: ignore[arg-type]
                         overflow="ellipsis" if col.no_wrap else "fold", ratio=col.ratio)
    for item in items:
        # Text, not str: a str cell would be parsed as rich markup.
        table.add_row(*(Text(visible(cell(col.value(item)))) for col in shown))
    return Group(Text(title, style="italic"), table) if title else table


def render(items: Sequence[Any], columns: Sequence[Column], fmt: Format, *, no_header: bool = False,
           title: str | None = None) -> None:
    if fmt in (Format.json, Format.yaml):
        write(dump(items, fmt))
        return
    stdout().print(build_table(items, columns, wide=fmt is Format.wide, header=not no_header, title=title))


def write(text: str) -> None:
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    sys.stdout.flush()


def cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, Timestamp):
        return fmt_time(value)
    if isinstance(value, datetime):
        return value.astimezone().strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, Mapping):
        return ",".join(f"{k}={v}" for k, v in sorted(value.items()))
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def fmt_time(ts: Timestamp) -> str:
    if not ts.seconds and not ts.nanos:
        return ""
    return ts.ToDatetime(tzinfo=timezone.utc).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def enum_name(enum_type: Any, number: int, prefix: str) -> str:
    try:
        return str(enum_type.Name(number)).removeprefix(prefix)
    except ValueError:
        return str(number)


def is_interactive() -> bool:
    return sys.stdin.isatty() and sys.stderr.isatty()


def confirm(question: str, *, assume_yes: bool, what: str) -> None:
    """Ask before a bulk change. Refuses (exit 1) when nobody can answer: a script must
    say --yes explicitly rather than have a change go through on a closed stdin."""
    from balsam_grpc.cli.errors import fail

    if assume_yes:
        return
    if not sys.stdin.isatty():
        fail(f"refusing to {what} without confirmation: stdin is not a terminal (pass --yes, or --dry-run "
             "to preview)")
    if not typer.confirm(question, default=False, err=True):
        fail(f"{what}: cancelled, nothing changed")


def make_folder(path: Path, option: str) -> Path:
    """A folder to write files into (--plots), made with its parents: one error line when
    it cannot be, before anything is computed or sent."""
    from balsam_grpc.cli.errors import usage

    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        usage(f"{option}: {path} exists and is not a folder")
    except OSError as err:
        usage(f"{option}: cannot create the folder {path}: {err.strerror}")
    if not os.access(path, os.W_OK | os.X_OK):
        usage(f"{option}: cannot write into the folder {path}")
    return path


def enum_names(enum_type: Any, prefix: str) -> list[str]:
    return [str(n).removeprefix(prefix) for n, v in enum_type.items() if v != 0]


@contextmanager
def progress(total: int, description: str, completed: int = 0) -> Iterator[Callable[[int], None]]:
    """A progress bar on stderr when it is a terminal; yields `advance(n)`. Silent when
    piped, so scripts see only the result."""
    if not sys.stderr.isatty() or total <= 1:
        yield lambda n: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=stderr(), transient=True) as bar:
        task = bar.add_task(description, total=total, completed=completed)
        yield lambda n: bar.advance(task, n)
