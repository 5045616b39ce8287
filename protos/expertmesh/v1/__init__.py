"""The wire contract `expertmesh.v1`, compiled when first imported (generated code is not committed).

This directory is both the proto package `expertmesh.v1` (its `.proto` files) and the Python package
of the same name: grpcio-tools compiles the files in memory and the generated modules appear here, as
`expertmesh.v1.generate_pb2`, `expertmesh.v1.generate_pb2_grpc` and so on.
"""

from __future__ import annotations

import sys
from pathlib import Path

import grpc

_ROOT = str(Path(__file__).resolve().parents[2])  # the proto include root: protos/
if _ROOT not in sys.path:
    sys.path.append(_ROOT)  # protos_and_services resolves .proto paths against sys.path

tensor_pb2 = grpc.protos("expertmesh/v1/tensor.proto")
expert_pb2, expert_pb2_grpc = grpc.protos_and_services("expertmesh/v1/expert.proto")
router_pb2, router_pb2_grpc = grpc.protos_and_services("expertmesh/v1/router.proto")
generate_pb2, generate_pb2_grpc = grpc.protos_and_services("expertmesh/v1/generate.proto")
attention_pb2, attention_pb2_grpc = grpc.protos_and_services("expertmesh/v1/attention.proto")

PROTO_FILES = tuple(sorted(str(p) for p in Path(__file__).resolve().parent.glob("*.proto")))
