"""Multi-tau intensity autocorrelation, streamed over frames.

Level 0 correlates the frames at lags 1 .. buffers-1. Every next level first averages
neighbouring frames in pairs (doubling the time step) and correlates lags buffers/2 ..
buffers-1 of that coarser series, so lag times grow geometrically while each level does
the same small amount of work. Each lag is a full time average over the overlapping
frames. Two normalisations (`normalization=`):

- "ring" (the default): the products are averaged over the ring's pixels first and
  normalised by the ring-mean intensities at the two times,

      g2(tau) = sum_t <I(t) I(t+tau)>_ring / sum_t <I(t)>_ring <I(t+tau)>_ring

  as ESRF's xpcs-correlator does (at level 0 the two agree to float32 precision). The
  ring mean over many pixels is a precise estimate of the mean intensity, so g2 - 1 is
  unbiased for a ring of uniform mean intensity (the synthetic data; a ring that crosses
  a beamstop edge or an anisotropic pattern is not uniform).
- "pixel": the symmetric normalisation per pixel, averaged over the ring,

      g2_pixel(tau) = <I(t) I(t+tau)>_t / (<I(t)>_t <I(t+tau)>_t)

  which copes with rings of uneven intensity but divides by each pixel's own time
  average: over a finite run that average fluctuates with the speckle, and g2 - 1 reads
  low by about (correlation time / run length) (a few % at 1000 frames; the test
  `test_normalisations_against_the_truth` prints both against the generator's truth).

Frames arrive in blocks (`MultiTau.update`), in time order, so a run never has to be
held in memory: per pixel and level the state is the last buffers-1 frames (the pairs
that straddle two blocks, and the tail sums of the past means), the first buffers-1
frames (the head sums of the future means), the running total, one product sum per lag
and the odd frame waiting for its partner at the next level. That is about 25 numbers
per pixel and level, and the number of levels grows with log2 of the run length: the
memory of a run twice as long grows by one level, not twice.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np


@dataclass
class Correlation:
    tau_s: np.ndarray      # (n_lags,) lag times in seconds
    g2: np.ndarray         # (n_rings, n_lags)
    g2_err: np.ndarray     # (n_rings, n_lags) standard error over the ring's pixels
    pixels: np.ndarray     # (n_rings,) pixels that contributed per ring
    lag_frames: np.ndarray | None = None  # (n_lags,) lag in frames (tau_s / frame time)


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


# Bytes of one pixel tile's float64 working copy (frames of a block x pixels of the
# tile): 8 MB tiles stay in the last-level cache's neighbourhood.
CHUNK_BYTES = 8 << 20
# int32 sums below this do not overflow.
INT32_LIMIT = 2**31


class MultiTau:
    """g2 per ring, fed frame blocks in time order.

    `labels` (rows, cols) gives each pixel's ring or -1; `n_frames` is the run's length
    (it fixes the lag schedule; a raw file's header says it). Each block is processed in
    pixel tiles of `chunk_bytes` of float64 (or `chunk_pixels` pixels when given); with
    `workers` > 1 that many threads take the tiles of a block (numpy's loops release the
    GIL, so two cores run two tiles), with the same results as one."""

    def __init__(self, labels: np.ndarray, n_rings: int, n_frames: int, frame_time_s: float, *,
                 buffers: int = 8, chunk_bytes: int = CHUNK_BYTES, chunk_pixels: int | None = None,
                 normalization: str = "ring", workers: int = 1) -> None:
        if normalization not in ("ring", "pixel"):
            raise ValueError(f"normalization must be 'ring' or 'pixel', got {normalization!r}")
        flat = np.asarray(labels).ravel()
        self.shape = np.asarray(labels).shape
        inside = np.flatnonzero((flat >= 0) & (flat < n_rings))
        self.pixel_index = inside[np.argsort(flat[inside], kind="stable")]  # sorted by ring
        self.pixel_ring = flat[self.pixel_index]
        self.bounds = np.searchsorted(self.pixel_ring, np.arange(n_rings + 1))  # ring r: bounds[r]:bounds[r+1]
        self.ring_pixels = np.diff(self.bounds)
        self.normalization = normalization
        # "ring": the same multi-tau sums over the ring-mean series (one pseudo-pixel per ring).
        self.means = (MultiTau(np.arange(n_rings), n_rings, n_frames, frame_time_s, buffers=buffers,
                               normalization="pixel") if normalization == "ring" else None)
        self.n_rings, self.n_frames, self.frame_time_s, self.buffers = n_rings, n_frames, frame_time_s, buffers
        self.chunk_bytes, self.chunk_pixels = chunk_bytes, chunk_pixels
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers = workers
        self.schedule = lag_schedule(n_frames, buffers)
        self.n_levels = max((level for level, _ in self.schedule), default=-1) + 1
        self.level_lags = [[lag for lv, lag in self.schedule if lv == level] for level in range(self.n_levels)]
        hold, pixels = buffers - 1, self.pixel_index.size
        self.hold = hold
        self.carry = np.zeros((self.n_levels, hold, pixels))    # the last `hold` frames, oldest first
        # The per-pixel means (first `hold` frames and the total): "pixel" normalisation only.
        self.per_pixel = normalization == "pixel"
        self.head = np.zeros((self.n_levels, hold, pixels if self.per_pixel else 0))
        self.total = np.zeros((self.n_levels, pixels if self.per_pixel else 0))
        self.pending = np.zeros((self.n_levels, pixels))        # an odd frame awaiting its pair
        self.products = [np.zeros((len(lags), pixels)) for lags in self.level_lags]
        self.seen = [0] * self.n_levels                          # frames per level so far
        self.peak = 0                                            # the largest count fed so far
        self.fed = 0

    @property
    def state_bytes(self) -> int:
        own = sum(a.nbytes for a in (self.carry, self.head, self.total, self.pending, *self.products))
        return own + (self.means.state_bytes if self.means is not None else 0)

    def pick(self, block: np.ndarray) -> np.ndarray:
        """The ring pixels of frames (m, rows, cols) or (m, rows*cols), in this kernel's
        column order (sorted by ring), as `update_pixels` takes them."""
        block = np.asarray(block)
        m = block.shape[0]
        if block.reshape(m, -1).shape[1] != int(np.prod(self.shape)):
            raise ValueError(f"frames of shape {block.shape[1:]} do not match the labels {self.shape}")
        return np.take(block.reshape(m, -1), self.pixel_index, axis=1)  # take: ~10x faster than [:, index]

    def update(self, block: np.ndarray) -> np.ndarray:
        """Feed the next frames, (m, rows, cols) or (m, rows*cols), in time order. Returns
        the mean intensity of each ring in each frame, (m, n_rings)."""
        return self.update_pixels(self.pick(block))

    def update_pixels(self, picked: np.ndarray) -> np.ndarray:
        """`update` for frames whose ring pixels are already picked (`pick`): (m, pixels)."""
        m = picked.shape[0]
        if self.fed + m > self.n_frames:
            raise ValueError(f"more frames than announced ({self.fed + m} > {self.n_frames})")
        self.fed += m
        ring_sums = np.zeros((m, self.n_rings))
        if m == 0 or self.n_levels == 0:
            return ring_sums
        # New frames per level: level L+1 gets a frame for every completed pair of level L.
        counts, new = [], m
        for level in range(self.n_levels):
            counts.append(new)
            new = (self.seen[level] + new) // 2 - self.seen[level] // 2
        tile = self.chunk_pixels or max(1, self.chunk_bytes // (8 * (m + self.hold)))
        # Counts (unsigned integers) go in as int32 while their products are exact (`_feed`).
        counted = picked.dtype.kind == "u" or picked.dtype == np.bool_
        if counted and picked.size:
            self.peak = max(self.peak, int(picked.max()))
        as_int = counted and self._int_exact(m, 0)

        def feed_tile(start: int) -> list[tuple[int, np.ndarray]]:
            stop = min(start + tile, picked.shape[1])
            # The new frames go below `hold` rows that _feed fills with the kept ones.
            z = np.empty((self.hold + m, stop - start), dtype=np.int32 if as_int else np.float64)
            x = z[self.hold:]
            x[...] = picked[:, start:stop]
            # Ring sums from the tile (pixels are sorted by ring: a tile spans few rings).
            first, last = np.searchsorted(self.bounds, [start, stop - 1], side="right") - 1
            sums = []
            for r in range(first, last + 1):
                lo, hi = max(self.bounds[r], start) - start, min(self.bounds[r + 1], stop) - start
                if hi > lo:
                    sums.append((r, x[:, lo:hi].sum(axis=1, dtype=np.float64)))
            self._feed(0, z, slice(start, stop))   # tiles write disjoint columns of the state
            return sums

        starts = range(0, picked.shape[1], tile)
        if self.workers > 1 and len(starts) > 1:
            with ThreadPoolExecutor(self.workers) as pool:   # numpy releases the GIL in its loops
                partials = list(pool.map(feed_tile, starts))
        else:
            partials = [feed_tile(start) for start in starts]
        for sums in partials:       # added in tile order: the same sums whatever the workers
            for r, s in sums:
                ring_sums[:, r] += s
        for level, count in enumerate(counts):
            self.seen[level] += count
        ring_means = ring_sums / np.maximum(self.ring_pixels, 1)
        if self.means is not None:
            self.means.update(ring_means)
        return ring_means

    def _int_exact(self, rows: int, level: int) -> bool:
        """Whether `rows` frames of `level`, as int32 sums of 2**level frames of counts at
        most `peak`, have int32 product sums that cannot overflow (so are exact)."""
        largest = self.peak << level
        return largest < INT32_LIMIT and rows * largest * largest < INT32_LIMIT

    def _feed(self, level: int, z: np.ndarray, cols: slice) -> None:
        """Correlate a tile's new frames at `level` and pass their pair averages down the
        levels. `z` (hold + m, pixels of the tile) holds the m new frames in its last rows;
        its first `hold` rows are filled here with the kept frames before them, so one
        product per lag covers both the pairs within the block and those straddling its
        start.

        An int32 `z` holds counts summed over 2**level frames (the average times
        2**level): its product sums are integers, exact and twice as fast as float64's,
        and scaled by 4**-level (exact: a power of 2) they are the float64 sums of the
        averages to the bit; the kept state (carry, head, totals, pending) holds averages
        as float64, which times 2**level are those integers again. Past the level where
        int32 could overflow, float64."""
        hold = self.hold
        scale = 1.0     # of an int32 z: 2**level (the frames summed); 1 for a float z
        while z.shape[0] > hold:
            m, seen = z.shape[0] - hold, self.seen[level]
            integer = z.dtype.kind == "i"
            weight = 1.0 / scale if integer else 1.0
            kept = min(seen, hold)
            carry = self.carry[level, :, cols]
            x = z[hold:]
            if kept:
                z[hold - kept:hold] = carry[hold - kept:] * scale if integer else carry[hold - kept:]
            if kept < hold:
                z[:hold - kept] = 0     # before the first frame: never paired, kept as zeros
            lags = self.level_lags[level]
            sums = np.empty((len(lags), z.shape[1]), dtype=z.dtype)
            for j, lag in enumerate(lags):
                # Pairs (t, t + lag) whose later frame is new and whose earlier one is kept or new.
                first, stop = hold - min(lag, kept), hold + m - lag
                if stop > first:
                    np.einsum("tp,tp->p", z[first:stop], z[first + lag:stop + lag], out=sums[j])
                else:
                    sums[j] = 0
            products = self.products[level][:, cols]
            products += sums * (weight * weight) if integer and weight != 1.0 else sums
            if self.per_pixel:
                self.total[level, cols] += x.sum(axis=0, dtype=np.float64) * weight if integer else x.sum(axis=0)
                if seen < hold:
                    take = min(hold - seen, m)
                    self.head[level, seen:seen + take, cols] = x[:take] * weight if integer else x[:take]
            carry[:] = z[m:] * weight if integer else z[m:]   # the last `hold` frames
            if level + 1 >= self.n_levels:
                return
            odd = seen % 2      # this level's last frame so far awaits its pair
            rest = x[1:] if odd else x
            pairs = rest.shape[0] // 2
            stay = integer and self._int_exact(pairs + odd, level + 1)
            coarse = np.empty((hold + pairs + odd, z.shape[1]), dtype=np.int32 if stay else np.float64)
            if stay:    # sums of pairs: the next level's int32 frames
                np.add(rest[0:2 * pairs:2], rest[1:2 * pairs:2], out=coarse[hold + odd:])
                if odd:
                    coarse[hold] = self.pending[level, cols] * scale + x[0]
            else:       # averages of pairs as float64 (exact: halves of integers)
                pair_sums = coarse[hold + odd:]
                np.add(rest[0:2 * pairs:2], rest[1:2 * pairs:2], out=pair_sums, dtype=np.float64)
                pair_sums *= 0.5 * weight
                if odd:
                    coarse[hold] = 0.5 * (self.pending[level, cols] + (x[0] * weight if integer else x[0]))
            if rest.shape[0] % 2:
                self.pending[level, cols] = rest[-1] * weight if integer else rest[-1]
            scale = 2.0 * scale if stay else 1.0
            level, z = level + 1, coarse

    def result(self) -> Correlation:
        if self.fed != self.n_frames:
            raise ValueError(f"{self.fed} frames fed, {self.n_frames} announced")
        n_rings, rings = self.n_rings, self.pixel_ring
        counts = np.zeros((n_rings, len(self.schedule)))
        sums = np.zeros_like(counts)
        squares = np.zeros_like(counts)
        i = 0
        for level, lags in enumerate(self.level_lags):
            length = self.seen[level]
            for j, lag in enumerate(lags):
                # A lag's past mean is the total less the last `lag` frames, its future
                # mean the total less the first `lag`.
                n = length - lag
                if self.means is not None:  # sum_t m(t) m(t+lag) of each pixel's ring
                    denominator = self.means.products[level][j][rings] / n
                else:
                    past = (self.total[level] - self.carry[level, self.hold - lag:].sum(axis=0)) / n
                    future = (self.total[level] - self.head[level, :lag].sum(axis=0)) / n
                    denominator = past * future
                valid = denominator > 0
                per_pixel = np.where(valid, self.products[level][j] / n / np.where(valid, denominator, 1.0), 0.0)
                counts[:, i] = np.bincount(rings, weights=valid, minlength=n_rings)
                sums[:, i] = np.bincount(rings, weights=per_pixel, minlength=n_rings)
                squares[:, i] = np.bincount(rings, weights=per_pixel**2, minlength=n_rings)
                i += 1
        with np.errstate(invalid="ignore", divide="ignore"):
            g2 = sums / counts
            var = np.maximum(squares / counts - g2**2, 0.0)
            err = np.sqrt(var / np.maximum(counts - 1, 1))
        lag_frames = np.array([lag * (2**level) for level, lag in self.schedule], dtype=np.float64)
        return Correlation(tau_s=lag_frames * self.frame_time_s, g2=g2, g2_err=err,
                           pixels=np.bincount(rings, minlength=n_rings), lag_frames=lag_frames)


def multitau_g2(frames: np.ndarray, labels: np.ndarray, n_rings: int, frame_time_s: float,
                buffers: int = 8, chunk_pixels: int | None = None, chunk_bytes: int = CHUNK_BYTES,
                block_frames: int | None = None, normalization: str = "ring") -> Correlation:
    """g2 per ring of `frames` (T, rows, cols) held in memory; `labels` (rows, cols) gives
    each pixel's ring or -1. The frames go through `MultiTau` in blocks of `block_frames`
    (all at once by default: then each pixel tile's whole series is one block)."""
    if frames.ndim != 3 or frames.shape[1:] != labels.shape:
        raise ValueError(f"frames {frames.shape} and labels {labels.shape} do not match")
    kernel = MultiTau(labels, n_rings, frames.shape[0], frame_time_s, buffers=buffers,
                      chunk_bytes=chunk_bytes, chunk_pixels=chunk_pixels, normalization=normalization)
    step = block_frames or max(frames.shape[0], 1)
    for start in range(0, frames.shape[0], step):
        kernel.update(frames[start:start + step])
    return kernel.result()
