"""Multi-tau intensity autocorrelation.

Level 0 correlates the frames at lags 1 .. buffers-1. Every next level first averages
neighbouring frames in pairs (doubling the time step) and correlates lags buffers/2 ..
buffers-1 of that coarser series, so lag times grow geometrically while each level does
the same small amount of work. Each lag is a full time average over the overlapping
frames, computed for all pixels at once; g2 uses the symmetric normalisation per pixel

    g2_pixel(tau) = <I(t) I(t+tau)>_t / (<I(t)>_t <I(t+tau)>_t)

and is then averaged over the pixels of each q-ring.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Correlation:
    tau_s: np.ndarray      # (n_lags,) lag times in seconds
    g2: np.ndarray         # (n_rings, n_lags)
    g2_err: np.ndarray     # (n_rings, n_lags) standard error over the ring's pixels
    pixels: np.ndarray     # (n_rings,) pixels that contributed per ring


def lag_schedule(n_frames: int, buffers: int) -> list[tuple[int, int]]:
    """(level, lag in that level's frames) pairs, in increasing lag time.

    A lag is kept only while at least 2 * buffers frame pairs overlap at its level: with
    fewer, the time averages that normalise g2 are too short and the point is noise.
    """
    if buffers < 4 or buffers % 2:
        raise ValueError(f"buffers must be an even number >= 4, got {buffers}")
    min_overlap = 2 * buffers
    schedule = [(0, lag) for lag in range(1, buffers) if n_frames - lag >= min_overlap]
    level, length = 1, n_frames // 2
    while length - buffers // 2 >= min_overlap:
        schedule += [(level, lag) for lag in range(buffers // 2, buffers) if length - lag >= min_overlap]
        level, length = level + 1, length // 2
    return schedule


def _coarsen(frames: np.ndarray) -> np.ndarray:
    even = frames.shape[0] // 2 * 2
    return 0.5 * (frames[0:even:2] + frames[1:even:2])


# Bytes of one chunk's float64 working copy (frames x pixels). The coarser levels add
# at most as much again, so a reduction's working memory is about twice this, whatever
# the run length; 8 MB chunks stay in the last-level cache's neighbourhood.
CHUNK_BYTES = 8 << 20


def multitau_g2(frames: np.ndarray, labels: np.ndarray, n_rings: int, frame_time_s: float,
                buffers: int = 8, chunk_pixels: int | None = None, chunk_bytes: int = CHUNK_BYTES) -> Correlation:
    """g2 per ring of `frames` (T, rows, cols); `labels` (rows, cols) gives each pixel's
    ring or -1.

    Pixels are processed in chunks so that the float64 working copy stays small (a
    512x512 x 1000-frame stack would need 2 GB at once); per-ring sums are accumulated
    across chunks. A chunk holds `chunk_bytes` of float64 series (or `chunk_pixels`
    pixels when given): bounded by bytes, not pixels, so that longer runs take fewer
    pixels per chunk instead of more memory.
    """
    if frames.ndim != 3 or frames.shape[1:] != labels.shape:
        raise ValueError(f"frames {frames.shape} and labels {labels.shape} do not match")
    flat_labels = labels.ravel()
    pixel_index = np.flatnonzero((flat_labels >= 0) & (flat_labels < n_rings))
    pixel_ring = flat_labels[pixel_index]
    flat_frames = frames.reshape(frames.shape[0], -1)

    schedule = lag_schedule(frames.shape[0], buffers)
    counts = np.zeros((n_rings, len(schedule)))
    sums = np.zeros_like(counts)
    squares = np.zeros_like(counts)
    if chunk_pixels is None:
        chunk_pixels = max(1, chunk_bytes // (8 * max(frames.shape[0], 1)))
    for start in range(0, pixel_index.size, chunk_pixels):
        chunk = slice(start, start + chunk_pixels)
        series = flat_frames[:, pixel_index[chunk]].astype(np.float64)  # (T, pixels of the chunk)
        _accumulate(series, pixel_ring[chunk], n_rings, schedule, counts, sums, squares, buffers)

    with np.errstate(invalid="ignore", divide="ignore"):
        g2 = sums / counts
        var = np.maximum(squares / counts - g2**2, 0.0)
        err = np.sqrt(var / np.maximum(counts - 1, 1))
    tau = np.array([lag * (2**level) * frame_time_s for level, lag in schedule])
    return Correlation(tau_s=tau, g2=g2, g2_err=err, pixels=np.bincount(pixel_ring, minlength=n_rings))


def _accumulate(series: np.ndarray, rings: np.ndarray, n_rings: int, schedule: list[tuple[int, int]],
                counts: np.ndarray, sums: np.ndarray, squares: np.ndarray, buffers: int) -> None:
    level_series, current_level = series, -1
    for i, (level, lag) in enumerate(schedule):
        while current_level < level:
            if current_level >= 0:
                level_series = _coarsen(level_series)
            current_level += 1
            # A lag's past mean is the total less the last `lag` frames, its future mean
            # the total less the first `lag`: partial sums of the first and last
            # `buffers` frames are all that is needed, not a prefix sum over the level.
            edge = min(buffers, level_series.shape[0])
            total = level_series.sum(axis=0)
            head = np.cumsum(level_series[:edge], axis=0)           # head[k-1] = first k frames
            tail = np.cumsum(level_series[::-1][:edge], axis=0)     # tail[k-1] = last k frames
        n = level_series.shape[0] - lag
        past_mean = (total - tail[lag - 1]) / n
        future_mean = (total - head[lag - 1]) / n
        numerator = np.einsum("tp,tp->p", level_series[:-lag], level_series[lag:]) / n
        denominator = past_mean * future_mean
        valid = denominator > 0
        per_pixel = np.where(valid, numerator / np.where(valid, denominator, 1.0), 0.0)
        counts[:, i] += np.bincount(rings, weights=valid, minlength=n_rings)
        sums[:, i] += np.bincount(rings, weights=per_pixel, minlength=n_rings)
        squares[:, i] += np.bincount(rings, weights=per_pixel**2, minlength=n_rings)
