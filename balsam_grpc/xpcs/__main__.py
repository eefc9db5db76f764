"""`python -m balsam_grpc.xpcs generate OUT.h5 [...]` and `... analyze IN.h5 OUT.json [--viewer R.hdf]`.

Datasets ending in .h5/.hdf/.hdf5 are raw HDF5 files (written and read a block of frames
at a time); others are .npz. A results path ending in .hdf/.h5 gets the results file in
pyXPCSViewer's layout (multi-tau g2, two-time maps), else the JSON summary."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from balsam_grpc.xpcs.analysis import analyze_file, save_dataset
from balsam_grpc.xpcs.h5io import is_h5, write_raw
from balsam_grpc.xpcs.synthetic import default_geometry, generate, iter_frames


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m balsam_grpc.xpcs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="write a synthetic speckle dataset with a known decay")
    gen.add_argument("output", type=Path)
    gen.add_argument("--frames", type=int, default=1024)
    gen.add_argument("--size", type=int, default=64, help="detector rows = cols")
    gen.add_argument("--frame-time", type=float, default=1e-3, help="seconds per frame")
    gen.add_argument("--diffusion", type=float, default=3e-14, help="D in m^2/s (Gamma = D q^2)")
    gen.add_argument("--counts", type=float, default=40.0, help="mean photons per pixel per frame")
    gen.add_argument("--modes", type=int, default=1, help="speckle modes per pixel (contrast = 1/modes)")
    gen.add_argument("--seed", type=int, default=0)
    ana = sub.add_parser("analyze", help="multi-tau g2 (and two-time maps) per q-ring and decay fits")
    ana.add_argument("dataset", type=Path)
    ana.add_argument("output", type=Path)
    ana.add_argument("--rings", type=int, default=8)
    ana.add_argument("--buffers", type=int, default=8)
    ana.add_argument("--viewer", type=Path, default=None, help="also write the results file pyXPCSViewer opens")
    ana.add_argument("--workers", type=int, default=1,
                     help="threads for the correlations (2: a second core; the same results)")
    args = parser.parse_args(argv)
    try:
        if args.command == "generate":
            opts = dict(rows=args.size, cols=args.size, n_frames=args.frames, frame_time_s=args.frame_time,
                        diffusion_m2_per_s=args.diffusion, mean_counts=args.counts, modes=args.modes, seed=args.seed)
            if is_h5(args.output):  # streamed: a block of frames in memory at a time
                write_raw(args.output, iter_frames(**opts), n_frames=args.frames,
                          geometry=default_geometry(args.size, args.size), frame_time_s=args.frame_time,
                          truth={"diffusion_m2_per_s": args.diffusion, "contrast": 1.0 / args.modes})
            else:
                save_dataset(generate(**opts), args.output)
            print(f"wrote {args.output}: {args.frames} frames of {args.size}x{args.size}")
        else:
            results = analyze_file(args.dataset, args.output, n_rings=args.rings, buffers=args.buffers,
                                   viewer_path=args.viewer, workers=args.workers)
            print(f"wrote {args.output}: {len(results['rings'])} rings, {len(results['tau_s'])} lags, "
                  f"D = {results['diffusion_m2_per_s']:.3e} m^2/s in {results['seconds']:.2f} s")
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
