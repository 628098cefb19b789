"""The pure queue core: the state machine, jobs, limits, snapshots, features.
No asyncio, grpc, clock, IO or global random; see docs/architecture.md."""
