"""HDF5 files of the XPCS reduction: raw frames in, results out.

Raw input, in the spirit of an APS 8-ID-I acquisition (frames as the detector writes them,
plus the metadata the q-map needs)::

    /entry/data/data                                  (T, rows, cols) counts, chunked by frames
    /entry/instrument/detector_1/frame_time           s between frames
    /entry/instrument/detector_1/count_time           s of exposure per frame
    /entry/instrument/detector_1/x_pixel_size         m (also y_pixel_size; square pixels)
    /entry/instrument/detector_1/distance             m, sample to detector
    /entry/instrument/detector_1/beam_center_x        pixels (column; may lie off the detector)
    /entry/instrument/detector_1/beam_center_y        pixels (row)
    /entry/instrument/incident_beam/incident_energy   keV
    /entry/sample/synthetic  (attrs)                  the generator's truth, when synthetic

`RawFile.blocks()` reads the frames a block at a time (a few MB whatever the run's
length), so a reduction never holds a run in memory.

Results, in the layout pyXPCSViewer (package `xpcs-viewer`) reads through its `aps_8idi`
key map: the q-map under /xpcs/qmap, multi-tau g2 under /xpcs/multitau, the two-time
maps under /xpcs/twotime, the time-averaged scattering under /xpcs/temporal_mean and
the mean intensity per frame under /xpcs/spatial_mean, with detector and beam metadata
under /entry. Our own summary (fits, truth) sits in /xpcs/balsam, which the viewer
ignores. `read_results` reads such a file back into arrays.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from balsam_grpc.xpcs.geometry import Geometry

# keV * Angstrom: lambda = HC_KEV_A / E.
HC_KEV_A = 12.398419843320026
FRAMES = "/entry/data/data"
DETECTOR = "/entry/instrument/detector_1"
ENERGY = "/entry/instrument/incident_beam/incident_energy"
TRUTH = "/entry/sample/synthetic"
# Frames per block when reading: as many as fit in this many bytes (at least one), at
# most BLOCK_FRAMES (more frames per block only add memory, not speed).
BLOCK_BYTES = 32 << 20
BLOCK_FRAMES = 128
H5_SUFFIXES = (".h5", ".hdf", ".hdf5", ".nxs")


HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def is_h5(path: Path | str) -> bool:
    """An HDF5 path by its suffix (for files to write)."""
    return Path(path).suffix.lower() in H5_SUFFIXES


def holds_h5(path: Path | str) -> bool:
    """An existing file that is HDF5, by its signature whatever its name (a staged-in
    dataset keeps the app's local name), or else by its suffix."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            return fh.read(8) == HDF5_SIGNATURE
    except OSError:
        return is_h5(path)


def _scalar(group: h5py.Group, name: str, value: float, units: str) -> None:
    group[name] = value
    group[name].attrs["units"] = units


def _detector(f: h5py.File, geometry: Geometry, frame_time_s: float) -> h5py.Group:
    """The detector and beam metadata both layouts share (frame time, pixel size, energy)."""
    det = f.require_group(DETECTOR)
    _scalar(det, "frame_time", frame_time_s, "s")
    _scalar(det, "count_time", frame_time_s, "s")
    _scalar(det, "x_pixel_size", geometry.pixel_size_m, "m")
    _scalar(det, "y_pixel_size", geometry.pixel_size_m, "m")
    f[ENERGY] = HC_KEV_A / (geometry.wavelength_m * 1e10)
    f[ENERGY].attrs["units"] = "keV"
    return det


def write_raw(path: Path | str, blocks: Iterable[np.ndarray], *, n_frames: int, geometry: Geometry,
              frame_time_s: float, truth: dict[str, float] | None = None, chunk_frames: int = 16,
              compression: str | None = None) -> Path:
    """Write frames (given as blocks, in time order) and their metadata as a raw file.

    The frames dataset is chunked by `chunk_frames` whole frames, as a detector writes;
    `compression` is any h5py filter name ("lzf", "gzip") or None."""
    path = Path(path)
    shape = (n_frames, geometry.rows, geometry.cols)
    with h5py.File(path, "w") as f:
        data = f.create_dataset(FRAMES, shape=shape, dtype=np.uint16, compression=compression,
                                chunks=(max(1, min(chunk_frames, n_frames)), geometry.rows, geometry.cols))
        det = _detector(f, geometry, frame_time_s)
        _scalar(det, "distance", geometry.distance_m, "m")
        _scalar(det, "beam_center_x", geometry.center_col, "pixel")
        _scalar(det, "beam_center_y", geometry.center_row, "pixel")
        if truth:
            f.require_group(TRUTH).attrs.update(truth)
        written = 0
        for block in blocks:
            block = np.asarray(block)
            if written + block.shape[0] > n_frames or block.shape[1:] != shape[1:]:
                raise ValueError(f"block {block.shape} does not fit {shape} after {written} frames")
            data[written:written + block.shape[0]] = block
            written += block.shape[0]
        if written != n_frames:
            raise ValueError(f"{written} frames written, {n_frames} announced")
    return path


@dataclass
class RawFile:
    """An open raw file: its metadata, and its frames a block at a time."""

    path: Path
    file: h5py.File
    meta: dict[str, Any]

    @property
    def frames(self) -> h5py.Dataset:
        return self.file[FRAMES]

    @property
    def n_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.frames.shape)) * self.frames.dtype.itemsize

    def block_frames(self, block_bytes: int = BLOCK_BYTES) -> int:
        frame_bytes = int(np.prod(self.frames.shape[1:])) * self.frames.dtype.itemsize
        frames = max(1, min(BLOCK_FRAMES, block_bytes // max(frame_bytes, 1)))
        chunk = (self.frames.chunks or (1,))[0]
        return max(chunk, frames // chunk * chunk)  # whole HDF5 chunks per read

    def blocks(self, block_frames: int | None = None) -> Iterator[np.ndarray]:
        step = block_frames or self.block_frames()
        for start in range(0, self.n_frames, step):
            yield self.frames[start:start + step]

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> RawFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_raw(path: Path | str) -> RawFile:
    """Open a raw file; ValueError (naming the path and what is missing) if it is not one."""
    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise ValueError(f"{path}: not an HDF5 file ({exc})") from exc
    try:
        missing = [p for p in (FRAMES, ENERGY, *(f"{DETECTOR}/{n}" for n in (
            "frame_time", "x_pixel_size", "distance", "beam_center_x", "beam_center_y"))) if p not in f]
        if missing:
            raise ValueError(f"{path}: not an XPCS raw file (missing {', '.join(missing)})")
        frames = f[FRAMES]
        if frames.ndim != 3:
            raise ValueError(f"{path}: {FRAMES} has shape {frames.shape}, expected (frames, rows, cols)")
        det = f[DETECTOR]
        geometry = Geometry(rows=int(frames.shape[1]), cols=int(frames.shape[2]),
                            center_row=float(det["beam_center_y"][()]), center_col=float(det["beam_center_x"][()]),
                            pixel_size_m=float(det["x_pixel_size"][()]), distance_m=float(det["distance"][()]),
                            wavelength_m=HC_KEV_A / float(f[ENERGY][()]) * 1e-10)
        truth = {k: float(v) for k, v in f[TRUTH].attrs.items()} if TRUTH in f else None
        meta = {"frame_time_s": float(det["frame_time"][()]), "geometry": geometry.to_dict(), "truth": truth}
    except Exception:
        f.close()
        raise
    return RawFile(path=path, file=f, meta=meta)


# --- results in pyXPCSViewer's layout ---------------------------------------------------

@dataclass
class ResultArrays:
    """What a results file holds, as arrays (q in 1/m, times in s)."""

    q_per_m: np.ndarray            # (rings,) ring centres
    tau_s: np.ndarray              # (lags,)
    g2: np.ndarray                 # (rings, lags)
    g2_err: np.ndarray             # (rings, lags)
    frame_time_s: float
    labels: np.ndarray             # (rows, cols) ring of each pixel, -1 outside
    saxs_2d: np.ndarray            # (rows, cols) time-averaged counts per frame
    intensity_t: np.ndarray        # (frames,) mean counts per pixel, per frame
    twotime: np.ndarray | None = None        # (maps, bins, bins)
    twotime_rings: np.ndarray | None = None  # (maps,) ring of each map
    twotime_avg_frame: int = 1
    summary: dict[str, Any] | None = None    # our JSON summary (fits, D, truth)


def _ascii_list(names: list[str]) -> np.ndarray:
    return np.array([n.encode() for n in names])


def write_results(path: Path | str, res: ResultArrays, geometry: Geometry) -> Path:
    """Write `res` in the layout pyXPCSViewer reads (see the module's docstring)."""
    path = Path(path)
    n_rings = res.q_per_m.size
    roi = np.where(res.labels >= 0, res.labels + 1, 0).astype(np.uint32)   # 1-based bins, 0 = none
    q_a = res.q_per_m * 1e-10                                                 # 1/Angstrom
    qmap_id = hashlib.sha256(roi.tobytes() + json.dumps(geometry.to_dict(), sort_keys=True).encode()).hexdigest()
    # Static (SAXS) bins are the dynamic rings: 1-D intensity per ring.
    ring_pixels = np.bincount(res.labels[res.labels >= 0], minlength=n_rings)
    saxs_1d = (np.bincount(res.labels[res.labels >= 0], weights=res.saxs_2d[res.labels >= 0], minlength=n_rings)
               / np.maximum(ring_pixels, 1))
    with h5py.File(path, "w") as f:
        f["/entry/start_time"] = datetime.now(UTC).isoformat(timespec="seconds")
        f.require_group("/entry/instrument/bluesky/metadata")  # marks the NeXus flavour of the layout
        _detector(f, geometry, res.frame_time_s)

        qmap = f.require_group("/xpcs/qmap")
        qmap.attrs["hash"] = qmap_id
        qmap["mask"] = (roi > 0).astype(np.int32)
        qmap["dynamic_roi_map"] = roi
        qmap["static_roi_map"] = roi
        for kind in ("dynamic", "static"):
            qmap[f"{kind}_v_list_dim0"] = q_a
            qmap[f"{kind}_v_list_dim1"] = np.array([0.0])
            qmap[f"{kind}_index_mapping"] = np.arange(n_rings)
            qmap[f"{kind}_num_pts"] = np.array([n_rings, 1])
        qmap["beam_center_x"] = geometry.center_col
        qmap["beam_center_y"] = geometry.center_row
        qmap["detector_distance"] = geometry.distance_m
        qmap["pixel_size"] = geometry.pixel_size_m
        qmap["map_names"] = _ascii_list(["q", "phi"])
        qmap["map_units"] = _ascii_list(["1/A", "deg"])

        t = np.arange(res.intensity_t.size) * res.frame_time_s
        f["/xpcs/spatial_mean/intensity_vs_time"] = np.stack([t, res.intensity_t])
        mean = f.require_group("/xpcs/temporal_mean")
        mean["scattering_2d"] = res.saxs_2d[None].astype(np.float32)
        mean["scattering_1d"] = saxs_1d[None]
        mean["scattering_1d_segments"] = saxs_1d[None]

        mt = f.require_group("/xpcs/multitau")
        mt["normalized_g2"] = res.g2.T                                  # (lags, rings)
        mt["normalized_g2_err"] = res.g2_err.T
        mt["delay_list"] = res.tau_s / res.frame_time_s                 # in frames
        mt["config/stride_frame"] = 1
        mt["config/avg_frame"] = 1

        if res.twotime is not None and res.twotime_rings is not None:
            tt = f.require_group("/xpcs/twotime")
            for ring, c2 in zip(res.twotime_rings, res.twotime, strict=True):
                # The viewer stores one triangle and rebuilds the map as half + half.T.
                tt[f"correlation_map/c2_{int(ring) + 1:05d}"] = np.triu(c2).astype(np.float32)
            bins = res.twotime.shape[1]
            g2_full = np.array([[np.nanmean(np.diagonal(m, offset=k)) for k in range(1, bins)]
                                for m in res.twotime])                  # (maps, lags)
            segments = 4
            width = bins // segments
            g2_seg = np.array([[[np.nanmean(np.diagonal(m[s * width:(s + 1) * width, s * width:(s + 1) * width],
                                                        offset=k)) for k in range(1, max(width, 2))]
                                for s in range(segments)] for m in res.twotime])  # (maps, segments, lags)
            tt["normalized_g2"] = g2_full.T
            tt["normalized_g2_segments"] = np.transpose(g2_seg, (2, 1, 0))
            tt["delay_list"] = np.arange(1, bins) * res.twotime_avg_frame
            tt["processed_bins"] = np.asarray(res.twotime_rings) + 1
            tt["config/stride_frame"] = 1
            tt["config/avg_frame"] = res.twotime_avg_frame

        ours = f.require_group("/xpcs/balsam")
        ours["q_per_m"] = res.q_per_m
        ours["tau_s"] = res.tau_s
        ours["labels"] = res.labels.astype(np.int32)
        ours["geometry"] = json.dumps(geometry.to_dict())
        ours["summary"] = json.dumps(res.summary or {}, allow_nan=True)
    return path


def read_results(path: Path | str) -> ResultArrays:
    """A results file written by `write_results`, back as arrays."""
    path = Path(path)
    with h5py.File(path, "r") as f:
        if "/xpcs/balsam" not in f or "/xpcs/multitau/normalized_g2" not in f:
            raise ValueError(f"{path}: not a results file of this reduction")
        ours = f["/xpcs/balsam"]
        twotime = rings = None
        avg = 1
        if "/xpcs/twotime/correlation_map" in f:
            group = f["/xpcs/twotime/correlation_map"]
            names = sorted(group)
            halves = [group[n][()].astype(np.float64) for n in names]
            twotime = np.array([h + h.T - np.diag(np.diag(h)) for h in halves])
            rings = np.array([int(n[3:]) - 1 for n in names])
            avg = int(f["/xpcs/twotime/config/avg_frame"][()])
        return ResultArrays(
            q_per_m=ours["q_per_m"][()], tau_s=ours["tau_s"][()],
            g2=f["/xpcs/multitau/normalized_g2"][()].T, g2_err=f["/xpcs/multitau/normalized_g2_err"][()].T,
            frame_time_s=float(f[f"{DETECTOR}/frame_time"][()]), labels=ours["labels"][()],
            saxs_2d=f["/xpcs/temporal_mean/scattering_2d"][0], intensity_t=f["/xpcs/spatial_mean/intensity_vs_time"][1],
            twotime=twotime, twotime_rings=rings, twotime_avg_frame=avg,
            summary=json.loads(ours["summary"][()].decode() if isinstance(ours["summary"][()], bytes)
                               else ours["summary"][()]),
        )
