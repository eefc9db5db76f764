"""SDK fixtures: a Client per test user against the shared in-process server
(tests/conftest.py `harness`, SQLite and PostgreSQL), with a site and an app."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import pytest

from balsam_grpc.sdk import App, Client, Site


def make_client(harness: Any, caller: Any, **kw: Any) -> Client:
    return Client(harness.address, token=caller.token, **kw)


@pytest.fixture
def client(harness: Any, alice: Any) -> Iterator[Client]:
    c = make_client(harness, alice)
    yield c
    c.close()


@pytest.fixture
def other_client(harness: Any, alice: Any) -> Iterator[Client]:
    """A second connection of the same user (another process, in spirit)."""
    c = make_client(harness, alice)
    yield c
    c.close()


@pytest.fixture
def site(client: Client) -> Site:
    return client.sites.create(name=f"site-{secrets.token_hex(4)}", hostname="login1", path="/home/u/site")


@pytest.fixture
def app(client: Client, site: Site) -> App:
    return client.apps.create(site_id=site.id, name="echo", command_template="echo {{ word }} {{ n }}",
                              parameters=[{"name": "word", "required": True},
                                          {"name": "n", "default_value": "1", "type": "PARAMETER_TYPE_INT"}])
