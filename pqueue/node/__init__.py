"""The node: server (composition root), servicers, QueueNode, the replicated-log
shell, peers, forwarding, auth and tenancy, metrics; see docs/architecture.md."""
