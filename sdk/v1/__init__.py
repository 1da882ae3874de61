"""Generated protobuf and gRPC code for mabeam.v1 (scripts/gen_protos.py; do not edit)."""
