"""XPCS reduction: multi-tau intensity autocorrelation g2(q, tau) of a stack of speckle
frames, per q-ring, with fitted relaxation rates; and a generator of synthetic datasets
with a known decay. NumPy only; the demo's analysis app runs `python -m balsam_grpc.xpcs`."""
