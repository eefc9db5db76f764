"""Detector geometry: the scattering vector magnitude of every pixel and its q-ring."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Geometry:
    """A flat detector normal to the beam."""

    rows: int
    cols: int
    center_row: float
    center_col: float
    pixel_size_m: float = 75e-6
    distance_m: float = 5.0
    wavelength_m: float = 1.0e-10  # 12.4 keV

    def q_map(self) -> np.ndarray:
        """|q| in 1/m for every pixel: q = 4 pi / lambda * sin(theta), 2 theta = atan(r / L)."""
        r_idx, c_idx = np.indices((self.rows, self.cols), dtype=np.float64)
        radius = np.hypot(r_idx - self.center_row, c_idx - self.center_col) * self.pixel_size_m
        two_theta = np.arctan2(radius, self.distance_m)
        return 4.0 * np.pi / self.wavelength_m * np.sin(two_theta / 2.0)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def ring_labels(q_map: np.ndarray, n_rings: int, q_min: float | None = None,
                q_max: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Label each pixel with its q-ring (0..n_rings-1, or -1 outside every ring) and
    return the labels with the ring centres. Rings are equally wide in q."""
    if n_rings < 1:
        raise ValueError(f"n_rings must be >= 1, got {n_rings}")
    lo = float(np.min(q_map)) if q_min is None else q_min
    hi = float(np.max(q_map)) if q_max is None else q_max
    if not hi > lo:
        raise ValueError(f"empty q range [{lo}, {hi}]")
    edges = np.linspace(lo, hi, n_rings + 1)
    labels = np.digitize(q_map, edges) - 1
    labels[(q_map < lo) | (q_map > hi)] = -1
    labels[labels == n_rings] = n_rings - 1  # q == hi belongs to the last ring
    return labels.astype(np.int32), (edges[:-1] + edges[1:]) / 2.0
