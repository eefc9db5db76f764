"""Transfer backends behind one interface (base.Backend), one per location URL scheme."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from balsam_grpc.site.transfers.backends.base import Backend, TransferFailed, TransferUnavailable
from balsam_grpc.site.transfers.config import Location, TransferSettings

__all__ = ["Backend", "TransferFailed", "TransferUnavailable", "make_backend"]


def make_backend(location: Location, settings: TransferSettings, *, site_dir: Path, data_dir: Path,
                 wake: Callable[[], None]) -> Backend:
    """The backend of a location, chosen by its URL scheme."""
    if location.scheme == "file":
        from balsam_grpc.site.transfers.backends.local import LocalBackend

        return LocalBackend(location, data_dir=data_dir, bandwidth_mb_s=settings.local_bandwidth_mb_s, wake=wake)
    if location.scheme == "rsync":
        from balsam_grpc.site.transfers.backends.rsync import RsyncBackend

        return RsyncBackend(location, settings.rsync, data_dir=data_dir, wake=wake)
    from balsam_grpc.site.transfers.backends.globus import GlobusBackend, site_transfer_client

    return GlobusBackend(location, settings.globus,
                         client_factory=lambda: site_transfer_client(site_dir, settings.globus),
                         site_dir=site_dir)
