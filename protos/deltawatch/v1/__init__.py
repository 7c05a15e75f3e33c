"""Wire protocol of deltawatch, version 1 (generated protobuf and gRPC modules live beside the .proto)."""
