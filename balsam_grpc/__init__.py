"""balsam-grpc: HPC workflow and edge service over a gRPC control plane."""

__version__ = "0.1.0"
