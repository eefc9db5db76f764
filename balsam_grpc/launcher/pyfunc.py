"""`python -m balsam_grpc.launcher.pyfunc`: run one Python-function app in its own process.

Loads the site's app classes, builds the JobHandle, calls `run(**parameters)` with the
typed parameters plus the pickled keyword arguments the SDK sent (core.pyvalues), and
writes the outcome as JSON: {"ok": true, "result_pickle": ..., "result": <small plain-JSON
copy>} or {"ok": false, "error": <traceback>, "exception_pickle": ...}. A return value
that cannot be pickled or is too large fails the run with the reason; nothing is
dropped silently. Output goes to job.out like any other job, so kill, timeout and tails
work the same.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

from google.protobuf import json_format

from balsam_grpc.core import pyvalues
from balsam_grpc.core.appdef import JobHandle, load_app_classes, resolve_parameters
from balsam_grpc.v1 import session_service_pb2


def _write(path: Path, outcome: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(outcome))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m balsam_grpc.launcher.pyfunc")
    p.add_argument("--apps", required=True, help="the site's apps folder")
    p.add_argument("--job", required=True, help="LeasedJob as JSON (job + app)")
    p.add_argument("--result", required=True, help="where to write the outcome JSON")
    a = p.parse_args(argv)
    result = Path(a.result)
    try:
        leased = json_format.Parse(Path(a.job).read_text(), session_service_pb2.LeasedJob())
        classes = load_app_classes(Path(a.apps))
        cls = classes.get(leased.app.class_path)
        if cls is None:
            raise LookupError(f"app class {leased.app.class_path!r} not found in {a.apps} "
                              f"(found: {', '.join(sorted(classes)) or 'none'})")
        handle = JobHandle(leased.job, Path.cwd())
        kwargs = resolve_parameters(leased.app, dict(leased.job.parameters))
        pickled_args = leased.job.data.fields.get(pyvalues.ARGS_KEY)
        if pickled_args is not None:
            kwargs.update(pyvalues.decode(pickled_args.string_value))
        value = cls(handle).run(**kwargs)
        outcome = {"ok": True, pyvalues.RESULT_KEY: pyvalues.encode(value, "run()'s return value")}
        if (copy := pyvalues.readable(value)) is not None:
            outcome[pyvalues.RESULT_JSON_KEY] = copy
    except BaseException as exc:  # noqa: BLE001 - any failure of user code is the job's failure
        tb = traceback.format_exc()
        sys.stderr.write(tb)
        sys.stderr.flush()
        outcome = {"ok": False, "error": tb}
        try:  # the caller's job.result() re-raises it; an exception that will not pickle leaves the text
            outcome[pyvalues.EXCEPTION_KEY] = pyvalues.encode(exc, "the exception")
        except ValueError:
            pass
        _write(result, outcome)
        return 1
    _write(result, outcome)
    return 0


if __name__ == "__main__":
    sys.exit(main())
