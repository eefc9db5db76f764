"""Python-function apps take and return any picklable value and raise into the caller:
a numpy array argument, a NaN in a tuple result, an unpicklable or too-large result (the
run fails with the reason, nothing is dropped), and an exception re-raised by
job.result() with the launcher's traceback as its cause. SDK -> server -> launcher."""

from __future__ import annotations

import textwrap
from fractions import Fraction

import numpy as np
import pytest

from balsam_grpc.core import pyvalues
from balsam_grpc.core.appdef import load_app_classes
from balsam_grpc.sdk import Client
from balsam_grpc.sdk.errors import InvalidArgument
from balsam_grpc.v1 import app_service_pb2
from tests.launcher.conftest import Launcher

APPS = textwrap.dedent("""
    from balsam_grpc.core.appdef import ApplicationDefinition

    class Stats(ApplicationDefinition):
        parameters = {"label": {"default": "x"}}
        def run(self, label, values, scale):
            return (label, values * scale, float("nan"))

    class Unpicklable(ApplicationDefinition):
        def run(self):
            import threading
            return threading.Lock()

    class Huge(ApplicationDefinition):
        def run(self):
            return b"x" * (300 * 1024)

    class Refuses(ApplicationDefinition):
        def run(self, limit):
            raise ValueError(f"over the limit of {limit}")
""")


def test_any_picklable_value_in_and_out_and_exceptions_reraised(site, launchers) -> None:
    (site.path / "apps" / "values.py").write_text(APPS)
    for cls in load_app_classes(site.path / "apps").values():
        site.server.call(site.server.apps.CreateApp, app_service_pb2.CreateAppRequest(app=cls.app_message(site.id)))
    launchers.append(Launcher(site, "--mode", "serial", "--cpus-per-node", "4"))
    with Client(site.server.address, token=site.server.token, timeout=30) as client:
        apps = {a.name: a for a in client.apps.filter(site_id=site.id)}
        stats = apps["Stats"].submit("values/stats", label="run-1", values=np.arange(4.0), scale=Fraction(1, 2))
        unpicklable = apps["Unpicklable"].submit("values/lock")
        huge = apps["Huge"].submit("values/huge")
        refuses = apps["Refuses"].submit("values/refuses", limit=7)

        label, scaled, nan = stats.result(timeout=120)
        assert label == "run-1" and isinstance(scaled, np.ndarray) and scaled.tolist() == [0.0, 0.5, 1.0, 1.5]
        assert nan != nan  # NaN came back as NaN: nothing dropped

        # The run fails (RUN_ERROR, then FAILED) and the caller gets the reason raised.
        with pytest.raises(ValueError, match="run\\(\\)'s return value cannot be pickled"):
            unpicklable.result(timeout=120)
        with pytest.raises(pyvalues.ValueTooLarge, match="more than the 180 KiB a job carries"):
            huge.result(timeout=120)
        for job in (unpicklable, huge):
            job.refresh_from_db()
            assert job.state == "FAILED" and "data_dropped" not in job.data, (job.state, job.data)

        with pytest.raises(ValueError, match="over the limit of 7") as raised:
            refuses.result(timeout=120)
        cause = raised.value.__cause__
        assert isinstance(cause, pyvalues.RemoteTraceback) and "Traceback" in cause.traceback_text
        assert 'raise ValueError(f"over the limit of {limit}")' in cause.traceback_text

        with pytest.raises(InvalidArgument, match="cannot be pickled"):
            apps["Refuses"].submit("values/never", limit=(x for x in range(3)))  # a generator: no pickle
        with pytest.raises(InvalidArgument, match="declared parameter of Stats"):
            apps["Stats"].submit("values/never", label=np.zeros(2), values=1, scale=1)
