"""An enqueue's batch check (``_check_specs``) refuses exactly what checking
each job in turn (``_check_spec`` with ``jobs[i]``) refuses, with the same
field and message: its quick pass only decides which jobs need the full check."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pqueue.core import limits
from pqueue.core.machine import QueueMachine
from pqueue.errors import PQueueError
from pqueue.v1 import queue_pb2 as pb

MAX_KEY = limits.MAX_KEY_CHARS

specs = st.builds(
    pb.JobSpec,
    payload=st.sampled_from([b"", b"x" * 10, b"x" * 100, b"x" * 1001]),
    priority=st.integers(-5, 5),
    delay_ms=st.sampled_from([0, 5, limits.MAX_DURATION_MS, limits.MAX_DURATION_MS + 1]),
    not_before_ms=st.sampled_from([0, 7, -1]),
    expires_at_ms=st.sampled_from([0, 9, -1]),
    idempotency_key=st.sampled_from(["", "k", "k" * MAX_KEY, "k" * (MAX_KEY + 1)]),
    group=st.sampled_from(["", "g", "g" * MAX_KEY, "g" * (MAX_KEY + 1)]),
)


@st.composite
def configs(draw: st.DrawFn) -> pb.QueueConfig:
    config = pb.QueueConfig(max_payload_bytes=draw(st.sampled_from([100, 1000, 10_000])))
    if draw(st.booleans()):
        config.min_priority = draw(st.integers(-3, 0))
    if draw(st.booleans()):
        config.max_priority = draw(st.integers(0, 3))
    return limits.effective_config(config, lifecycle=True)


def outcome(check: object) -> tuple[str, str, str] | None:
    try:
        check()  # type: ignore[operator]
    except PQueueError as exc:
        return type(exc).__name__, getattr(exc, "field", ""), str(exc)
    return None


@settings(max_examples=400, deadline=None)
@given(configs(), st.lists(specs, max_size=6))
def test_the_batch_check_refuses_what_each_jobs_check_refuses(
    config: pb.QueueConfig, jobs: list[pb.JobSpec]
) -> None:
    m = QueueMachine()

    def one_by_one() -> None:
        for i, spec in enumerate(jobs):
            m._check_spec(config, spec, f"jobs[{i}]")

    assert outcome(lambda: m._check_specs(config, jobs)) == outcome(one_by_one)


def test_a_refusal_names_the_job_it_is_about() -> None:
    m = QueueMachine()
    config = limits.effective_config(pb.QueueConfig(max_priority=2), lifecycle=True)
    jobs = [pb.JobSpec(priority=1), pb.JobSpec(not_before_ms=-1), pb.JobSpec(priority=3)]
    got = outcome(lambda: m._check_specs(config, jobs))
    assert got is not None
    assert got[1] == "jobs[1].not_before_ms"
