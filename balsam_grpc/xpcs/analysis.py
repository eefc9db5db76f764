"""The reduction of one dataset: frames (a raw HDF5 file, streamed; or an array) -> ring
masks, multi-tau g2, two-time maps, fits; a JSON summary and a results HDF5 file in the
layout pyXPCSViewer opens."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from balsam_grpc.xpcs.fit import fit_decay
from balsam_grpc.xpcs.geometry import Geometry, ring_labels
from balsam_grpc.xpcs.h5io import ResultArrays, holds_h5, is_h5, open_raw, write_raw, write_results
from balsam_grpc.xpcs.multitau import MultiTau
from balsam_grpc.xpcs.synthetic import Dataset
from balsam_grpc.xpcs.twotime import MAX_BINS, MAX_BYTES, TwoTime, TwoTimeAccumulator


def save_dataset(dataset: Dataset, path: Path, *, compress: bool = True) -> Path:
    """Frames plus metadata (geometry, frame time, the known truth): a raw HDF5 file when
    `path` ends in .h5/.hdf/.hdf5 (see h5io), else one .npz.

    Compression halves the file but costs about twice the generation time; a live
    agent writing bursts saves uncompressed, like a detector's raw stream."""
    path = Path(path)
    if is_h5(path):
        return write_raw(path, [dataset.frames], n_frames=dataset.frames.shape[0], geometry=dataset.geometry,
                         frame_time_s=dataset.frame_time_s, truth=dataset.meta()["truth"],
                         compression="lzf" if compress else None)
    with path.open("wb") as fh:  # a file handle keeps numpy from appending ".npz"
        save = np.savez_compressed if compress else np.savez
        save(fh, frames=dataset.frames, meta=np.array(json.dumps(dataset.meta())))
    return path


def load_dataset(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """The whole frame stack and its metadata (small datasets; `analyze_file` streams)."""
    if holds_h5(path):
        with open_raw(path) as raw:
            return raw.frames[()], raw.meta
    with np.load(path, allow_pickle=False) as data:
        if "frames" not in data or "meta" not in data:
            raise ValueError(f"{path}: not an XPCS dataset (needs 'frames' and 'meta')")
        return data["frames"], json.loads(str(data["meta"]))


@dataclass
class Reduction:
    summary: dict[str, Any]      # JSON-ready: per ring g2, fits; D; truth; timings
    arrays: ResultArrays         # what the results HDF5 file holds
    geometry: Geometry
    twotime: TwoTime | None

    def write_h5(self, path: Path) -> Path:
        return write_results(path, self.arrays, self.geometry)


def reduce_stream(blocks: Iterable[np.ndarray], n_frames: int, meta: dict[str, Any], *, n_rings: int = 8,
                  buffers: int = 8, twotime: bool = True, twotime_rings: list[int] | None = None,
                  twotime_max_bins: int = MAX_BINS, twotime_max_bytes: int = MAX_BYTES,
                  workers: int = 1) -> Reduction:
    """One pass over the frames (blocks in time order): multi-tau g2, two-time maps, the
    time-averaged image and the mean intensity per frame, then a decay fit per ring.

    `workers` threads share the kernels' work (multi-tau pixel tiles, two-time rings):
    the results are the same whatever their number."""
    started = time.perf_counter()
    geometry = Geometry(**meta["geometry"])
    q_map = geometry.q_map()
    labels, q_centres = ring_labels(q_map, n_rings)
    frame_time = float(meta["frame_time_s"])
    kernel = MultiTau(labels, n_rings, n_frames, frame_time, buffers=buffers, workers=workers)
    c2 = (TwoTimeAccumulator(labels, n_rings, n_frames, frame_time, rings=twotime_rings,
                             max_bins=twotime_max_bins, max_bytes=twotime_max_bytes, workers=workers)
          if twotime else None)
    # Both kernels over the same pixels in the same order (all rings mapped): one gather.
    shared = c2 is not None and np.array_equal(c2.pixel_index, kernel.pixel_index)
    image = np.zeros(labels.shape)
    intensity = np.zeros(n_frames)
    inside = labels >= 0
    pixels_per_ring = np.bincount(labels[inside], minlength=n_rings).astype(np.float64)
    fed = 0
    for block in blocks:
        block = np.asarray(block)
        if shared:
            picked = kernel.pick(block)
            ring_means = kernel.update_pixels(picked)
            c2.update_pixels(picked)
        else:
            ring_means = kernel.update(block)
            if c2 is not None:
                c2.update(block)
        image += block.sum(axis=0, dtype=np.float64)
        intensity[fed:fed + block.shape[0]] = ring_means @ pixels_per_ring / pixels_per_ring.sum()
        fed += block.shape[0]
    corr = kernel.result()
    maps = c2.result() if c2 is not None else None
    correlate_s = time.perf_counter() - started

    # A ring's decay rate is D <q^2> over its pixels, not D q_centre^2.
    q2_mean = (np.bincount(labels[inside], weights=q_map[inside] ** 2, minlength=n_rings)
               / np.maximum(np.bincount(labels[inside], minlength=n_rings), 1))
    rings = []
    truth_d = (meta.get("truth") or {}).get("diffusion_m2_per_s")
    for i, q in enumerate(q_centres):
        fit = fit_decay(corr.tau_s, corr.g2[i], corr.g2_err[i])
        ring = {"q_per_m": float(q), "q2_mean_per_m2": float(q2_mean[i]), "pixels": int(corr.pixels[i]),
                "g2": _floats(corr.g2[i]), "g2_err": _floats(corr.g2_err[i]), "baseline": fit.baseline,
                "beta": fit.beta, "gamma_per_s": fit.gamma_per_s, "gamma_err": fit.gamma_err,
                "relaxation_time_s": fit.relaxation_time_s, "chi2_reduced": fit.chi2_reduced, "fit_ok": fit.ok}
        if truth_d:
            ring["true_gamma_per_s"] = truth_d * float(q2_mean[i])
        rings.append(ring)
    gammas = np.array([r["gamma_per_s"] for r in rings])
    ok = np.isfinite(gammas)
    # Gamma = D q^2 through the origin: D is the least-squares slope.
    diffusion = float((q2_mean[ok] @ gammas[ok]) / (q2_mean[ok] @ q2_mean[ok])) if ok.any() else float("nan")
    summary = {
        "frames": int(n_frames), "shape": list(labels.shape), "frame_time_s": frame_time,
        "tau_s": _floats(corr.tau_s), "rings": rings, "diffusion_m2_per_s": diffusion,
        "truth": meta.get("truth"), "correlate_seconds": correlate_s, "seconds": time.perf_counter() - started,
        "twotime": None if maps is None else {"rings": [int(r) for r in maps.rings], "bins": int(maps.maps.shape[1]),
                                               "avg_frame": maps.avg_frame, "bin_s": maps.bin_s},
    }
    arrays = ResultArrays(q_per_m=q_centres, tau_s=corr.tau_s, g2=corr.g2, g2_err=corr.g2_err, frame_time_s=frame_time,
                          labels=labels, saxs_2d=image / max(n_frames, 1), intensity_t=intensity,
                          twotime=None if maps is None else maps.maps,
                          twotime_rings=None if maps is None else maps.rings,
                          twotime_avg_frame=1 if maps is None else maps.avg_frame, summary=summary)
    return Reduction(summary=summary, arrays=arrays, geometry=geometry, twotime=maps)


def analyze(frames: np.ndarray, meta: dict[str, Any], *, n_rings: int = 8, buffers: int = 8,
            twotime: bool = False) -> dict[str, Any]:
    """g2 per q-ring and a decay fit per ring of frames in memory, as a JSON-ready dict."""
    return reduce_stream([frames], frames.shape[0], meta, n_rings=n_rings, buffers=buffers, twotime=twotime).summary


def reduce_file(dataset_path: Path, *, n_rings: int = 8, buffers: int = 8, twotime: bool = True,
                block_frames: int | None = None, **kwargs: Any) -> Reduction:
    """Reduce a raw HDF5 file (streamed a block at a time) or an .npz (loaded whole)."""
    if holds_h5(dataset_path):
        with open_raw(dataset_path) as raw:
            return reduce_stream(raw.blocks(block_frames), raw.n_frames, raw.meta, n_rings=n_rings, buffers=buffers,
                                 twotime=twotime, **kwargs)
    frames, meta = load_dataset(dataset_path)
    return reduce_stream([frames], frames.shape[0], meta, n_rings=n_rings, buffers=buffers, twotime=twotime, **kwargs)


def analyze_file(dataset_path: Path, results_path: Path, *, n_rings: int = 8, buffers: int = 8,
                 viewer_path: Path | None = None, workers: int = 1) -> dict[str, Any]:
    """Reduce a dataset; write the JSON summary to `results_path` (or, if it ends in .h5/
    .hdf, the results HDF5 file) and the results HDF5 file also to `viewer_path`."""
    want_h5 = viewer_path is not None or is_h5(results_path)
    reduction = reduce_file(Path(dataset_path), n_rings=n_rings, buffers=buffers, twotime=want_h5, workers=workers)
    results = reduction.summary
    results["dataset"] = str(dataset_path)
    if is_h5(results_path):
        reduction.write_h5(Path(results_path))
    else:
        Path(results_path).write_text(json.dumps(results, indent=1, allow_nan=True))
    if viewer_path is not None:
        reduction.write_h5(Path(viewer_path))
    return results


def _floats(values: np.ndarray) -> list[float]:
    return [float(v) for v in values]
