"""The XPCS reduction as a site app (copy this file into a site's apps folder; the demo
does). A Python-function app: the launcher runs `run()` in its own process, and the
returned summary becomes the job's result (`job.result()` in the SDK).

The app touches only its workdir. The site's transfer service stages the dataset IN
from the instrument (slot `dataset`, e.g. `aps:/run7/ds-0001.h5`: a raw HDF5 file, see
balsam_grpc/xpcs/h5io.py, or an .npz) before the job may run, and stages the summary
(g2 curves and fits per q-ring) OUT to the analysis location after it ran (slot
`result`, e.g. `results:/run7/ds-0001.json`); the job is JOB_FINISHED only once the
results have landed there. The optional slot `viewer` stages out the results file in
pyXPCSViewer's layout (multi-tau g2 and two-time maps; `results:/run7/ds-0001_results.hdf`). The locations are the site's
`transfer_locations` (file://, rsync:// or globus://).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from balsam_grpc.core.appdef import ApplicationDefinition

DATASET_FILE = "dataset.npz"
RESULT_FILE = "result.json"
VIEWER_FILE = "result_results.hdf"


class XpcsAnalysis(ApplicationDefinition):
    """XPCS reduction of one dataset: multi-tau g2 and two-time maps per q-ring, decay fits, D from Gamma = D q^2."""

    parameters: ClassVar[dict[str, dict[str, Any]]] = {
        "rings": {"default": 8, "type": "int", "help": "number of q-rings"},
        "workers": {"default": 1, "type": "int", "help": "threads for the correlations (the same results)"},
    }
    transfers: ClassVar[dict[str, dict[str, Any]]] = {
        "dataset": {"direction": "in", "local_path": DATASET_FILE, "required": True,
                    "description": "the .npz of frames the detector wrote (location:/path)"},
        "result": {"direction": "out", "local_path": RESULT_FILE, "required": True,
                   "description": "where the results JSON goes (location:/path)"},
        "viewer": {"direction": "out", "local_path": VIEWER_FILE, "required": False,
                   "description": "where the HDF5 results for pyXPCSViewer go (location:/path)"},
    }
    # The staged-in frames are a copy: gone once the job is done (the results stay until
    # the workdir is removed; they are also at the destination).
    cleanup_files: ClassVar[list[str]] = [DATASET_FILE]
    retry_policy: ClassVar[dict[str, Any]] = {"max_retries": 1, "on_error": "restart", "on_timeout": "restart"}

    def run(self, rings: int = 8, workers: int = 1) -> dict:
        from balsam_grpc.xpcs.analysis import (
            analyze_file,  # numpy loads in the job's process only
        )

        workdir = Path(self.job.workdir)
        results = analyze_file(workdir / DATASET_FILE, workdir / RESULT_FILE, n_rings=int(rings),
                               viewer_path=workdir / VIEWER_FILE, workers=int(workers))
        fitted = [r for r in results["rings"] if r["fit_ok"]]
        return {
            "diffusion_m2_per_s": results["diffusion_m2_per_s"],
            "truth_diffusion_m2_per_s": (results.get("truth") or {}).get("diffusion_m2_per_s"),
            "rings_fitted": len(fitted),
            "relaxation_times_s": [r["relaxation_time_s"] for r in results["rings"]],
            "frames": results["frames"],
            "analysis_seconds": results["seconds"],
        }
