"""Apps as code from the SDK: sync_apps registers a site's apps folder (create, update
by name, unchanged, remove only when asked) and ApplicationDefinition.submit creates
jobs, checking parameters before sending."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from balsam_grpc.core.appdef import load_app_classes
from balsam_grpc.sdk import ApplicationDefinition, Client, InvalidArgument, Site, sync_apps

EIGEN = '''
from balsam_grpc.core.appdef import ApplicationDefinition

class Eigen(ApplicationDefinition):
    """Eigen decomposition of a dataset."""
    command_template = "eigen {{ input }} --out {{ output }}"
    parameters = {"input": {"required": True, "type": "path"}, "output": {"default": "out.h5"}}
    environment_variables = {"OMP_NUM_THREADS": "8"}
    retry_policy = {"max_retries": 2, "on_error": "restart"}

    def postprocess(self):
        self.job.data = {"done": True}
'''

ADDER = '''
from balsam_grpc.core.appdef import ApplicationDefinition

class Adder(ApplicationDefinition):
    def run(self, x, y=2):
        return int(x) + int(y)
    parameters = {"x": {"required": True, "type": "int"}, "y": {"default": 2, "type": "int"}}
'''


def write(folder: Path, name: str, text: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(textwrap.dedent(text))


def test_sync_apps_create_update_unchanged_remove(client: Client, site: Site, tmp_path: Path) -> None:
    folder = tmp_path / "apps"
    write(folder, "eigen.py", EIGEN)
    write(folder, "adder.py", ADDER)
    client.apps.create(site_id=site.id, name="Legacy", command_template="true")

    first = sync_apps(client, site.id, folder)
    assert sorted(first.created) == ["Adder", "Eigen"] and not first.updated and not first.removed
    eigen = client.apps.get(site_id=site.id, name="Eigen")
    assert eigen.hooks.postprocess and eigen.environment == {"OMP_NUM_THREADS": "8"}
    assert eigen.class_path == "eigen.Eigen" and eigen.description.startswith("Eigen decomposition")
    assert client.apps.get(site_id=site.id, name="Adder").kind == "PYTHON"

    again = sync_apps(client, site.id, folder)
    assert sorted(again.unchanged) == ["Adder", "Eigen"] and not again.changed

    write(folder, "eigen.py", EIGEN.replace('"8"', '"16"'))
    changed = sync_apps(client, site.id, folder)
    assert changed.updated == ["Eigen"] and changed.unchanged == ["Adder"]
    assert client.apps.get(id=eigen.id).environment == {"OMP_NUM_THREADS": "16"}  # same app, updated in place

    preview = sync_apps(client, site.id, folder, remove_missing=True, dry_run=True)
    assert preview.removed == ["Legacy"] and client.apps.filter(site=site, name="Legacy").count() == 1
    removed = sync_apps(client, site.id, folder, remove_missing=True)
    assert removed.removed == ["Legacy"] and client.apps.filter(site=site, name="Legacy").count() == 0


def test_appdef_submit_checks_parameters_before_sending(client: Client, site: Site, tmp_path: Path) -> None:
    folder = tmp_path / "apps"
    write(folder, "eigen.py", EIGEN)
    sync_apps(client, site.id, folder)
    eigen_cls = load_app_classes(folder)["eigen.Eigen"]
    assert issubclass(eigen_cls, ApplicationDefinition)

    job = eigen_cls.submit("eig/1", site=site, client=client, input="/data/a.h5", tags={"exp": "xpcs"}, num_nodes=1)
    assert job.id and job.app_id == client.apps.get(site_id=site.id, name="Eigen").id
    assert job.parameters["input"] == "/data/a.h5" and job.tags == {"exp": "xpcs"}
    by_name = eigen_cls.submit("eig/2", site=site.name, client=client, input="/data/b.h5")
    assert by_name.site_id == site.id

    before = client.jobs.count()
    with pytest.raises(InvalidArgument) as missing:
        eigen_cls.submit("eig/3", site=site, client=client)
    assert missing.value.field == "parameters.input"
    with pytest.raises(InvalidArgument) as unknown:
        eigen_cls.submit("eig/4", site=site, client=client, input="x", colour="red")
    assert unknown.value.field == "parameters.colour"
    assert client.jobs.count() == before
