"""The shared kernel: what every program speaks (metadata keys, sizes, channel
options, token sources, errors <-> statuses, TLS, interceptors, logging, the
event loop). Imports no node, core, storage, consensus, CLI or balancer module;
see docs/architecture.md."""
