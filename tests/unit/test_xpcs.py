"""The XPCS reduction recovers the known decay of synthetic speckle."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from balsam_grpc.xpcs.analysis import analyze, analyze_file, load_dataset, reduce_file, save_dataset
from balsam_grpc.xpcs.fit import fit_decay
from balsam_grpc.xpcs.geometry import Geometry, ring_labels
from balsam_grpc.xpcs.h5io import open_raw, read_results
from balsam_grpc.xpcs.multitau import MultiTau, lag_schedule, multitau_g2
from balsam_grpc.xpcs.synthetic import Dataset, generate
from balsam_grpc.xpcs.twotime import SINGLE_RTOL, SINGLE_TILE, TwoTimeAccumulator, choose_binning, two_time


def test_lag_schedule_is_geometric_and_increasing() -> None:
    schedule = lag_schedule(1024, 8)
    times = [lag * 2**level for level, lag in schedule]
    assert schedule[:7] == [(0, lag) for lag in range(1, 8)]
    assert schedule[7:11] == [(1, 4), (1, 5), (1, 6), (1, 7)]
    assert times == sorted(set(times))
    with pytest.raises(ValueError):
        lag_schedule(100, 7)


def test_q_grows_with_radius_and_rings_partition_it() -> None:
    geo = Geometry(rows=32, cols=32, center_row=0, center_col=0)
    q = geo.q_map()
    assert q[0, 0] == 0 and q[0, 10] < q[0, 20] < q[31, 31]
    labels, centres = ring_labels(q, 4)
    assert set(np.unique(labels)) == {0, 1, 2, 3}
    assert all(q[labels == i].max() <= q[labels == i + 1].min() for i in range(3))
    assert np.all(np.diff(centres) > 0)


def test_fit_recovers_a_clean_exponential() -> None:
    tau = np.geomspace(1e-3, 1.0, 40)
    fit = fit_decay(tau, 1.0 + 0.3 * np.exp(-2 * 12.0 * tau))
    assert fit.ok and fit.gamma_per_s == pytest.approx(12.0, rel=1e-4) and fit.beta == pytest.approx(0.3, rel=1e-4)
    assert not fit_decay(tau[:2], tau[:2]).ok


@pytest.fixture(scope="module")
def speckle_2048() -> Dataset:
    return generate(n_frames=2048, seed=3)


def test_g2_decay_matches_the_synthetic_truth(tmp_path: Path, speckle_2048: Dataset) -> None:
    path = save_dataset(speckle_2048, tmp_path / "d.npz", compress=False)
    frames, meta = load_dataset(path)
    assert frames.shape == (2048, 64, 64) and meta["truth"]["diffusion_m2_per_s"] == 3e-14
    results = analyze(frames, meta, n_rings=8)
    ratios = [r["gamma_per_s"] / r["true_gamma_per_s"] for r in results["rings"]]
    assert all(0.9 < x < 1.1 for x in ratios), ratios
    assert results["diffusion_m2_per_s"] == pytest.approx(3e-14, rel=0.05)
    assert all(0.9 < r["beta"] < 1.1 for r in results["rings"])  # one speckle mode: contrast ~ 1
    json.dumps(results)  # the results file is plain JSON


def test_normalisations_against_the_truth(speckle_2048: Dataset) -> None:
    """g2 - 1 at the first lags against the generator's: the ring normalisation is unbiased
    on uniform rings; the per-pixel one reads low (its finite-run bias). Prints both."""
    data = speckle_2048
    q = data.geometry.q_map()
    labels, _ = ring_labels(q, 8)
    tau = np.arange(1, 4) * data.frame_time_s
    gamma = data.diffusion_m2_per_s * q**2
    truth = np.array([[np.exp(-2 * gamma[labels == r] * t).mean() for t in tau] for r in range(8)])
    bias = {}
    for norm in ("ring", "pixel"):
        corr = multitau_g2(data.frames, labels, 8, data.frame_time_s, normalization=norm)
        bias[norm] = (corr.g2[:, :3] - 1) / truth - 1
        print(f"{norm:5s} normalisation: g2-1 vs truth at lags 1-3, per ring: mean {bias[norm].mean():+.2%}, "
              f"worst {bias[norm].flat[np.abs(bias[norm]).argmax()]:+.2%}")
    assert abs(bias["ring"].mean()) < 0.01 and np.abs(bias["ring"]).max() < 0.03
    assert bias["pixel"].mean() < bias["ring"].mean() - 0.005


def test_lower_contrast_with_more_modes() -> None:
    frames = generate(n_frames=512, modes=4, seed=1)
    labels, _ = ring_labels(frames.geometry.q_map(), 2)
    corr = multitau_g2(frames.frames, labels, 2, frames.frame_time_s)
    assert 0.15 < corr.g2[1, 0] - 1 < 0.3  # beta = 1/4, slightly decayed at the first lag


def test_command_line_round_trip(tmp_path: Path) -> None:
    data, out = tmp_path / "d.npz", tmp_path / "r.json"
    run = [sys.executable, "-m", "balsam_grpc.xpcs"]
    subprocess.run([*run, "generate", str(data), "--frames", "256", "--size", "32"], check=True, capture_output=True)
    done = subprocess.run([*run, "analyze", str(data), str(out), "--rings", "4", "--workers", "2"], capture_output=True,
                          text=True)
    assert done.returncode == 0 and "4 rings" in done.stdout
    assert len(json.loads(out.read_text())["rings"]) == 4
    bad = subprocess.run([*run, "analyze", str(out), str(tmp_path / "x.json")], capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.startswith("error:")


def test_pixel_chunks_do_not_change_the_result() -> None:
    data = generate(rows=24, cols=24, n_frames=256, seed=5)
    labels, _ = ring_labels(data.geometry.q_map(), 3)
    whole = multitau_g2(data.frames, labels, 3, data.frame_time_s, chunk_pixels=10**6)
    pieces = multitau_g2(data.frames, labels, 3, data.frame_time_s, chunk_pixels=37)
    np.testing.assert_allclose(pieces.g2, whole.g2, rtol=1e-12)
    np.testing.assert_allclose(pieces.g2_err, whole.g2_err, rtol=1e-9, atol=1e-15)
    assert list(pieces.pixels) == list(whole.pixels) and pieces.pixels.sum() == (labels >= 0).sum()


def _g2_by_definition(frames: np.ndarray, labels: np.ndarray, n_rings: int, buffers: int,
                      normalization: str = "pixel") -> np.ndarray:
    """Each lag's g2 from plain means over the overlapping frames (no partial sums): per
    pixel then averaged over each ring, or ring-mean products over ring-mean intensities.
    What the kernel's bookkeeping must reproduce."""
    series = frames.reshape(frames.shape[0], -1).astype(np.float64)
    flat = labels.ravel()
    out = []
    level_series, current = series, 0
    for level, lag in lag_schedule(frames.shape[0], buffers):
        while current < level:
            even = level_series.shape[0] // 2 * 2
            level_series = 0.5 * (level_series[0:even:2] + level_series[1:even:2])
            current += 1
        past, future = level_series[:-lag], level_series[lag:]
        if normalization == "pixel":
            per_pixel = (past * future).mean(axis=0) / (past.mean(axis=0) * future.mean(axis=0))
            out.append([per_pixel[flat == ring].mean() for ring in range(n_rings)])
        else:
            out.append([(past[:, flat == r] * future[:, flat == r]).mean()
                        / (past[:, flat == r].mean(axis=1) * future[:, flat == r].mean(axis=1)).mean()
                        for r in range(n_rings)])
    return np.array(out).T


def test_partial_sums_at_the_ends_give_the_definition() -> None:
    data = generate(rows=16, cols=16, n_frames=300, seed=7)
    labels, _ = ring_labels(data.geometry.q_map(), 3)
    for norm in ("pixel", "ring"):
        corr = multitau_g2(data.frames, labels, 3, data.frame_time_s, buffers=8, chunk_bytes=8 * 300 * 50,
                           normalization=norm)
        np.testing.assert_allclose(corr.g2, _g2_by_definition(data.frames, labels, 3, 8, norm), rtol=1e-12)


def test_tiles_are_bounded_by_bytes_whatever_the_run_length(monkeypatch: pytest.MonkeyPatch) -> None:
    import balsam_grpc.xpcs.multitau as kernel

    widths = []
    original = kernel.MultiTau._feed

    def spy(self, level, z, cols):  # type: ignore[no-untyped-def]
        widths.append(z.nbytes)    # the new frames and the kept rows before them
        return original(self, level, z, cols)

    monkeypatch.setattr(kernel.MultiTau, "_feed", spy)
    data = generate(rows=32, cols=32, n_frames=512, seed=2)
    labels, _ = ring_labels(data.geometry.q_map(), 2)
    kernel.multitau_g2(data.frames, labels, 2, data.frame_time_s, chunk_bytes=64 << 10)
    assert len(widths) > 1 and max(widths) <= 64 << 10


@pytest.mark.parametrize("block", [3, 37])
def test_frames_streamed_in_blocks_give_the_definition(block: int) -> None:
    """Blocks of any size (odd ones split the pairs of every level) give the same g2."""
    data = generate(rows=12, cols=12, n_frames=300, seed=7)
    labels, _ = ring_labels(data.geometry.q_map(), 3)
    for norm in ("pixel", "ring"):
        corr = multitau_g2(data.frames, labels, 3, data.frame_time_s, buffers=8, block_frames=block, chunk_pixels=50,
                           normalization=norm)
        np.testing.assert_allclose(corr.g2, _g2_by_definition(data.frames, labels, 3, 8, norm), rtol=1e-12)


def test_streamed_state_grows_by_one_level_when_the_run_doubles() -> None:
    labels, _ = ring_labels(Geometry(rows=16, cols=16, center_row=0, center_col=0).q_map(), 2)
    short, long = (MultiTau(labels, 2, n, 1e-3) for n in (4096, 8192))
    assert long.n_levels == short.n_levels + 1
    assert long.state_bytes < 1.2 * short.state_bytes
    with pytest.raises(ValueError, match="announced"):
        short.update(np.zeros((4097, 16, 16), np.uint16))


def _two_time_by_definition(frames: np.ndarray, mask: np.ndarray) -> np.ndarray:
    x = frames[:, mask].astype(np.float64)
    mean = x.mean(axis=1)
    return (x @ x.T / x.shape[1]) / np.outer(mean, mean)


def test_two_time_maps_give_the_definition_and_its_diagonals_the_decay() -> None:
    data = generate(rows=24, cols=24, n_frames=160, seed=4)
    labels, _ = ring_labels(data.geometry.q_map(), 3)
    tt = two_time(data.frames, labels, 3, data.frame_time_s, block_frames=23)
    assert tt.maps.shape == (3, 160, 160) and tt.avg_frame == 1
    for ring in range(3):
        np.testing.assert_allclose(tt.maps[ring], _two_time_by_definition(data.frames, labels == ring), rtol=1e-9)
    np.testing.assert_allclose(tt.maps, np.transpose(tt.maps, (0, 2, 1)), rtol=1e-12)
    lags, g2 = tt.g2()
    assert lags[0] == data.frame_time_s and np.all(g2[:, 0] > g2[:, 40])  # decays with the lag
    # Binned: the map of the frames averaged in pairs; one ring only.
    binned = two_time(data.frames, labels, 3, data.frame_time_s, rings=[1], avg_frame=2, block_frames=7)
    pairs = data.frames.reshape(80, 2, 24, 24).sum(axis=1)
    np.testing.assert_allclose(binned.maps[0], _two_time_by_definition(pairs, labels == 1), rtol=1e-6)
    assert list(binned.rings) == [1] and binned.bin_s == 2 * data.frame_time_s


def test_two_time_product_exact_bounded_or_double() -> None:
    # Integer counts: the product runs in float32 tiles small enough to be exact, so the
    # maps equal the float64 definition; large counts (peak**2 * 256 pixels past 2**24)
    # take float32 tiles of SINGLE_TILE pixels, within SINGLE_RTOL of it; non-integer
    # frames, or single=False, take float64. Sum-first binning (avg_frame 3) gives the same maps.
    rng = np.random.default_rng(11)
    labels = np.where(np.arange(40 * 40).reshape(40, 40) % 3 == 0, -1, np.arange(40 * 40).reshape(40, 40) % 2)
    small = rng.poisson(4.0, size=(90, 40, 40)).astype(np.uint16)
    large = rng.poisson(3000.0, size=(90, 40, 40)).astype(np.uint16)
    noninteger = small + rng.random((90, 40, 40)).astype(np.float32)
    cases = ((small, "exact", 1, True), (small, "exact", 3, True), (large, "single", 1, True),
             (large, "double", 1, False), (noninteger, "double", 3, True))
    for frames, kind, avg, single in cases:
        acc = TwoTimeAccumulator(labels, 2, 90, 0.01, avg_frame=avg, single=single)
        # Blocks of 16 split bins of 3 (their parts summed apart: exact for counts only).
        block = 16 if kind == "exact" else 18
        for start in range(0, 90, block):
            acc.update(frames[start:start + block])
        assert acc.product_tiles(0, acc.pixel_index.size)[0] == kind
        # (bins are float32 sums: exact for counts, rounded alike for non-integer frames)
        binned = frames.reshape(90 // avg, avg, 40, 40).sum(axis=1, dtype=np.float32).astype(np.float64)
        maps = acc.result().maps
        for ring in range(2):
            np.testing.assert_allclose(maps[ring], _two_time_by_definition(binned, labels == ring),
                                       rtol=SINGLE_RTOL if kind == "single" else 1e-12)


def test_two_time_single_precision_error_is_bounded() -> None:
    # The bounded float32 product against float64 on counts built to make float32 sums
    # round: in every bin one bright pixel (4095 counts: products near 2**24, where float32
    # steps by 1 or 2) among thousands of pixels of 0-3 counts, whose products are lost
    # unless added before the bright one; and plain bright speckle. The bound,
    # gamma_k = k u / (1 - k u) per tile of k = SINGLE_TILE pixels (every term >= 0), must
    # hold entry by entry whatever order BLAS adds in.
    rng = np.random.default_rng(21)
    pixels, bins = 3 * SINGLE_TILE + 77, 64
    dim = rng.integers(0, 4, size=(bins, 1, pixels)).astype(np.uint16)
    dim[:, 0, rng.integers(0, pixels, size=bins)] = 4095
    speckle = np.minimum(rng.exponential(450.0, size=(bins, 1, pixels)), 4000).astype(np.uint16)
    labels = np.zeros((1, pixels), dtype=int)
    for frames in (dim, speckle):
        runs = {}
        for single in (True, False):
            acc = TwoTimeAccumulator(labels, 1, bins, 0.01, avg_frame=1, single=single)
            acc.update(frames)
            assert acc.product_tiles(0, pixels)[0] == ("single" if single else "double")
            runs[single] = acc.result().maps[0]
        np.testing.assert_allclose(runs[False], _two_time_by_definition(frames, labels == 0), rtol=1e-12)
        error = np.max(np.abs(runs[True] / runs[False] - 1))
        print(f"float32 tiles of {SINGLE_TILE} pixels: largest relative error {error:.1e} (bound {SINGLE_RTOL:.1e})")
        assert error <= SINGLE_RTOL
    assert 6.1e-5 < SINGLE_RTOL < 6.2e-5


def test_two_time_memory_is_capped_by_wider_bins() -> None:
    assert choose_binning(500, 100) == 1 and choose_binning(1000, 100) == 2  # at most MAX_BINS = 512 bins
    assert choose_binning(4000, 100, max_bins=1000) == 4
    short, long = choose_binning(10_000, 50_000, max_bytes=64 << 20), choose_binning(20_000, 50_000, max_bytes=64 << 20)
    assert long == 2 * short and 20_000 // long == 10_000 // short


def test_raw_hdf5_round_trip_and_streamed_reduction(tmp_path: Path) -> None:
    dataset = generate(rows=20, cols=20, n_frames=200, seed=6)
    path = save_dataset(dataset, tmp_path / "raw.h5")
    with open_raw(path) as raw:
        assert raw.meta == dataset.meta() and raw.n_frames == 200
        blocks = list(raw.blocks(block_frames=48))
    assert [b.shape[0] for b in blocks] == [48, 48, 48, 48, 8]
    np.testing.assert_array_equal(np.concatenate(blocks), dataset.frames)
    whole = analyze(dataset.frames, dataset.meta(), n_rings=4)
    streamed = reduce_file(path, n_rings=4, block_frames=16)
    np.testing.assert_allclose([r["g2"] for r in streamed.summary["rings"]], [r["g2"] for r in whole["rings"]],
                               rtol=1e-12)
    out = streamed.write_h5(tmp_path / "r_results.hdf")
    back = read_results(out)
    np.testing.assert_allclose(back.g2, [r["g2"] for r in whole["rings"]], rtol=1e-12)
    np.testing.assert_allclose(back.twotime, streamed.twotime.maps, rtol=1e-6)
    assert list(back.twotime_rings) == [0, 1, 2, 3] and back.summary["frames"] == 200
    np.testing.assert_allclose(back.intensity_t, dataset.frames[:, back.labels >= 0].mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(back.saxs_2d, dataset.frames.mean(axis=0), rtol=1e-6)
    (tmp_path / "bad.h5").write_bytes(b"not hdf5")
    with pytest.raises(ValueError, match="bad.h5"):
        open_raw(tmp_path / "bad.h5")
    with pytest.raises(ValueError, match="missing"):
        open_raw(out)  # a results file is not a raw file


def test_command_line_writes_and_reads_hdf5(tmp_path: Path) -> None:
    run = [sys.executable, "-m", "balsam_grpc.xpcs"]
    raw, summary, viewer = tmp_path / "d.h5", tmp_path / "r.json", tmp_path / "d_results.hdf"
    subprocess.run([*run, "generate", str(raw), "--frames", "256", "--size", "24"], check=True, capture_output=True)
    done = subprocess.run([*run, "analyze", str(raw), str(summary), "--rings", "3", "--viewer", str(viewer)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    back = read_results(viewer)
    np.testing.assert_allclose(back.g2, [r["g2"] for r in json.loads(summary.read_text())["rings"]], rtol=1e-12)


def test_the_site_app_takes_a_raw_file_under_its_local_name(tmp_path: Path) -> None:
    """A staged-in raw HDF5 file keeps the app's local name (dataset.npz): it is known by
    its signature, and the app also leaves the viewer's results file."""
    from balsam_grpc.xpcs.site_app import DATASET_FILE, RESULT_FILE, VIEWER_FILE

    dataset = generate(rows=16, cols=16, n_frames=128, seed=8)
    staged = save_dataset(dataset, tmp_path / "ds.h5", compress=False).rename(tmp_path / DATASET_FILE)
    summary = analyze_file(staged, tmp_path / RESULT_FILE, n_rings=3, viewer_path=tmp_path / VIEWER_FILE)
    assert summary["frames"] == 128 and summary["twotime"]["bins"] == 128
    np.testing.assert_allclose(read_results(tmp_path / VIEWER_FILE).g2, [r["g2"] for r in summary["rings"]])


def test_two_workers_and_the_shared_gather_give_the_same_numbers(tmp_path: Path) -> None:
    # Threads take multi-tau pixel tiles and two-time rings; the reduction picks the ring
    # pixels once for both kernels (all rings mapped) or apart (some). Bit for bit alike.
    dataset = generate(rows=24, cols=24, n_frames=300, seed=8)
    path = save_dataset(dataset, tmp_path / "raw.h5")
    runs = [reduce_file(path, n_rings=4, block_frames=64, workers=workers, twotime_rings=rings)
            for workers in (1, 2) for rings in (None, [1, 3])]
    labels, _ = ring_labels(dataset.geometry.q_map(), 4)
    apart = MultiTau(labels, 4, 300, dataset.frame_time_s, chunk_pixels=50)
    for start in range(0, 300, 64):
        apart.update(dataset.frames[start:start + 64])
    for run in runs:
        np.testing.assert_array_equal(run.arrays.g2, runs[0].arrays.g2)
        np.testing.assert_array_equal(run.arrays.intensity_t, runs[0].arrays.intensity_t)
    np.testing.assert_allclose(apart.result().g2, runs[0].arrays.g2, rtol=1e-12)
    np.testing.assert_array_equal(runs[2].twotime.maps, runs[0].twotime.maps)
    np.testing.assert_array_equal(runs[3].twotime.maps, runs[1].twotime.maps)
    np.testing.assert_array_equal(runs[1].twotime.maps, runs[0].twotime.maps[[1, 3]])
    threaded = MultiTau(labels, 4, 300, dataset.frame_time_s, chunk_pixels=50, workers=2)
    for start in range(0, 300, 64):
        threaded.update(dataset.frames[start:start + 64])
    np.testing.assert_array_equal(threaded.result().g2, apart.result().g2)
    with pytest.raises(ValueError, match="workers"):
        MultiTau(labels, 4, 300, dataset.frame_time_s, workers=0)


@pytest.mark.parametrize("counts", [4.0, 3000.0])
def test_counts_correlated_as_int32_give_the_float64_sums_to_the_bit(counts: float) -> None:
    # Unsigned counts go through multi-tau as int32 sums of 2**level frames while their
    # product sums cannot overflow (at 3000 counts in blocks of 37: levels 0-2, then
    # float64 averages);
    # the same frames as float64 take the float path. Odd blocks leave pairs pending.
    rng = np.random.default_rng(12)
    frames = rng.poisson(counts, size=(700, 12, 12)).astype(np.uint16)
    labels = (np.arange(144).reshape(12, 12) % 3) - 1
    runs = {}
    for dtype in (np.uint16, np.float64):
        kernel = MultiTau(labels, 2, 700, 0.01, normalization="pixel")
        for start in range(0, 700, 37):
            kernel.update(frames[start:start + 37].astype(dtype))
        runs[dtype] = kernel.result()
        assert (kernel.peak > 0) == (dtype == np.uint16)
        if dtype == np.uint16:  # int32 at level 0; at level 3 (5 frames of a block) for small counts only
            assert kernel._int_exact(37, 0) and kernel._int_exact(5, 3) == (counts < 100)
    np.testing.assert_array_equal(runs[np.uint16].g2, runs[np.float64].g2)
    np.testing.assert_array_equal(runs[np.uint16].g2_err, runs[np.float64].g2_err)
    np.testing.assert_allclose(runs[np.uint16].g2, _g2_by_definition(frames, labels, 2, 8), rtol=1e-12)
