"""XPCS reduction: multi-tau g2(q, tau) and two-time maps C(t1, t2) per q-ring of a run of
speckle frames streamed from a raw HDF5 file, fitted relaxation rates, results in the
layout pyXPCSViewer opens; and a generator of synthetic runs with a known decay. NumPy and
h5py only (docs/xpcs.md); the demo's analysis app runs `python -m balsam_grpc.xpcs`."""
