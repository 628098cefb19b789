"""The dashboard in a real headless Chromium against a real cluster, as
``make cluster`` starts it (nodes, balancer and ``pq web`` as processes):
the queue page counts a job submitted through its form, and one enqueued
elsewhere, without a reload (the Watch stream, as server-sent events); a
dead job's page force-completes it. Screenshots of the queue, job and
cluster pages land in the test's directory, and in ``PQ_SCREENSHOTS``
(``make screenshots``: docs/img/) when set.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from pqueue.client import Client
from pqueue.errors import FailedPreconditionError
from pqueue.v1 import queue_pb2 as pb
from tests.browser import chromium
from tests.integration.test_dev_cluster import dev_cluster, stop, until_ready

if TYPE_CHECKING:
    from selenium.webdriver.chrome.webdriver import WebDriver

ROOT = Path(__file__).resolve().parents[2]
#: How long the page may take to show what it was sent (events, answers).
WAIT_S = 20.0


def until(what: str, check: Callable[[], bool]) -> None:
    """Wait for ``check`` (blocking: the browser is another process)."""
    deadline = time.monotonic() + WAIT_S
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"the page never showed {what}")
        time.sleep(0.1)


def text(driver: WebDriver, css: str) -> str:
    """The text of the element ``css`` finds; "" when there is none. One
    replaced while it is read (the live part fetched anew) is found again:
    taken for "", it would pass a wait for an element gone (``#paused``)."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.common.by import By

    for _ in range(100):
        try:
            return str(driver.find_element(By.CSS_SELECTOR, css).text)
        except NoSuchElementException:
            return ""
        except StaleElementReferenceException:
            continue
    raise AssertionError(f"{css} kept being replaced while read")


def act(driver: WebDriver, steps: Callable[[], None]) -> None:
    """Run ``steps`` (find elements, type, click), again from the start if an
    element it found was replaced meanwhile (the page swaps its live part on
    each refetch: a found link or form can go stale before its click)."""
    from selenium.common.exceptions import StaleElementReferenceException

    for _ in range(100):
        try:
            steps()
            return
        except StaleElementReferenceException:
            continue
    raise AssertionError("the elements kept being replaced")


def click(driver: WebDriver, by: str, value: str, index: int = 0) -> None:
    """Find the ``index``-th element ``by``/``value`` and click it (``act``)."""
    act(driver, lambda: driver.find_elements(by, value)[index].click())


def shoot(driver: WebDriver, name: str, out: Path) -> None:
    path = out / f"{name}.png"
    assert driver.save_screenshot(str(path)), name
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    keep = os.environ.get("PQ_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, Path(keep) / path.name)


async def lifecycle_on(c: Client, queue: str) -> None:
    """Wait until the cluster takes job actions: just after ``ready:`` a node
    not heard from yet holds back the lifecycle feature (FAILED_PRECONDITION)."""
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            await c.pause_queue(queue)
            await c.resume_queue(queue)
            return
        except FailedPreconditionError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def test_the_dashboard_in_chromium(tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    shots = tmp_path / "shots"
    shots.mkdir()
    proc = await dev_cluster(tmp_path / "c", "--base-port", "0", "--metrics-port", "0")
    try:
        lines = await until_ready(proc)
        url = lines[0].split()[1]
        balancer = next(x for x in lines if x.startswith("balancer: ")).split()[1]
        async with Client(balancer) as c:
            # A queue whose jobs die at their first nack, and one dead job in it.
            await c.create_queue("mail", pb.QueueConfig(max_attempts=1))
            await lifecycle_on(c, "mail")
            dead_id = (await c.enqueue("mail", '{"to": "ops@example.com"}')).job_id
            (leased,) = await c.lease("mail", max_jobs=1, lease_ms=30_000)
            await c.nack("mail", leased.job_id, leased.lease_id, reason="smtp: 550 no such user")
            assert (await c.get_job("mail", dead_id)).state == pb.JOB_STATE_DEAD

            with chromium(tmp_path / "profile") as driver:
                driver.get(f"{url}/queues/mail")
                until("live: on", lambda: text(driver, "#live-state") == "live: on")
                assert text(driver, "#auth").startswith("Auth is OFF")
                assert text(driver, ".counts [data-stat=ready]") == "0"
                assert text(driver, ".counts [data-stat=dead]") == "1"
                driver.execute_script("window.notReloaded = true;")

                # Enqueue through the form: the answer and the count, same page.
                def submit() -> None:
                    form = driver.find_element(By.ID, "submit")
                    for name, value in (
                        ("payload", '{"to": "ana@example.com"}'),
                        ("priority", "-3"),
                    ):
                        field = form.find_element(By.NAME, name)
                        field.clear()
                        field.send_keys(value)
                    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()

                act(driver, submit)
                until("the job id", lambda: "Enqueued job" in text(driver, "#flash"))
                until("ready 1", lambda: text(driver, ".counts [data-stat=ready]") == "1")
                until("the row", lambda: "ana@example.com" in text(driver, "table.jobs"))

                # A job enqueued elsewhere: only the event stream can tell the page.
                await c.enqueue("mail", '{"to": "bo@example.com"}')
                until("ready 2", lambda: text(driver, ".counts [data-stat=ready]") == "2")
                until("the event", lambda: "ENQUEUED mail" in text(driver, "#event-log"))
                until("the new row", lambda: "bo@example.com" in text(driver, "table.jobs"))
                # Rates come from two stats events a second apart, and stay.
                rate = ".counts [data-rate=enqueued_total]"
                until("a rate", lambda: text(driver, rate).replace(".", "").isdigit())
                assert driver.execute_script("return window.notReloaded === true;")
                shoot(driver, "queue", shots)

                # Pause and resume: the buttons, their answers, then the badge
                # from the page's refetch. The answer first: a refetch that
                # reads a node a few entries behind can drop the badge before
                # the resume was even sent.
                click(driver, By.CSS_SELECTOR, ".toolbar button", 0)  # pause
                until("the pause", lambda: text(driver, "#flash") == "Pause leasing: done")
                until("paused", lambda: text(driver, "#paused") == "paused")
                assert (await c.stats("mail", consistent=True))[0].paused
                click(driver, By.CSS_SELECTOR, ".toolbar button", 1)  # resume
                until("the resume", lambda: text(driver, "#flash") == "Resume: done")
                until("not paused", lambda: text(driver, "#paused") == "")
                assert not (await c.stats("mail", consistent=True))[0].paused

                # The dead letters, then the dead job's page: force-complete it.
                click(driver, By.CSS_SELECTOR, "nav.tabs a[href*='state=dead']")
                until("the dead job", lambda: str(dead_id) in text(driver, "table.jobs"))
                click(driver, By.LINK_TEXT, str(dead_id))
                until("DEAD", lambda: text(driver, "#job-state") == "DEAD")
                assert "smtp: 550 no such user" in text(driver, "table.errors")
                assert "ops@example.com" in text(driver, "#payload")
                until("live: on", lambda: text(driver, "#live-state") == "live: on")

                def force_complete() -> None:
                    form = driver.find_element(By.ID, "complete")
                    for name, value in (("note", "resent by hand"), ("result", "ok: resent")):
                        field = form.find_element(By.NAME, name)
                        field.clear()
                        field.send_keys(value)
                    form.find_element(By.TAG_NAME, "button").click()

                act(driver, force_complete)
                until("COMPLETED", lambda: text(driver, "#job-state") == "COMPLETED")
                assert "ok: resent" in text(driver, "#result")
                shoot(driver, "job", shots)
                job = await c.get_job("mail", dead_id, consistent=True)
                assert (job.state, job.reason) == (pb.JOB_STATE_COMPLETED, "resent by hand")

                # A refused action says why, on the page: a completed job cannot be cancelled.
                click(driver, By.CSS_SELECTOR, "#cancel button")
                until("the refusal", lambda: "409 FAILED_PRECONDITION" in text(driver, "#flash"))

                driver.get(f"{url}/cluster")
                until("the leader", lambda: text(driver, "#leader").startswith("127.0.0.1:"))
                assert text(driver, "table.nodes").count("follower") == 2
                shoot(driver, "cluster", shots)
    finally:
        await stop(proc)
