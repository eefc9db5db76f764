"""ApplicationDefinition declarations, the command renderer and the apps-folder loader."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from balsam_grpc.core.appdef import (
    ApplicationDefinition,
    JobHandle,
    command_argv,
    load_app_classes,
    resolve_parameters,
)
from balsam_grpc.core.errors import InvalidArgument
from balsam_grpc.v1 import app_pb2, job_pb2


class Simulate(ApplicationDefinition):
    """Runs a simulation."""

    command_template = "sim --steps {{ steps }} --name {{name}} {{ verbose }}"
    parameters = {
        "steps": {"type": "int", "required": True, "help": "time steps"},
        "name": {"default": "run 1"},
        "verbose": {"type": "bool", "default": False},
    }
    transfers = {"input": {"direction": "in", "local_path": "in.dat", "required": True}}
    cleanup_files = ["*.tmp"]
    retry_policy = {"max_retries": 2, "on_error": "restart", "on_timeout": "fail"}

    def postprocess(self) -> None:
        self.job.data["post"] = True


class Square(ApplicationDefinition):
    parameters = {"x": {"type": "float", "required": True}}

    def run(self, x: float) -> float:
        return x * x


def test_declaration_becomes_app_message() -> None:
    app = Simulate.app_message(7)
    assert app.site_id == 7 and app.name == "Simulate" and app.description == "Runs a simulation."
    assert app.kind == app_pb2.APP_KIND_SHELL and app.class_path.endswith(".Simulate")
    assert [p.name for p in app.parameters] == ["steps", "name", "verbose"]
    assert app.parameters[2].default_value == "false"
    assert app.hooks.postprocess and not app.hooks.preprocess and not app.hooks.handle_error
    assert app.transfers[0].direction != 0 and app.transfers[0].local_path == "in.dat"
    assert app.retry_policy.on_error == app_pb2.RETRY_ACTION_RESTART
    assert app.retry_policy.on_timeout == app_pb2.RETRY_ACTION_FAIL
    assert Square.app_message(1).kind == app_pb2.APP_KIND_PYTHON


def test_each_value_is_one_argument_and_defaults_apply() -> None:
    app = Simulate.app_message(1)
    assert command_argv(app, {"steps": "10", "name": "a b; rm -rf /"}) == \
        ["sim", "--steps", "10", "--name", "a b; rm -rf /", "false"]
    assert resolve_parameters(app, {"steps": "3", "verbose": "yes"}) == {"steps": 3, "name": "run 1", "verbose": True}


@pytest.mark.parametrize(("params", "field"), [
    ({}, "parameters.steps"),
    ({"steps": "ten"}, "parameters.steps"),
    ({"steps": "1", "verbose": "maybe"}, "parameters.verbose"),
    ({"steps": "1", "color": "red"}, "parameters.color"),
])
def test_render_refuses_bad_parameters(params: dict[str, str], field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        command_argv(Simulate.app_message(1), params)
    assert err.value.field == field


@pytest.mark.parametrize(("attrs", "needle"), [
    ({"command_template": "echo {{ x }}"}, "{{ x }}"),
    ({"command_template": "echo", "parameters": {"a": {"type": "complex"}}}, "unknown type"),
    ({"command_template": "echo", "parameters": {"a": {"requried": True}}}, "unknown key 'requried'"),
    ({"command_template": "echo", "transfers": {"t": {"direction": "sideways", "local_path": "x"}}}, "direction"),
    ({"command_template": "echo", "retry_policy": {"on_error": "pray"}}, "on_error"),
    ({"command_template": "echo {{ a }}", "parameters": {"a": {"required": True, "default": 1}}},
     "required and has a default"),
    ({}, "exactly one of command_template or run()"),
])
def test_bad_declarations_fail_where_the_class_is_defined(attrs: dict, needle: str) -> None:
    with pytest.raises(InvalidArgument, match="app Bad") as err:
        type("Bad", (ApplicationDefinition,), attrs)
    assert needle in str(err.value)


def test_job_handle_reports_changes() -> None:
    job = job_pb2.Job(id=3, state=job_pb2.JOB_STATE_RUN_DONE, tags={"k": "v"})
    handle = JobHandle(job, Path("/tmp/w"))
    assert handle.changes() == (None, {})
    Simulate(handle).postprocess()
    handle.state = "restart_ready"
    handle.tags["k2"] = "v2"
    state, changed = handle.changes()
    assert state == "RESTART_READY" and changed == {"tags": {"k": "v", "k2": "v2"}, "data": {"post": True}}
    with pytest.raises(ValueError, match="unknown job state"):
        handle.state = "DONE_ISH"


def test_loader_imports_site_apps_folder(tmp_path: Path) -> None:
    (tmp_path / "science.py").write_text(textwrap.dedent("""
        from balsam_grpc.core.appdef import ApplicationDefinition
        class Fit(ApplicationDefinition):
            command_template = "fit {{ n }}"
            parameters = {"n": {"default": 1}}
    """))
    (tmp_path / "_private.py").write_text("raise RuntimeError('not loaded')\n")
    classes = load_app_classes(tmp_path)
    assert list(classes) == ["science.Fit"]
    assert classes["science.Fit"].app_message(2).class_path == "science.Fit"


def test_loader_names_the_broken_file(tmp_path: Path) -> None:
    (tmp_path / "broken.py").write_text("import not_a_module_anywhere\n")
    with pytest.raises(InvalidArgument, match="broken.py"):
        load_app_classes(tmp_path)


def test_loader_names_a_file_that_exits(tmp_path: Path) -> None:
    """An apps file calling sys.exit() (a script copied into apps/) ended the process
    that imported it: `balsamctl app sync` exited 3 and `balsamctl site start`'s daemon
    exited 3, neither saying why."""
    (tmp_path / "script.py").write_text("import sys\nsys.exit(3)\n")
    with pytest.raises(InvalidArgument, match=r"script.py: importing the apps file failed: SystemExit: 3"):
        load_app_classes(tmp_path)
