"""The daemon's small on-disk memory: batch jobs it is submitting or submitted, and pilots
it asked for or created (elastic queue or queue maintainer).

Why: after a kill -9 the server offers "submit:<id>" again when the result never got
acknowledged. Three moments matter:

- `intents`: written (and fsynced) BEFORE the scheduler is asked, with the pilot's
  deterministic scheduler job name. An intent with no scheduler id after a restart means
  the daemon died mid-submit: the scheduler is asked for that name, and a job found is
  adopted instead of submitting a second one.
- `submitted`: batch job id -> scheduler id, written once the scheduler answered (the
  intent goes in the same write). A re-offer is answered from here, never resubmitted.
- `pilot_requests`: a CreateBatchJob the driver sent and has not seen answered, with its
  request_id and content, so a retry (also after a restart) is the same request and the
  server answers it with the first pilot; `pilots` records each answered one's origin.

Written atomically (temp file + fsync + rename + directory fsync) on every change; tiny.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class SubmittedJob:
    scheduler_id: str
    submit_time: float
    script: str = ""


@dataclass
class SubmitIntent:
    """A submission about to be (or being) made: the scheduler may or may not have it."""

    job_name: str
    intent_time: float
    script: str = ""


@dataclass
class PilotRequest:
    """A CreateBatchJob sent and not yet answered: resent as is (same request_id)."""

    request_id: str
    origin: str                       # "elastic" | "maintainer"
    batch_job: dict[str, Any]         # the BatchJob fields sent (plain values)
    reason: str = ""


@dataclass
class JournalData:
    submitted: dict[str, SubmittedJob] = field(default_factory=dict)
    intents: dict[str, SubmitIntent] = field(default_factory=dict)
    # Pilot id -> "elastic" | "maintainer".
    pilots: dict[str, str] = field(default_factory=dict)
    # request_id -> the request.
    pilot_requests: dict[str, PilotRequest] = field(default_factory=dict)


class Journal:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.data = self._load()

    def _load(self) -> JournalData:
        if not self.path.exists():
            return JournalData()
        try:
            raw = json.loads(self.path.read_text())
            return JournalData(
                submitted={k: SubmittedJob(**v) for k, v in (raw.get("submitted") or {}).items()},
                intents={k: SubmitIntent(**v) for k, v in (raw.get("intents") or {}).items()},
                pilots={str(k): str(v) for k, v in (raw.get("pilots") or {}).items()},
                pilot_requests={k: PilotRequest(**v) for k, v in (raw.get("pilot_requests") or {}).items()})
        except (OSError, ValueError, TypeError, AttributeError):
            # A corrupt journal must not stop the daemon; the server's batch job list and
            # the scheduler still describe every pilot.
            broken = self.path.with_suffix(".corrupt")
            os.replace(self.path, broken)
            return JournalData()

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as fh:
            json.dump({"submitted": {k: asdict(v) for k, v in self.data.submitted.items()},
                       "intents": {k: asdict(v) for k, v in self.data.intents.items()},
                       "pilots": self.data.pilots,
                       "pilot_requests": {k: asdict(v) for k, v in self.data.pilot_requests.items()}}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        # The rename itself must be durable before the scheduler is asked (an intent).
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    # ----- submissions ----------------------------------------------------------------
    def submitted(self, batch_job_id: int) -> SubmittedJob | None:
        return self.data.submitted.get(str(batch_job_id))

    def intent(self, batch_job_id: int) -> SubmitIntent | None:
        return self.data.intents.get(str(batch_job_id))

    def record_intent(self, batch_job_id: int, intent: SubmitIntent) -> None:
        self.data.intents[str(batch_job_id)] = intent
        self._save()

    def drop_intent(self, batch_job_id: int) -> None:
        if self.data.intents.pop(str(batch_job_id), None) is not None:
            self._save()

    def record_submit(self, batch_job_id: int, entry: SubmittedJob) -> None:
        """The scheduler id of a submitted (or adopted) batch job; its intent is done."""
        self.data.submitted[str(batch_job_id)] = entry
        self.data.intents.pop(str(batch_job_id), None)
        self._save()

    def forget(self, batch_job_ids: list[int]) -> None:
        changed = False
        for bid in batch_job_ids:
            changed |= self.data.submitted.pop(str(bid), None) is not None
            changed |= self.data.intents.pop(str(bid), None) is not None
            changed |= self.data.pilots.pop(str(bid), None) is not None
        if changed:
            self._save()

    def submitted_ids(self) -> list[int]:
        return [int(k) for k in self.data.submitted]

    def intent_ids(self) -> list[int]:
        return [int(k) for k in self.data.intents]

    # ----- pilots ---------------------------------------------------------------------
    def record_pilot(self, batch_job_id: int, origin: str) -> None:
        self.data.pilots[str(batch_job_id)] = origin
        self._save()

    def pilot_origin(self, batch_job_id: int) -> str:
        return self.data.pilots.get(str(batch_job_id), "")

    def record_pilot_request(self, request: PilotRequest) -> None:
        self.data.pilot_requests[request.request_id] = request
        self._save()

    def pilot_requests(self) -> list[PilotRequest]:
        return list(self.data.pilot_requests.values())

    def pilot_created(self, request_id: str, batch_job_id: int, origin: str) -> None:
        """The answer to a pilot request arrived: the pilot's origin, and the request is done
        (one write, so a crash never keeps both or neither)."""
        self.data.pilots[str(batch_job_id)] = origin
        self.data.pilot_requests.pop(request_id, None)
        self._save()

    def drop_pilot_request(self, request_id: str) -> None:
        if self.data.pilot_requests.pop(request_id, None) is not None:
            self._save()
