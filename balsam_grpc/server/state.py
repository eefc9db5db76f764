"""What every servicer shares: settings, the database, the authenticator, the event bus."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field

from balsam_grpc.core.settings import DEFAULT_ADDRESS, default_database_url
from balsam_grpc.server.auth import Authenticator
from balsam_grpc.server.store.db import Database


@dataclass
class ServerSettings:
    address: str = field(default_factory=lambda: os.environ.get("BALSAM_SERVER_ADDRESS", DEFAULT_ADDRESS))
    database_url: str = field(default_factory=default_database_url)
    tls_cert: str = field(default_factory=lambda: os.environ.get("BALSAM_TLS_CERT", ""))
    tls_key: str = field(default_factory=lambda: os.environ.get("BALSAM_TLS_KEY", ""))
    # A client CA turns on mTLS: clients must present a certificate it signed.
    tls_client_ca: str = field(default_factory=lambda: os.environ.get("BALSAM_TLS_CLIENT_CA", ""))
    allow_insecure_remote: bool = False
    lease_timeout_seconds: int = 20
    max_jobs_per_call: int = 10_000
    max_map_entries: int = 64
    max_map_value_bytes: int = 4096
    max_message_bytes: int = 64 * 1024 * 1024
    token_ttl_seconds: int = 30 * 24 * 3600
    grace_seconds: float = 5.0


class EventBus:
    """Wakes watchers when committed events pass their cursor (no polling)."""

    def __init__(self) -> None:
        self.high_water = 0
        self._changed = asyncio.Event()

    def published(self, max_event_id: int) -> None:
        if max_event_id > self.high_water:
            self.high_water = max_event_id
            self._changed.set()
            self._changed = asyncio.Event()

    async def wait_beyond(self, cursor: int, timeout: float) -> bool:
        """True when an event newer than `cursor` may exist, False on timeout."""
        if self.high_water > cursor:
            return True
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except TimeoutError:
            return False
        return True


class ServerState:
    def __init__(self, settings: ServerSettings, db: Database) -> None:
        self.settings = settings
        self.db = db
        self.auth = Authenticator(db)
        self.bus = EventBus()
        db.on_events = self.bus.published
