"""`python -m balsam_grpc.server [--address HOST:PORT] [--database URL] ...`"""

from __future__ import annotations

import argparse
import os

from balsam_grpc.core import aio
from balsam_grpc.core.logging import configure_logging
from balsam_grpc.server.app import serve
from balsam_grpc.server.state import ServerSettings
from balsam_grpc.server.store.db import relax_gc
from balsam_grpc.server.wire import limit_malloc_arenas


def settings_from_args(argv: list[str] | None = None) -> ServerSettings:
    defaults = ServerSettings()
    p = argparse.ArgumentParser(prog="python -m balsam_grpc.server", description="Run the balsam-grpc server.")
    p.add_argument("--address", default=defaults.address, help="bind address (env BALSAM_SERVER_ADDRESS)")
    p.add_argument("--database", default=defaults.database_url, help="database URL (env BALSAM_DATABASE_URL)")
    p.add_argument("--tls-cert", default=defaults.tls_cert, help="server certificate (PEM)")
    p.add_argument("--tls-key", default=defaults.tls_key, help="server private key (PEM)")
    p.add_argument("--tls-client-ca", default=defaults.tls_client_ca, help="CA of client certificates (mTLS)")
    p.add_argument("--allow-insecure-remote", action="store_true",
                   help="listen on a non-loopback address without TLS")
    p.add_argument("--lease-timeout", type=int, default=defaults.lease_timeout_seconds,
                   help="seconds a launcher stream may be gone before its session expires")
    p.add_argument("--metrics-address", default=defaults.metrics_address,
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (env BALSAM_METRICS_ADDRESS)")
    p.add_argument("--migrate-only", action="store_true", help="apply database migrations and exit")
    a = p.parse_args(argv)
    if a.migrate_only:
        from balsam_grpc.server.store.migrate import upgrade

        print(f"database at revision {upgrade(a.database)}")
        raise SystemExit(0)
    return ServerSettings(address=a.address, database_url=a.database, tls_cert=a.tls_cert, tls_key=a.tls_key,
                          tls_client_ca=a.tls_client_ca, allow_insecure_remote=a.allow_insecure_remote,
                          lease_timeout_seconds=a.lease_timeout, metrics_address=a.metrics_address)


def main(argv: list[str] | None = None) -> None:
    # Everything the server writes (the database and its -wal/-shm files, BALSAM_HOME, the
    # profile with its token) is created owner-only, whatever the caller's umask.
    os.umask(0o077)
    limit_malloc_arenas()  # before any thread: memory comes back after large requests
    configure_logging()
    settings = settings_from_args(argv)
    relax_gc()  # process-wide, so decided by the server process, not by a library object
    aio.run(serve(settings))


if __name__ == "__main__":
    main()
