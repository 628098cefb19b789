"""The contract's sizes every program shares: message limits and keepalive.

Pure constants (no IO, no grpc): the node, the balancer, the SDK and the pure
core (``pqueue.core.limits`` re-exports the request sizes it validates) all
read the same numbers from here.
"""

from __future__ import annotations

#: Largest payload any queue config may allow.
MAX_PAYLOAD_BYTES_LIMIT = 16 << 20
#: Most jobs in one batch request (enqueue, ack).
MAX_BATCH_JOBS = 1000
#: Bytes a job's result (an ack's, a force-complete's) may carry, whatever
#: the queue's ``max_result_bytes``.
MAX_RESULT_BYTES_LIMIT = 1 << 20
#: Longest nack reason kept.
MAX_REASON_CHARS = 4096
#: Largest client request or response.
MAX_MESSAGE_BYTES = 32 << 20
#: Largest message a node accepts (peer messages carry whole log entries).
MAX_PEER_MESSAGE_BYTES = 64 << 20

#: Keepalive pings on long-lived channels (balancer to node): every 10 s,
#: answered within 5 s or the connection is dead. Servers allow pings this
#: often (``KEEPALIVE_MIN_INTERVAL_MS``), else they would hang up on them.
KEEPALIVE_TIME_MS = 10_000
KEEPALIVE_TIMEOUT_MS = 5_000
KEEPALIVE_MIN_INTERVAL_MS = 5_000
#: A server's own pings: a connection silent this long is pinged, and closed
#: (its streams ended, a streaming consumer's waiter freed) when no answer
#: comes within ``KEEPALIVE_TIMEOUT_MS``: a consumer host that died without a
#: word does not hold a stream open until the next restart.
SERVER_KEEPALIVE_TIME_MS = 30_000
#: What a server sets so clients' keepalive pings are welcome, and so it
#: pings quiet connections itself (with no data between pings as often as
#: it likes: an idle consumer stream carries none).
SERVER_KEEPALIVE_OPTIONS = (
    ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_MIN_INTERVAL_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.keepalive_time_ms", SERVER_KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.http2.max_pings_without_data", 0),
)
