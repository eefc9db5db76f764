"""Batch-scheduler adapters: local, slurm, pbs, cobalt, lsf.

    sched = get_scheduler("slurm", **options)      # options from the site settings
    text = sched.render_script(template_text, context)
    scheduler_id = await sched.submit(path, project=..., queue=..., num_nodes=..,
                                      wall_time_min=..., job_name=..., cwd=...)
    statuses = await sched.statuses(ids)           # dict id -> SchedulerJob, or None = unknown
    await sched.cancel(scheduler_id)               # an already-gone job is not an error
    found = await sched.find_by_name(name)         # list[SchedulerJob] ([] = none), or None = unknown
    windows = await sched.backfill_windows()       # list[BackfillWindow], or None = unknown

Each adapter is pure render_*/parse_* functions (in its module) around one subprocess call.
"""

from __future__ import annotations

import importlib
from typing import Any

from balsam_grpc.core.errors import InvalidArgument

from .base import (
    STATES,
    BackfillWindow,
    SchedulerAdapter,
    SchedulerJob,
    SchedulerUnavailable,
    SubmitError,
    adoption_order,
    pilot_job_name,
    read_template,
    render_script,
    submitted_since,
)
from .template import TemplateError, render_template, template_names

# name -> (module, class); modules load on first use.
_ADAPTERS: dict[str, tuple[str, str]] = {
    "local": ("local", "LocalScheduler"),
    "slurm": ("slurm", "SlurmScheduler"),
    "pbs": ("pbs", "PbsScheduler"),
    "cobalt": ("cobalt", "CobaltScheduler"),
    "lsf": ("lsf", "LsfScheduler"),
}
SCHEDULER_NAMES: tuple[str, ...] = tuple(_ADAPTERS)


def scheduler_class(name: str) -> type[SchedulerAdapter]:
    if name not in _ADAPTERS:
        raise InvalidArgument(f"unknown scheduler {name!r}; known: {', '.join(SCHEDULER_NAMES)}", field="scheduler")
    module, cls = _ADAPTERS[name]
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def get_scheduler(name: str, **options: Any) -> SchedulerAdapter:
    """An adapter configured with the site's options. Unknown options are an error naming
    them (a typo in the settings must not be silently ignored)."""
    cls = scheduler_class(name)
    try:
        return cls(**options)
    except TypeError as exc:
        raise InvalidArgument(f"bad options for the {name} scheduler: {exc}", field="scheduler_options") from exc
    except ValueError as exc:
        raise InvalidArgument(f"bad options for the {name} scheduler: {exc}", field="scheduler_options") from exc


__all__ = [
    "SCHEDULER_NAMES",
    "STATES",
    "BackfillWindow",
    "SchedulerAdapter",
    "SchedulerJob",
    "SchedulerUnavailable",
    "SubmitError",
    "TemplateError",
    "adoption_order",
    "get_scheduler",
    "pilot_job_name",
    "read_template",
    "render_script",
    "render_template",
    "scheduler_class",
    "submitted_since",
    "template_names",
]
