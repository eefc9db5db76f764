"""settings.yml: the template validates, and every mistake names its key."""

from __future__ import annotations

import pytest
import yaml

from balsam_grpc.site.settings import (
    QueueLimits,
    SettingsError,
    load_settings,
    parse_settings,
    render_settings_template,
)


def template(**kw):
    args = dict(site_id=7, name="laptop", server="127.0.0.1:1", platform="local", scheduler="local",
                queues={"default": QueueLimits(max_nodes=4, max_wall_time_min=60, max_queued=2)},
                projects=[], elastic=True, max_nodes=2)
    args.update(kw)
    return render_settings_template(**args)


def test_template_parses_to_valid_settings(tmp_path):
    path = tmp_path / "settings.yml"
    path.write_text(template())
    s = load_settings(path)
    assert s.site_id == 7 and s.name == "laptop" and s.scheduler.name == "local"
    assert s.allowed_queues["default"] == QueueLimits(max_nodes=4, max_wall_time_min=60, max_queued=2)
    assert s.elastic_queue.enabled and s.elastic_queue.queue == "default" and s.elastic_queue.max_nodes == 2
    assert s.launcher.mode == "serial" and s.processing.workers == 2 and s.cleanup.enabled


def test_template_without_queues_or_projects(tmp_path):
    s = parse_settings(yaml.safe_load(template(queues={}, projects=[], elastic=False)))
    assert s.allowed_queues == {} and s.allowed_projects == []


def data(**changes):
    d = yaml.safe_load(template())
    for dotted, value in changes.items():
        node = d
        *parents, last = dotted.split("__")
        for p in parents:
            node = node[p]
        node[last] = value
    return d


@pytest.mark.parametrize(("changes", "key", "words"), [
    ({"elastic_queue__max_nodes": "two"}, "elastic_queue.max_nodes", "integer"),
    ({"elastic_queue__max_nodes": 0}, "elastic_queue.max_nodes", ">= 1"),
    ({"elastic_queue__min_nodes": 5}, "elastic_queue.min_nodes", "larger than max_nodes"),
    ({"elastic_queue__use_backfill": "yes"}, "elastic_queue.use_backfill", "true or false"),
    ({"elastic_queue__queue": "debug"}, "elastic_queue.queue", "not in allowed_queues"),
    ({"launcher__mode": "parallel"}, "launcher.mode", "serial, mpi"),
    ({"processing__workers": 0}, "processing.workers", ">= 1"),
    ({"scheduler__poll_seconds": 0}, "scheduler.poll_seconds", "> 0"),
    ({"allowed_queues__default__max_nodes": -1}, "allowed_queues.default.max_nodes", ">= 0"),
    ({"site_id": 0}, "site_id", ">= 1"),
    ({"queue_maintainer__num_queued": "x"}, "queue_maintainer.num_queued", "integer"),
])
def test_errors_name_the_key(changes, key, words):
    with pytest.raises(SettingsError) as err:
        parse_settings(data(**changes))
    assert err.value.key == key
    assert key in str(err.value) and words in str(err.value)


def test_unknown_key_suggests_the_right_one():
    d = data()
    d["elastic_queue"]["max_node"] = 3
    with pytest.raises(SettingsError) as err:
        parse_settings(d)
    assert err.value.key == "elastic_queue.max_node"
    assert "did you mean 'max_nodes'" in str(err.value)


def test_missing_required_key():
    d = data()
    del d["site_id"]
    with pytest.raises(SettingsError, match="site_id is required"):
        parse_settings(d)


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(SettingsError, match="balsamctl site init"):
        load_settings(tmp_path / "missing.yml")
    bad = tmp_path / "settings.yml"
    bad.write_text("site_id: [1\n")
    with pytest.raises(SettingsError, match="not valid YAML"):
        load_settings(bad)
    bad.write_text("site_id: 1\nname: x\nscheduler: 3\n")
    with pytest.raises(SettingsError, match=r"settings.yml: scheduler must be a mapping"):
        load_settings(bad)


def test_elastic_queue_max_total_nodes(tmp_path):
    s = parse_settings(data())
    assert s.elastic_queue.max_total_nodes == 0  # the template's default: no cap
    assert parse_settings(data(elastic_queue__max_total_nodes=6)).elastic_queue.max_total_nodes == 6
    for value, words in ((-1, ">= 0"), ("six", "integer"), (1, "smaller than min_nodes")):
        changes = {"elastic_queue__max_total_nodes": value}
        if value == 1:
            changes["elastic_queue__min_nodes"] = 2
        with pytest.raises(SettingsError) as err:
            parse_settings(data(**changes))
        assert err.value.key == "elastic_queue.max_total_nodes" and words in str(err.value)


def test_every_mistake_is_reported_at_once_with_its_key(tmp_path):
    """pydantic checks the whole file: a user fixes every mistake in one edit, not one per
    start. The first mistake's key is the error's key."""
    d = data(launcher__mode="parallel", processing__workers=0, elastic_queue__use_backfill="yes")
    d["cleanup"]["enable"] = True
    with pytest.raises(SettingsError) as err:
        parse_settings(d)
    text = str(err.value)
    for words in ("launcher.mode must be one of serial, mpi, got 'parallel'", "processing.workers must be >= 1",
                  "elastic_queue.use_backfill must be true or false, got 'yes'",
                  "unknown key cleanup.enable; did you mean 'enabled'?"):
        assert words in text, text
    assert err.value.key in {"launcher.mode", "processing.workers", "elastic_queue.use_backfill", "cleanup.enable"}


def test_empty_values_mean_the_default_and_numbers_may_be_text():
    d = data(launcher__mpi_prefix=None, processing=None, elastic_queue__project=1234)
    d["allowed_projects"] = [1234]
    s = parse_settings(d)
    assert s.launcher.mpi_prefix == "" and s.processing.workers == 2 and s.elastic_queue.project == "1234"
    for bad, words in ((float("nan"), "finite"), (True, "a number")):
        with pytest.raises(SettingsError) as err:
            parse_settings(data(scheduler__poll_seconds=bad))
        assert err.value.key == "scheduler.poll_seconds" and words in str(err.value)


@pytest.mark.parametrize("name", ["a: b", "x # y", "[a]", "it's", '"q"', "*ref", "!tag", "null", "123", "yes",
                                  "a\u0085b", "a\u2028b", "a\u009bb", "é\u202e", "a\\b"])
def test_template_keeps_any_site_name_the_server_accepts(tmp_path, name):
    """The name went into settings.yml unquoted: `site init --name 'a: b'` (or "*ref",
    "yes", "[a]", U+0085...) failed with 'settings.yml is not valid YAML' about a file
    the user never wrote, and "x # y" or '"q"' wrote a settings.yml naming another site
    ('x', 'q') than the one created on the server."""
    path = tmp_path / "settings.yml"
    path.write_text(template(name=name, server="host.example:50051"))
    s = load_settings(path)
    assert s.name == name and s.server == "host.example:50051"
