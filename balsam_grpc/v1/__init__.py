"""Generated protobuf and gRPC stubs of the balsam.v1 contract (scripts/gen_protos.py)."""
