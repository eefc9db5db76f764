"""The reduction of one dataset: load frames, ring masks, multi-tau g2, fits, results file."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from balsam_grpc.xpcs.fit import fit_decay
from balsam_grpc.xpcs.geometry import Geometry, ring_labels
from balsam_grpc.xpcs.multitau import multitau_g2
from balsam_grpc.xpcs.synthetic import Dataset


def save_dataset(dataset: Dataset, path: Path, *, compress: bool = True) -> Path:
    """One .npz: frames plus the metadata (geometry, frame time, and the known truth).

    Compression halves the file but costs about twice the generation time; a live
    agent writing bursts saves uncompressed, like a detector's raw stream."""
    meta = {"frame_time_s": dataset.frame_time_s, "geometry": dataset.geometry.to_dict(),
            "truth": {"diffusion_m2_per_s": dataset.diffusion_m2_per_s, "contrast": dataset.contrast}}
    path = Path(path)
    with path.open("wb") as fh:  # a file handle keeps numpy from appending ".npz"
        save = np.savez_compressed if compress else np.savez
        save(fh, frames=dataset.frames, meta=np.array(json.dumps(meta)))
    return path


def load_dataset(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    with np.load(path, allow_pickle=False) as data:
        if "frames" not in data or "meta" not in data:
            raise ValueError(f"{path}: not an XPCS dataset (needs 'frames' and 'meta')")
        return data["frames"], json.loads(str(data["meta"]))


def analyze(frames: np.ndarray, meta: dict[str, Any], *, n_rings: int = 8, buffers: int = 8) -> dict[str, Any]:
    """g2 per q-ring and a decay fit per ring, as a JSON-ready dict."""
    started = time.perf_counter()
    geometry = Geometry(**meta["geometry"])
    q_map = geometry.q_map()
    labels, q_centres = ring_labels(q_map, n_rings)
    corr = multitau_g2(frames, labels, n_rings, meta["frame_time_s"], buffers=buffers)
    # A ring's decay rate is D <q^2> over its pixels, not D q_centre^2.
    inside = labels >= 0
    q2_mean = (np.bincount(labels[inside], weights=q_map[inside] ** 2, minlength=n_rings)
               / np.maximum(np.bincount(labels[inside], minlength=n_rings), 1))
    rings = []
    truth_d = (meta.get("truth") or {}).get("diffusion_m2_per_s")
    for i, q in enumerate(q_centres):
        fit = fit_decay(corr.tau_s, corr.g2[i], corr.g2_err[i])
        ring = {"q_per_m": float(q), "q2_mean_per_m2": float(q2_mean[i]), "pixels": int(corr.pixels[i]), "g2": _floats(corr.g2[i]),
                "g2_err": _floats(corr.g2_err[i]), "baseline": fit.baseline, "beta": fit.beta, "gamma_per_s": fit.gamma_per_s,
                "gamma_err": fit.gamma_err, "relaxation_time_s": fit.relaxation_time_s,
                "chi2_reduced": fit.chi2_reduced, "fit_ok": fit.ok}
        if truth_d:
            ring["true_gamma_per_s"] = truth_d * float(q2_mean[i])
        rings.append(ring)
    gammas = np.array([r["gamma_per_s"] for r in rings])
    q2 = q2_mean
    ok = np.isfinite(gammas)
    # Gamma = D q^2 through the origin: D is the least-squares slope.
    diffusion = float((q2[ok] @ gammas[ok]) / (q2[ok] @ q2[ok])) if ok.any() else float("nan")
    return {
        "frames": int(frames.shape[0]), "shape": list(frames.shape[1:]), "frame_time_s": meta["frame_time_s"],
        "tau_s": _floats(corr.tau_s), "rings": rings, "diffusion_m2_per_s": diffusion,
        "truth": meta.get("truth"), "seconds": time.perf_counter() - started,
    }


def analyze_file(dataset_path: Path, results_path: Path, *, n_rings: int = 8, buffers: int = 8) -> dict[str, Any]:
    frames, meta = load_dataset(dataset_path)
    results = analyze(frames, meta, n_rings=n_rings, buffers=buffers)
    results["dataset"] = str(dataset_path)
    Path(results_path).write_text(json.dumps(results, indent=1, allow_nan=True))
    return results


def _floats(values: np.ndarray) -> list[float]:
    return [float(v) for v in values]
