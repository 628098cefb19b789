#!/usr/bin/env python3
"""``pq-healthcheck HOST:PORT``: exit 0 if the server reports SERVING on grpc.health.v1.

The image installs this as ``/usr/local/bin/pq-healthcheck`` for compose
healthchecks (Kubernetes probes gRPC health natively). Nodes and balancers
both answer for service ``""``: a node once it has recovered, a balancer once
some backend is up. Exit 1, with one line on stderr, for any other status or
an unreachable server.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main(argv: Sequence[str] | None = None) -> int:
    """Ask ``address`` for its health once; 0 if SERVING."""
    p = argparse.ArgumentParser(prog="pq-healthcheck", description=__doc__)
    p.add_argument("address", help="HOST:PORT of a node or a balancer")
    p.add_argument("--service", default="", help='health service name (default: "", overall)')
    p.add_argument("--timeout-s", type=float, default=2.0)
    args = p.parse_args(argv)
    request = health_pb2.HealthCheckRequest(service=args.service)
    with grpc.insecure_channel(args.address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(request, timeout=args.timeout_s)
        except grpc.RpcError as exc:
            code = exc.code().name if isinstance(exc, grpc.Call) else "ERROR"
            print(f"{args.address}: {code}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"{args.address}: {status}", file=sys.stderr)
        return 1
    print(f"{args.address}: {status}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
