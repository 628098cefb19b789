"""A queue's page (counts, jobs by state with filters and pages, the dead
letters with bulk redrive, the submit form, pause and resume) and a job's
page (payload, attempts, error history, result, actions).

Actions are forms the page's script sends to the ``/v1/`` API as JSON
(``data-api``); the refusals come back as the API's JSON errors and are
shown as such.
"""

from __future__ import annotations

from starlette.requests import Request

from pqueue.cli.render import state_name
from pqueue.client import Client
from pqueue.errors import InvalidArgumentError, NotFoundError
from pqueue.v1 import queue_pb2 as pb
from pqueue.web.html import (
    api_url,
    esc,
    job_url,
    preview,
    qname,
    queue_url,
    table,
    when,
)
from pqueue.web.pages import COUNTS, Page, count_cells, live_part, oldest_cell
from pqueue.web.params import job_id as job_id_of
from pqueue.web.params import query_int, queue_name

#: Jobs a page of the queue's list shows.
PAGE_JOBS = 50
#: Characters of a payload the jobs list shows.
LIST_PREVIEW = 80


def _short(payload: bytes) -> str:
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return f"<{len(payload)} bytes>"
    return text if len(text) <= LIST_PREVIEW else text[:LIST_PREVIEW] + "…"


def _stats_table(queue: str, stats: pb.QueueStats) -> str:
    paused = '<span class="badge paused" id="paused">paused</span>' if stats.paused else ""
    counts = table(
        [
            *COUNTS,
            "oldest ready",
            "enqueued",
            "completed",
            "dead (all time)",
            "enqueued/s",
            "completed/s",
        ],
        [
            [
                *count_cells(stats),
                oldest_cell(stats),
                f'<span data-stat="enqueued_total">{stats.enqueued_total}</span>',
                f'<span data-stat="completed_total">{stats.completed_total}</span>',
                f'<span data-stat="dead_total">{stats.dead_total}</span>',
                '<span data-rate="enqueued_total">&ndash;</span>',
                '<span data-rate="completed_total">&ndash;</span>',
            ]
        ],
        cls="stats",
    )
    return f'<div class="counts" data-queue="{esc(queue)}">{paused}{counts}</div>'


def _job_rows(queue: str, state: str, jobs: list[pb.Job]) -> list[list[str]]:
    rows = []
    for job in jobs:
        last = job.errors[-1].reason if job.errors else job.reason
        rows.append(
            [
                *(
                    [f'<input type="checkbox" name="job_id" value="{job.job_id}">']
                    if state == "dead"
                    else []
                ),
                f'<a href="{esc(job_url(queue, job.job_id))}">{job.job_id}</a>',
                f'<span class="state {state_name(job.state)}">{state_name(job.state)}</span>',
                str(job.priority),
                str(job.attempts),
                esc(job.group),
                f"<code>{esc(_short(job.payload))}</code>",
                when(job.enqueued_at_ms),
                when(job.finished_at_ms or job.ready_at_ms),
                esc(last),
            ]
        )
    return rows


def _filters(queue: str, state: str, request: Request) -> str:
    q = request.query_params
    return (
        f'<form class="inline filters" method="get" action="{esc(queue_url(queue))}">'
        f'<input type="hidden" name="state" value="{esc(state)}">'
        f'<label>priority ≥ <input type="number" name="min_priority" '
        f'value="{esc(q.get("min_priority", ""))}"></label>'
        f'<label>≤ <input type="number" name="max_priority" '
        f'value="{esc(q.get("max_priority", ""))}"></label>'
        f'<label>group <input name="group" value="{esc(q.get("group", ""))}"></label>'
        "<button>Filter</button></form>"
    )


def _dead_tools(queue: str) -> str:
    return (
        '<div class="bulk">'
        f'<button data-bulk="{esc(api_url(queue, "/dead/redrive"))}">Redrive selected</button>'
        f'<button data-bulk="{esc(api_url(queue, "/dead/redrive"))}" data-all '
        'data-confirm="Redrive every dead job of this queue?">Redrive all</button>'
        f'<button data-bulk="{esc(api_url(queue, "/dead/delete"))}" '
        'data-confirm="Delete the selected dead jobs for good?">Delete selected</button>'
        "</div>"
    )


async def _queue_info(client: Client, queue: str) -> pb.QueueInfo | None:
    """The queue, or None while it holds nothing yet. ListQueues leaves out
    queues the caller may not see, so a queue missing there is asked for
    by name: another tenant's answers PERMISSION_DENIED, which the page shows."""
    try:
        return await client.get_queue(queue)
    except NotFoundError:
        pass
    try:
        await client.stats(queue)
    except NotFoundError:
        return None
    return await client.get_queue(queue)  # made meanwhile


async def queue_page(request: Request, client: Client) -> Page:
    queue = queue_name(request)
    q = request.query_params
    state = q.get("state", "ready")
    if state not in COUNTS:
        raise InvalidArgumentError("state", f"one of {', '.join(COUNTS)}")
    min_p, max_p = query_int(request, "min_priority"), query_int(request, "max_priority")
    group, page_token = q.get("group", ""), q.get("page_token", "")
    info = await _queue_info(client, queue)
    if info is None:
        inner = (
            f'<p class="note" id="no-queue">No queue <code>{esc(queue)}</code> yet: '
            "the first job submitted below makes it.</p>"
        )
    else:
        jobs = await client.list_jobs(
            queue,
            state,
            min_priority=min_p,
            max_priority=max_p,
            group=group,
            page_token=page_token,
            limit=PAGE_JOBS,
        )
        tabs = "".join(
            f'<a href="{esc(queue_url(queue, state=s))}"'
            f"{' class=here' if s == state else ''}>{s} ({getattr(info.stats, s)})</a>"
            for s in COUNTS
        )
        columns = ["job", "state", "priority", "attempts", "group", "payload"]
        columns += ["enqueued", "ready / finished", "last error / note"]
        if state == "dead":
            columns.insert(0, "")
        pages = ""
        filters = {"state": state, "min_priority": min_p, "max_priority": max_p, "group": group}
        if page_token:
            pages += f'<a href="{esc(queue_url(queue, **filters))}">first page</a> '
        if jobs.next_page_token:
            nxt = queue_url(queue, **filters, page_token=jobs.next_page_token)
            pages += f'<a href="{esc(nxt)}" id="next-page">next page →</a>'
        inner = (
            _stats_table(queue, info.stats)
            + f'<nav class="tabs">{tabs}</nav>'
            + _filters(queue, state, request)
            + (_dead_tools(queue) if state == "dead" else "")
            + table(columns, _job_rows(queue, state, list(jobs.jobs)), cls="jobs")
            + f'<p class="pages">{pages}</p>'
        )
    this = str(request.url.path) + (f"?{request.url.query}&" if request.url.query else "?")
    body = (
        f"<h1>Queue <code>{esc(queue)}</code></h1>"
        '<div class="toolbar">'
        f'<button data-post="{esc(api_url(queue, "/pause"))}">Pause leasing</button>'
        f'<button data-post="{esc(api_url(queue, "/resume"))}">Resume</button></div>'
        + live_part(this + "fragment=1", inner)
        + _submit_form(queue)
        + '<h2>Events</h2><ol id="event-log" class="events"></ol>'
    )
    return Page(f"Queue {queue}", body, inner, live=f"/events?queue={qname(queue)}", nav="/")


def _submit_form(queue: str) -> str:
    return (
        "<h2>Submit a job</h2>"
        f'<form class="stack" id="submit" data-api="{esc(api_url(queue, "/jobs"))}" '
        'data-done="enqueued">'
        '<label>Payload <textarea name="payload" rows="3" required></textarea></label>'
        '<div class="row"><label>Priority <input type="number" name="priority" value="0"></label>'
        '<label>Delay (ms) <input type="number" name="delay_ms" min="0"></label>'
        '<label>Group <input name="group"></label>'
        '<label>Idempotency key <input name="idempotency_key"></label></div>'
        '<button type="submit">Enqueue</button></form>'
    )


# ------------------------------------------------------------------ a job


def _job_details(job: pb.Job) -> str:
    state = state_name(job.state)
    fields = [
        ("state", f'<span class="state {state}" id="job-state">{state.upper()}</span>'),
        ("priority", str(job.priority)),
        ("attempts", str(job.attempts)),
        ("group", esc(job.group) or "&ndash;"),
        ("tenant", esc(job.tenant) or "&ndash;"),
        ("idempotency key", esc(job.idempotency_key) or "&ndash;"),
        ("consumer", esc(job.consumer_id) or "&ndash;"),
        ("enqueued", when(job.enqueued_at_ms)),
        ("ready at", when(job.ready_at_ms)),
        ("lease expires", when(job.lease_expires_at_ms)),
        ("finished", when(job.finished_at_ms)),
        ("expires", when(job.expires_at_ms)),
        ("note / reason", esc(job.reason) or "&ndash;"),
    ]
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{v}</td></tr>" for k, v in fields)
    errors = table(
        ["attempt", "at", "reason"],
        [[str(e.attempt), when(e.at_ms), esc(e.reason)] for e in job.errors],
        cls="errors",
    )
    result = (
        f'<h2>Result</h2><pre class="payload" id="result">{preview(job.result)}</pre>'
        if job.result
        else ""
    )
    return (
        f'<table class="fields">{rows}</table>'
        f'<h2>Payload ({len(job.payload)} bytes)</h2><pre class="payload" id="payload">'
        f"{preview(job.payload)}</pre>{result}<h2>Error history</h2>{errors}"
    )


def _actions(queue: str, job_id: int) -> str:
    def url(tail: str) -> str:
        return esc(api_url(queue, f"/jobs/{job_id}{tail}"))

    dead = esc(api_url(queue, "/dead/delete"))
    return (
        '<h2>Actions</h2><div class="actions">'
        f'<form data-api="{url("/complete")}" id="complete"><b>Complete</b>'
        '<input name="note" placeholder="note"><input name="result" placeholder="result">'
        "<button>Force-complete</button></form>"
        f'<form data-api="{url("/cancel")}" id="cancel"><b>Cancel</b>'
        '<input name="note" placeholder="note"><button>Cancel job</button></form>'
        f'<form data-api="{url("/requeue")}" id="requeue"><b>Requeue</b>'
        '<input type="number" name="delay_ms" min="0" placeholder="delay ms">'
        "<button>Requeue</button></form>"
        f'<form data-api="{url("/reprioritize")}" id="reprioritize"><b>Priority</b>'
        '<input type="number" name="priority" required placeholder="priority">'
        "<button>Reprioritize</button></form>"
        f'<form data-api="{dead}" id="delete" data-ids="{job_id}" '
        'data-confirm="Delete this dead job for good?"><b>Delete (dead only)</b>'
        "<button>Delete</button></form></div>"
    )


async def job_page(request: Request, client: Client) -> Page:
    queue, job_id = queue_name(request), job_id_of(request)
    job = await client.get_job(queue, job_id)
    inner = _job_details(job)
    body = (
        f'<p><a href="{esc(queue_url(queue))}">← queue <code>{esc(queue)}</code></a></p>'
        f"<h1>Job {job_id}</h1>"
        + live_part(f"{job_url(queue, job_id)}?fragment=1", inner)
        + _actions(queue, job_id)
        + '<h2>Events</h2><ol id="event-log" class="events"></ol>'
    )
    return Page(
        f"Job {job_id}", body, inner, live=f"/events?queue={qname(queue)}&job={job_id}", nav="/"
    )
