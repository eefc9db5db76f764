"""Synthetic XPCS datasets with a known answer.

Each pixel's scattered field is a complex Gaussian (fully developed speckle) that
decorrelates as an Ornstein-Uhlenbeck process with rate Gamma(q) = D q^2 (Brownian
diffusion of the scatterers), so |g1(tau)| = exp(-Gamma tau) and, by the Siegert
relation, g2(tau) = 1 + beta exp(-2 Gamma tau). Averaging `modes` independent speckle
patterns lowers the contrast to beta = 1/modes; photon counts are Poisson.

`iter_frames` yields the frames in blocks (memory of one block, whatever the run length);
`generate` collects them; `write_h5` (in h5io) writes them as a raw HDF5 file.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from balsam_grpc.xpcs.geometry import Geometry


@dataclass
class Dataset:
    frames: np.ndarray           # (T, rows, cols) photon counts, uint16
    frame_time_s: float
    geometry: Geometry
    diffusion_m2_per_s: float    # the truth: Gamma(q) = D q^2
    contrast: float

    def meta(self) -> dict:
        """The metadata dict the reduction takes (the same a raw HDF5 file yields)."""
        return {"frame_time_s": self.frame_time_s, "geometry": self.geometry.to_dict(),
                "truth": {"diffusion_m2_per_s": self.diffusion_m2_per_s, "contrast": self.contrast}}


def default_geometry(rows: int, cols: int) -> Geometry:
    """The beam centre off the corner and the pixel size scaled with the detector, so the
    rings span the same decade of decay rates (all resolvable at the default frame time)
    at any detector size."""
    return Geometry(rows=rows, cols=cols, center_row=-rows / 2, center_col=-cols / 2,
                    pixel_size_m=75e-6 * 64 / max(rows, cols), distance_m=8.0, wavelength_m=1.0e-10)


def _check(n_frames: int, rows: int, cols: int, modes: int, mean_counts: float) -> None:
    if n_frames < 16 or rows < 8 or cols < 8 or modes < 1 or mean_counts <= 0:
        raise ValueError("need n_frames >= 16, rows and cols >= 8, modes >= 1, mean_counts > 0")


def iter_frames(*, rows: int = 64, cols: int = 64, n_frames: int = 1024, frame_time_s: float = 1e-3,
                diffusion_m2_per_s: float = 3e-14, mean_counts: float = 40.0, modes: int = 1,
                geometry: Geometry | None = None, seed: int = 0, block_frames: int = 64) -> Iterator[np.ndarray]:
    """The frames of `generate`, in blocks of at most `block_frames` (uint16 arrays)."""
    _check(n_frames, rows, cols, modes, mean_counts)
    geometry = geometry or default_geometry(rows, cols)
    rng = np.random.default_rng(seed)
    gamma = diffusion_m2_per_s * geometry.q_map() ** 2             # (rows, cols)
    decay = np.exp(-gamma * frame_time_s)
    kick = np.sqrt(1.0 - decay**2)
    shape = (modes, rows, cols)

    def normal() -> np.ndarray:
        return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)) / np.sqrt(2.0)

    field = normal()
    for start in range(0, n_frames, block_frames):
        block = np.empty((min(block_frames, n_frames - start), rows, cols), dtype=np.uint16)
        for t in range(block.shape[0]):  # one vectorised step per frame: the OU update of every pixel
            intensity = (np.abs(field) ** 2).mean(axis=0)           # mean 1
            block[t] = np.minimum(rng.poisson(mean_counts * intensity), np.iinfo(np.uint16).max)
            field = decay * field + kick * normal()
        yield block


def generate(*, rows: int = 64, cols: int = 64, n_frames: int = 1024, frame_time_s: float = 1e-3,
             diffusion_m2_per_s: float = 3e-14, mean_counts: float = 40.0, modes: int = 1,
             geometry: Geometry | None = None, seed: int = 0) -> Dataset:
    """A stack of speckle frames in memory (see `iter_frames` for the streamed form)."""
    _check(n_frames, rows, cols, modes, mean_counts)
    geometry = geometry or default_geometry(rows, cols)
    frames = np.concatenate(list(iter_frames(rows=rows, cols=cols, n_frames=n_frames, frame_time_s=frame_time_s,
                                             diffusion_m2_per_s=diffusion_m2_per_s, mean_counts=mean_counts,
                                             modes=modes, geometry=geometry, seed=seed)))
    return Dataset(frames=frames, frame_time_s=frame_time_s, geometry=geometry,
                   diffusion_m2_per_s=diffusion_m2_per_s, contrast=1.0 / modes)
