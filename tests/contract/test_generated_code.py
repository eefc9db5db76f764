"""Contract tests of protos/ and the committed stubs in balsam_grpc/v1/ (DESIGN.md section 2)."""

from __future__ import annotations

import importlib
import pickle
import pkgutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from google.protobuf.descriptor import Descriptor, EnumDescriptor

import balsam_grpc.v1

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "balsam.v1"
SERVICES = {
    "SiteService",
    "AppService",
    "JobService",
    "BatchJobService",
    "TransferService",
    "SessionService",
    "EventService",
    "AuthService",
}


def _pb2_modules() -> list[ModuleType]:
    names = sorted(m.name for m in pkgutil.iter_modules(balsam_grpc.v1.__path__) if m.name.endswith("_pb2"))
    return [importlib.import_module(f"balsam_grpc.v1.{name}") for name in names]


PB2_MODULES = _pb2_modules()


def _messages(descriptors) -> Iterator[Descriptor]:
    for desc in descriptors:
        yield desc
        yield from _messages(desc.nested_types)


def _module_messages(module: ModuleType) -> Iterator[Descriptor]:
    return _messages(module.DESCRIPTOR.message_types_by_name.values())


def _all_enums() -> Iterator[EnumDescriptor]:
    for module in PB2_MODULES:
        yield from module.DESCRIPTOR.enum_types_by_name.values()
        for desc in _module_messages(module):
            yield from desc.enum_types


def _message_class(module: ModuleType, desc: Descriptor) -> type:
    obj = module
    for part in desc.full_name.removeprefix(PACKAGE + ".").split("."):
        obj = getattr(obj, part)
    return obj


def _buf() -> Path:
    buf = Path(sys.executable).parent / "buf"
    if not buf.is_file():
        pytest.skip(f"buf binary not found next to {sys.executable} (pip install buf-bin, or scripts/setup_dev.sh)")
    return buf


def test_stubs_do_not_drift_from_protos() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_stub_modules_found() -> None:
    assert len(PB2_MODULES) >= len(SERVICES), [m.__name__ for m in PB2_MODULES]


@pytest.mark.parametrize("module", PB2_MODULES, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_every_message_pickles(module: ModuleType) -> None:
    for desc in _module_messages(module):
        cls = _message_class(module, desc)
        # The module-name rewrite in gen_protos.py is what makes this hold.
        assert cls.__module__ == module.__name__, desc.full_name
        msg = cls()
        assert pickle.loads(pickle.dumps(msg)) == msg, desc.full_name


def test_populated_message_pickle_round_trip() -> None:
    from balsam_grpc.v1 import job_pb2

    job = job_pb2.Job(id=7, name="x", state=job_pb2.JOB_STATE_RUNNING, parent_ids=[1, 2])
    job.tags["experiment"] = "xpcs"
    job.resources.num_nodes = 2
    job.data.update({"k": [1, "a"]})
    assert pickle.loads(pickle.dumps(job)) == job


def test_buf_lint() -> None:
    proc = subprocess.run([_buf(), "lint"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_buf_format() -> None:
    proc = subprocess.run([_buf(), "format", "-d", "--exit-code"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_all_services_exist() -> None:
    found = {}
    for module in PB2_MODULES:
        for name, service in module.DESCRIPTOR.services_by_name.items():
            assert name not in found, f"{name} defined twice"
            found[name] = service
    missing = SERVICES - found.keys()
    assert not missing, f"services missing from the descriptors: {sorted(missing)}"
    for name in SERVICES:
        service = found[name]
        assert service.full_name == f"{PACKAGE}.{name}"
        assert service.methods, f"{name} has no RPCs"
        stem = Path(service.file.name).stem
        grpc_module = importlib.import_module(f"balsam_grpc.v1.{stem}_pb2_grpc")
        for attr in (f"{name}Stub", f"{name}Servicer", f"add_{name}Servicer_to_server"):
            assert hasattr(grpc_module, attr), f"{grpc_module.__name__}.{attr}"


def test_enum_zero_values_are_unspecified() -> None:
    enums = list(_all_enums())
    assert enums
    bad = []
    for enum in enums:
        zero = enum.values_by_number.get(0)
        if zero is None or not zero.name.endswith("_UNSPECIFIED"):
            bad.append(f"{enum.full_name}: zero value is {zero.name if zero else None}")
    assert not bad, "\n".join(bad)
