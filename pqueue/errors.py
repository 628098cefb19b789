"""The pqueue error tree: one root, typed fields, a ``retriable`` flag.

::

    PQueueError                      retriable
    ├── InvalidArgumentError         no    (field, reason)     INVALID_ARGUMENT
    ├── NotFoundError                no                        NOT_FOUND
    ├── AlreadyExistsError           no                        ALREADY_EXISTS
    ├── LeaseLostError               no    (job_id)            ABORTED
    ├── FailedPreconditionError      no                        FAILED_PRECONDITION
    │   ├── NotLeaderError           yes   (leader_id, leader_address)
    │   └── FeatureUnavailableError  no    (feature, nodes)    (rolling upgrade)
    ├── UnavailableError             yes   (retry_after_s,     UNAVAILABLE
    │                                       reason, metadata)
    │   └── NotTakenError            yes   (cause)             (no leader, draining)
    ├── ResourceExhaustedError       hint  (retry_after_s)     RESOURCE_EXHAUSTED
    ├── UnauthenticatedError         no                        UNAUTHENTICATED
    ├── PermissionDeniedError        no                        PERMISSION_DENIED
    ├── DeadlineExceededError        yes                       DEADLINE_EXCEEDED
    ├── RemoteError                  no    (code name)         anything else from a server
    ├── StorageError                 no                        (node-internal)
    │   └── StorageCorruptError      no
    └── UpgradeRequiredError         no    (index, features)   (node-internal)

Domain code raises these; the servicer turns them into gRPC statuses
(``pqueue.wire.status``) and the client turns statuses back into them
(``pqueue.client``). Nothing here imports grpc.
"""

from __future__ import annotations


class PQueueError(Exception):
    """Root of every error pqueue raises."""

    retriable: bool = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgumentError(PQueueError):
    """A request field is malformed or out of bounds; nothing changed."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class NotFoundError(PQueueError):
    """The queue or job does not exist."""


class AlreadyExistsError(PQueueError):
    """A queue of that name exists with a different config."""


class LeaseLostError(PQueueError):
    """The lease id is stale: the job is no longer leased under it."""

    def __init__(self, message: str, job_id: int = 0) -> None:
        super().__init__(message)
        self.job_id = job_id


class FailedPreconditionError(PQueueError):
    """The system is not in a state that allows the call."""


class NotLeaderError(FailedPreconditionError):
    """This node does not lead; ``leader_address`` says who does, if known."""

    retriable = True

    def __init__(self, message: str, leader_id: str = "", leader_address: str = "") -> None:
        super().__init__(message)
        self.leader_id = leader_id
        self.leader_address = leader_address


class FeatureUnavailableError(FailedPreconditionError):
    """The call needs a log feature that some members have not announced (a
    rolling upgrade is not finished): ``feature`` and the ``nodes`` lacking it."""

    def __init__(self, message: str, feature: str = "", nodes: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.feature = feature
        self.nodes = nodes


class UnavailableError(PQueueError):
    """No leader yet, the node is draining, or the server cannot be reached.

    ``reason`` is the ``ErrorInfo`` reason a server sent with it (the causes
    are listed in proto/pqueue/v1/queue.proto, "Errors"), with its
    ``metadata``; "" when none came (no server answered: a refused
    connection, a node that died mid-call).
    """

    retriable = True

    def __init__(
        self,
        message: str,
        retry_after_s: float = 0.0,
        reason: str = "",
        metadata: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.reason = reason
        self.metadata = dict(metadata or {})


class NotTakenError(UnavailableError):
    """This node took nothing (no leader known, or it is draining): retry anywhere.

    Unlike a bare ``UnavailableError``, whose call may or may not have run,
    this one is certain the call did not, so even a lease may be retried.
    Its ``reason`` is always ``NOT_TAKEN``; ``cause`` says why (``DRAINING``,
    ``NO_LEADER``, ...), sent as the ErrorInfo's ``cause`` metadata.
    """

    def __init__(
        self,
        message: str,
        retry_after_s: float = 0.0,
        cause: str = "",
        metadata: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message, retry_after_s, "NOT_TAKEN", metadata)
        self.cause = cause


class ResourceExhaustedError(PQueueError):
    """A limit or quota was hit; retry after ``retry_after_s``.

    Retriable only when the server gave a retry hint: a rate limit passes,
    but a message over gRPC's size limit fails the same way every time.
    """

    def __init__(self, message: str, retry_after_s: float = 0.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.retriable = retry_after_s > 0


class UnauthenticatedError(PQueueError):
    """Missing or bad credentials."""


class PermissionDeniedError(PQueueError):
    """Valid credentials without the right to do this."""


class DeadlineExceededError(PQueueError):
    """The call's deadline passed before an answer."""

    retriable = True


class RemoteError(PQueueError):
    """Any other status a server returned."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        #: The gRPC status code's name, e.g. ``DATA_LOSS``.
        self.code = code


class StorageError(PQueueError):
    """The node's durable store failed (raised inside a node, never sent as is)."""


class StorageCorruptError(StorageError):
    """Stored data fails its checksum or does not decode, away from the torn tail."""


class UpgradeRequiredError(PQueueError):
    """A chosen log entry (or snapshot) needs what this node's release cannot
    apply: the node stops before applying it (node-internal, never sent)."""

    def __init__(self, index: int, features: list[str], what: str) -> None:
        super().__init__(
            f"{what}: a newer leader wrote it. This node stopped before applying it "
            "(and anything after it) rather than diverge from the other nodes. Upgrade "
            "this node to the release the others run and start it again: it resumes "
            f"at entry {index}."
        )
        self.index = index
        self.features = features
