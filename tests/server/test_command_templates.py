"""AppService refuses command templates that could place a value where a shell re-parses
it, with INVALID_ARGUMENT naming app.command_template and a message showing the right form;
the `shell` declaration round-trips and decides which templates are valid."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2

from balsam_grpc.v1 import app_pb2, app_service_pb2
from tests.support.hostile import RIGHT_FORM
from tests.support.resources import Api, expect_error

Code = grpc.StatusCode


@pytest.fixture
def api(alice: Any) -> Api:
    return Api(alice)


def _app(site_id: int, template: str, *, shell: bool = False, name: str = "sim") -> app_pb2.App:
    return app_pb2.App(site_id=site_id, name=name, command_template=template, shell=shell,
                       parameters=[app_pb2.AppParameter(name="x")])


@pytest.mark.parametrize(("template", "shell", "needle"), [
    ("/bin/sh -c 'echo start; sleep {{ x }}; echo end'", False, "inside quotes"),
    ('echo "{{ x }}"', False, "inside quotes"),
    ('echo "{{ x }}"', True, "inside quotes"),
    ("python -c 'print({{ x }})'", False, "inside quotes"),
    ("echo {{ x }} > out.txt", False, "shell syntax"),
])
@pytest.mark.edge("a command template with a placeholder inside quotes, or shell syntax without shell",
                  "refused at registration (INVALID_ARGUMENT) showing the right form; nothing stored")
def test_unsafe_templates_are_refused_with_the_right_form(api: Api, template: str, shell: bool,
                                                          needle: str) -> None:
    site = api.site()
    err = expect_error(lambda: api.apps.CreateApp(app_service_pb2.CreateAppRequest(app=_app(site.id, template,
                                                                                             shell=shell))),
                       Code.INVALID_ARGUMENT, field="app.command_template")
    assert needle in err.details()
    if needle == "inside quotes":
        assert RIGHT_FORM in err.details() and "shell = True" in err.details()
    assert api.list_apps() == []


def test_shell_declaration_round_trips_and_decides_validity(api: Api) -> None:
    site = api.site()
    script = "echo {{ x }} > out.txt; wc -c out.txt"
    app = api.apps.CreateApp(app_service_pb2.CreateAppRequest(app=_app(site.id, script, shell=True))).app
    assert app.shell and api.apps.GetApp(app_service_pb2.GetAppRequest(id=app.id)).app.shell
    # Turning the shell off would make the script's redirection an argument: refused, unchanged.
    expect_error(lambda: api.apps.UpdateApp(app_service_pb2.UpdateAppRequest(
        app=app_pb2.App(id=app.id, shell=False), update_mask=field_mask_pb2.FieldMask(paths=["shell"]))),
        Code.INVALID_ARGUMENT, field="app.command_template")
    assert api.apps.GetApp(app_service_pb2.GetAppRequest(id=app.id)).app.shell
    updated = api.apps.UpdateApp(app_service_pb2.UpdateAppRequest(
        app=app_pb2.App(id=app.id, command_template="prog --x={{ x }}", shell=False),
        update_mask=field_mask_pb2.FieldMask(paths=["command_template", "shell"]))).app
    assert not updated.shell and updated.command_template == "prog --x={{ x }}"
