"""Two-time correlation C(t1, t2) per q-ring, streamed over frames.

    C(t1, t2) = <I(t1) I(t2)>_ring / (<I(t1)>_ring <I(t2)>_ring)

with the averages over the ring's pixels (the definition of the ESRF `xpcs-correlator`
and of the two-time maps pyXPCSViewer shows). A map pairs every time with every other, so
the frames of a run must be kept until its end; to keep memory bounded whatever the
run's length, frames are averaged in time bins of `avg_frame` consecutive frames, chosen
so that the kept bins fit in `max_bytes` (float32, the ring pixels only) and number at
most `max_bins`. A run twice as long then has bins twice as wide, not twice the memory.
The maps themselves are (rings, bins, bins) float64.

Speed. The map of a ring is a matrix product of its binned frames with themselves,
B B^T over the ring's pixels, done in pixel tiles (BLAS's symmetric product). Three cases:

- Exact, float32: when every frame holds integer counts, the binned sums are integers and
  so are their products; a float32 product is exact as long as every partial sum stays
  below 2**24, so when the largest binned value allows tiles of at least MIN_EXACT_TILE
  pixels, the tiles are cut small enough for that: twice the speed of float64, bit for bit
  its result.
- Bounded, float32: counts too large for such tiles (a bin of 2 frames of 40 mean counts
  in bright speckle reaches ~900, so 900**2 * 256 > 2**24) are multiplied in float32 tiles
  of SINGLE_TILE pixels, each tile's product added to a float64 sum. Every term is
  non-negative (unsigned counts), so a tile's float32 dot product, whatever the order
  BLAS adds in, is within gamma_k = k u / (1 - k u) of the exact sum relative to that sum
  (u = 2**-24, k = SINGLE_TILE; Higham, Accuracy and Stability of Numerical Algorithms,
  eq. 3.5), and so is the sum of the tiles. With the float64 divisions after it, every map
  entry is within SINGLE_RTOL (6.2e-5) of the float64 product, relative: a twentieth of
  the float32 rounding of xpcs-correlator's maps against their own definition's noise,
  and about 1e-4 of a map's statistical error over a ring of thousands of pixels (the
  test `test_two_time_single_precision_error_is_bounded` checks it on adversarial counts
  and prints what it finds: about 1e-7).
- float64: frames with non-integer or signed values (their bins are float32 sums
  already; their product is then taken in float64, exact for the stored sums), or
  `single=False`.

And when whole bins are summed (avg_frame > 1), a block is summed over each bin before
the ring pixels are picked, so the gather touches a bin once rather than each of its
frames.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

# Defaults: at most 512 time bins (maps of 2 MB per ring) and 256 MB of binned frames.
MAX_BINS = 512
MAX_BYTES = 256 << 20
# Pixels per tile of the final matrix products (float64 copies of bins x tile).
TILE_BYTES = 16 << 20
# float32 holds every integer below this exactly (24-bit significand).
EXACT_F32 = 1 << 24
# Fewer pixels per exact float32 tile than this and the float64 product is as quick.
MIN_EXACT_TILE = 256
# Pixels per float32 tile when the product cannot be exact (non-negative counts only), and
# the relative error bound of a map entry it gives: gamma_k of the tile's sum plus a few
# float64 roundings (the tiles' sum, the divisions by the pixels and the means).
SINGLE_TILE = 1024
SINGLE_RTOL = SINGLE_TILE * 2.0**-24 / (1 - SINGLE_TILE * 2.0**-24) + 8 * 2.0**-53


@dataclass
class TwoTime:
    maps: np.ndarray        # (n_rings, bins, bins) C(t1, t2), symmetric
    t_s: np.ndarray         # (bins,) start time of each bin, seconds from the first frame
    bin_s: float            # width of a bin in seconds (avg_frame * frame time)
    avg_frame: int          # frames averaged per bin
    rings: np.ndarray       # (n_rings,) ring index of each map

    def g2(self) -> tuple[np.ndarray, np.ndarray]:
        """g2 from the maps: the mean of each map's diagonal at lag k (k = 1 .. bins-1),
        and the lags in seconds. Shape (n_rings, bins-1)."""
        bins = self.maps.shape[1]
        g2 = np.array([[np.diagonal(m, offset=k).mean() for k in range(1, bins)] for m in self.maps])
        return np.arange(1, bins) * self.bin_s, g2


def choose_binning(n_frames: int, pixels: int, *, max_bins: int = MAX_BINS, max_bytes: int = MAX_BYTES) -> int:
    """Frames per time bin so that n_frames // avg_frame bins of `pixels` float32 fit."""
    bins = max(1, min(n_frames, max_bins, max_bytes // max(4 * pixels, 1)))
    return -(-n_frames // bins)


class TwoTimeAccumulator:
    """Feed frame blocks in time order (`update`), then `result()`.

    `labels` (rows, cols) gives each pixel's ring or -1; `rings` selects the rings to
    map (all by default). `avg_frame` overrides the automatic binning. With `workers` > 1
    that many threads compute the rings' maps at the end (BLAS releases the GIL).
    `single=False` takes the float64 product where the float32 one would not be exact."""

    def __init__(self, labels: np.ndarray, n_rings: int, n_frames: int, frame_time_s: float, *,
                 rings: list[int] | None = None, avg_frame: int | None = None,
                 max_bins: int = MAX_BINS, max_bytes: int = MAX_BYTES, workers: int = 1,
                 single: bool = True) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers = workers
        self.single = single
        flat = np.asarray(labels).ravel()
        self.shape = np.asarray(labels).shape
        self.rings = np.arange(n_rings) if rings is None else np.asarray(sorted(set(rings)), dtype=int)
        if self.rings.size and (self.rings.min() < 0 or self.rings.max() >= n_rings):
            raise ValueError(f"rings {list(self.rings)} outside 0..{n_rings - 1}")
        # Pixels sorted by ring: each ring is one contiguous range of columns.
        chosen = np.flatnonzero(np.isin(flat, self.rings))
        order = np.argsort(flat[chosen], kind="stable")
        self.pixel_index = chosen[order]
        self.bounds = np.searchsorted(flat[self.pixel_index], np.append(self.rings, n_rings))
        self.avg_frame = avg_frame or choose_binning(n_frames, self.pixel_index.size, max_bins=max_bins,
                                                     max_bytes=max_bytes)
        if self.avg_frame < 1:
            raise ValueError(f"avg_frame must be >= 1, got {self.avg_frame}")
        self.n_bins = n_frames // self.avg_frame
        if self.n_bins < 2:
            raise ValueError(f"{n_frames} frames make fewer than 2 bins of {self.avg_frame}")
        self.n_frames, self.frame_time_s = n_frames, frame_time_s
        # Sums per bin. Filled rather than np.zeros: numpy asks for huge pages for a large
        # np.empty, and the fill faults them in a few at a time (np.zeros' calloc takes
        # twice the page faults and 2.6x the CPU on the first touch, at 131 MB).
        self.binned = np.empty((self.n_bins, self.pixel_index.size), dtype=np.float32)
        self.binned.fill(0.0)
        self.fed = 0
        self.integral = True    # every frame so far of an integer dtype (so the sums are integers)
        self.counts = True      # every frame so far of an unsigned dtype (so the sums are >= 0)
        # Sum the frames of a bin over all pixels, then pick the ring pixels (one gather
        # per bin, not per frame), when the rings cover enough of the detector for the
        # extra pixels summed to cost less than the gathers saved.
        self.sum_first = self.avg_frame > 1 and 2 * self.pixel_index.size >= flat.size

    @property
    def state_bytes(self) -> int:
        return self.binned.nbytes

    def update(self, block: np.ndarray) -> None:
        """Feed the next frames, (m, rows, cols) or (m, rows*cols), in time order."""
        block = np.asarray(block)
        flat = block.reshape(block.shape[0], -1)
        if self.sum_first:
            # Sums over frames are elementwise, so picking the pixels after summing gives
            # the same numbers.
            self._bin(flat, lambda sums: np.take(sums, self.pixel_index, axis=-1))
        else:
            self._bin(np.take(flat, self.pixel_index, axis=1), None)

    def update_pixels(self, picked: np.ndarray) -> None:
        """`update` for frames whose pixels are already picked, (m, pixels) in the order of
        `pixel_index` (a multi-tau kernel over the same rings picks the same: the
        reduction picks once for both)."""
        self._bin(picked, None)

    def _bin(self, frames: np.ndarray, pick: Callable[[np.ndarray], np.ndarray] | None) -> None:
        """Add frames (m, columns) to their bins; `pick` maps summed columns to the ring
        pixels (None: the columns are the ring pixels)."""
        m = frames.shape[0]
        if self.fed + m > self.n_frames:
            raise ValueError(f"more frames than announced ({self.fed + m} > {self.n_frames})")
        # Frames past the last full bin are dropped; the rest add to their bins, whole
        # bins of the block at once (sums of counts are exact in float32 below 2**24).
        usable = max(0, min(m, self.n_bins * self.avg_frame - self.fed))
        if usable:
            self.integral = self.integral and (np.issubdtype(frames.dtype, np.integer) or frames.dtype == np.bool_)
            self.counts = self.counts and (frames.dtype.kind == "u" or frames.dtype == np.bool_)
            i = 0
            while i < usable:
                b, offset = divmod(self.fed + i, self.avg_frame)
                k = min(self.avg_frame - offset, usable - i)    # frames of bin b in this block
                whole = (usable - i - k) // self.avg_frame      # full bins after it
                sums = frames[i:i + k].sum(axis=0, dtype=np.float32)
                self.binned[b] += sums if pick is None else pick(sums)
                i += k
                if whole:
                    # Bins b+1.. have had no frame yet (bins fill in time order): written,
                    # not added to; their frames summed in order, one frame at a time.
                    span = frames[i:i + whole * self.avg_frame].reshape(whole, self.avg_frame, -1)
                    target = self.binned[b + 1:b + 1 + whole]
                    sums = target if pick is None else np.empty(span[:, 0].shape, np.float32)
                    sums[...] = span[:, 0]
                    for j in range(1, self.avg_frame):
                        sums += span[:, j]
                    if pick is not None:
                        target[...] = pick(sums)  # (take's out= is slower)
                    i += whole * self.avg_frame
        self.fed += m

    def _exact_tile(self, lo: int, hi: int) -> int:
        """Pixels per tile for which the float32 product of ring columns lo:hi is exact
        (0: not exact). Each entry of a tile's product is a sum over its pixels of
        products of integers of at most `peak` in size, so every partial sum stays below
        tile * peak**2; kept below 2**24, float32 adds them without rounding."""
        if not self.integral:
            return 0
        x = self.binned[:, lo:hi]
        peak = float(x.max()) if self.counts else max(float(x.max()), -float(x.min()))  # no |x| copy
        tile = int(EXACT_F32 // max(peak * peak, 1.0)) if peak < EXACT_F32 else 0
        return tile if tile >= MIN_EXACT_TILE else 0

    def product_tiles(self, lo: int, hi: int) -> tuple[str, int]:
        """How ring columns lo:hi are multiplied: ("exact", pixels per float32 tile),
        ("single", SINGLE_TILE: float32 within SINGLE_RTOL) or ("double", pixels per
        float64 tile)."""
        exact = self._exact_tile(lo, hi)
        if exact:
            return "exact", exact
        if self.single and self.counts:
            return "single", SINGLE_TILE
        return "double", max(1, TILE_BYTES // (8 * self.n_bins))

    def result(self) -> TwoTime:
        if self.fed != self.n_frames:
            raise ValueError(f"{self.fed} frames fed, {self.n_frames} announced")
        n = self.n_bins
        maps = np.zeros((self.rings.size, n, n))

        def ring_map(r: int) -> None:
            lo, hi = int(self.bounds[r]), int(self.bounds[r + 1])
            if hi <= lo:
                maps[r] = np.nan
                return
            products = np.zeros((n, n))
            means = np.zeros(n)
            kind, step = self.product_tiles(lo, hi)
            for start in range(lo, hi, step):
                x = self.binned[:, start:min(start + step, hi)]  # float32 tiles are views, not copies
                if kind == "double":
                    x = x.astype(np.float64)
                products += x @ x.T      # x and its transpose share memory: a symmetric product
                means += x.sum(axis=1, dtype=np.float64)
            pixels = hi - lo
            means /= pixels
            with np.errstate(invalid="ignore", divide="ignore"):
                maps[r] = products / pixels / np.outer(means, means)

        if self.workers > 1 and self.rings.size > 1:
            # Largest rings first, so the last ring a worker starts is a small one.
            order = sorted(range(self.rings.size), key=lambda r: self.bounds[r] - self.bounds[r + 1])
            with ThreadPoolExecutor(self.workers) as pool:   # BLAS releases the GIL
                list(pool.map(ring_map, order))
        else:
            for r in range(self.rings.size):
                ring_map(r)
        bin_s = self.avg_frame * self.frame_time_s
        return TwoTime(maps=maps, t_s=np.arange(n) * bin_s, bin_s=bin_s, avg_frame=self.avg_frame, rings=self.rings)


def two_time(frames: np.ndarray, labels: np.ndarray, n_rings: int, frame_time_s: float, *,
             rings: list[int] | None = None, avg_frame: int | None = None, max_bins: int = MAX_BINS,
             max_bytes: int = MAX_BYTES, block_frames: int = 256) -> TwoTime:
    """Two-time maps of `frames` (T, rows, cols) in memory (see `TwoTimeAccumulator`)."""
    if frames.ndim != 3 or frames.shape[1:] != labels.shape:
        raise ValueError(f"frames {frames.shape} and labels {labels.shape} do not match")
    acc = TwoTimeAccumulator(labels, n_rings, frames.shape[0], frame_time_s, rings=rings, avg_frame=avg_frame,
                             max_bins=max_bins, max_bytes=max_bytes)
    for start in range(0, frames.shape[0], block_frames):
        acc.update(frames[start:start + block_frames])
    return acc.result()
