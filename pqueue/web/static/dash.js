// pq web's dashboard: actions through the /v1/ API, live updates from /events.
// No build step, no library: plain DOM.
"use strict";

(function () {
  const main = document.querySelector("main");
  const flash = document.getElementById("flash");

  function say(html, kind) {
    flash.className = kind || "ok";
    flash.innerHTML = html;
  }

  function text(s) {
    const span = document.createElement("span");
    span.textContent = String(s);
    return span.innerHTML;
  }

  // A call of the /v1/ API; a refusal throws an Error with "STATUS CODE: message".
  async function api(method, url, body) {
    const resp = await fetch(url, {
      method: method,
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-PQ-Dashboard": "1" },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    let data = null;
    try { data = await resp.json(); } catch (e) { data = null; }
    if (!resp.ok) {
      const err = (data && data.error) || { code: "HTTP_" + resp.status, message: resp.statusText };
      const field = err.field ? " (" + err.field + ")" : "";
      throw new Error(resp.status + " " + err.code + field + ": " + err.message);
    }
    return data;
  }

  function refused(err) {
    say("<strong>Refused:</strong> " + text(err.message), "error");
  }

  // A form's fields as the API's JSON: numbers for number inputs, empty ones left out.
  function formBody(form) {
    const body = {};
    for (const el of form.elements) {
      if (!el.name || el.value === "") continue;
      body[el.name] = el.type === "number" ? Number(el.value) : el.value;
    }
    if (form.dataset.ids) body.job_ids = form.dataset.ids.split(",").map(Number);
    return body;
  }

  // ----------------------------------------------------------- live part

  let lastFetch = 0;
  let pending = null;

  async function refreshNow() {
    pending = null;
    lastFetch = Date.now();
    const part = document.getElementById("live-part");
    if (!part) return;
    // Do not wipe a selection being made (dead letters' checkboxes).
    if (part.querySelector("input:checked") || part.contains(document.activeElement)) return;
    const resp = await fetch(part.dataset.fragment, { credentials: "same-origin" });
    part.innerHTML = await resp.text();
    showRates();
  }

  // At most one fetch of the live part a second, however many events come;
  // and one more a while after the last event, as the read behind a fetch
  // may reach a node a few entries behind the one the events come from.
  let trailing = null;

  function refresh() {
    clearTimeout(trailing);
    trailing = setTimeout(() => { refreshNow().catch(refused); }, 1500);
    if (pending) return;
    const wait = Math.max(0, 1000 - (Date.now() - lastFetch));
    pending = setTimeout(() => { refreshNow().catch(refused); }, Math.min(wait, 1000) || 50);
  }

  document.addEventListener("submit", async (ev) => {
    const form = ev.target;
    if (form.dataset.openQueue !== undefined) {
      ev.preventDefault();
      location.href = "/queues/" + encodeURIComponent(form.elements.queue.value.trim());
      return;
    }
    if (!form.dataset.api) return;
    ev.preventDefault();
    if (form.dataset.confirm && !confirm(form.dataset.confirm)) return;
    try {
      const answer = await api("POST", form.dataset.api, formBody(form));
      if (form.dataset.done === "enqueued") {
        const base = location.pathname.replace(/\/$/, "");
        const dup = answer.duplicate ? " (a duplicate: the job already there)" : "";
        say('Enqueued job <a href="' + base + "/jobs/" + answer.job_id + '">' +
            answer.job_id + "</a>" + dup);
        form.elements.payload.value = "";
      } else {
        const state = answer && answer.state ? " → " + text(answer.state.toUpperCase()) : "";
        say(text(form.id || "done") + state);
      }
      await refreshNow();
    } catch (err) {
      refused(err);
    }
  });

  document.addEventListener("click", async (ev) => {
    const button = ev.target.closest("button[data-post], button[data-bulk]");
    if (!button) return;
    ev.preventDefault();
    if (button.dataset.confirm && !confirm(button.dataset.confirm)) return;
    try {
      if (button.dataset.post) {
        const answer = await api("POST", button.dataset.post, {});
        say(text(button.textContent) + (answer.changed ? ": done" : ": nothing to change"));
      } else {
        const boxes = document.querySelectorAll("#live-part input[name=job_id]:checked");
        const ids = Array.from(boxes, (b) => Number(b.value));
        if (!ids.length && button.dataset.all === undefined) {
          say("Select some jobs first.", "error");
          return;
        }
        const answer = await api("POST", button.dataset.bulk, { job_ids: ids });
        const n = answer.redriven !== undefined ? answer.redriven + " redriven" : answer.deleted + " deleted";
        say(text(n));
        boxes.forEach((b) => { b.checked = false; });
      }
      await refreshNow();
    } catch (err) {
      refused(err);
    }
  });

  // ----------------------------------------------------------- events

  const rates = {};
  const perSecond = {};

  function age(ms) {
    if (ms <= 0) return "–";
    if (ms < 1000) return ms + " ms";
    const s = ms / 1000;
    if (s < 60) return s.toFixed(1) + " s";
    const m = Math.floor(s / 60);
    return m < 60 ? m + " m " + Math.floor(s % 60) + " s" : Math.floor(m / 60) + " h " + (m % 60) + " m";
  }

  function scopeOf(queue) {
    const link = document.querySelector('[data-queue-row="' + CSS.escape(queue) + '"]');
    if (link) return link.closest("tr");
    return document.querySelector('.counts[data-queue="' + CSS.escape(queue) + '"]');
  }

  function showStats(ev) {
    const scope = scopeOf(ev.queue);
    if (!scope) return;
    for (const cell of scope.querySelectorAll("[data-stat]")) {
      const value = ev.stats[cell.dataset.stat];
      if (value === undefined) continue;
      cell.textContent = cell.dataset.age !== undefined ? age(Number(value)) : value;
    }
    // Rates over the time between two stats events, as this browser saw it
    // (an event's time_ms is its entry's: the same while nothing happens).
    const now = Date.now();
    const prev = rates[ev.queue];
    if (prev && now - prev.t < 900) return;
    rates[ev.queue] = { t: now, stats: ev.stats };
    if (!prev) return;
    const shown = {};
    for (const name of ["enqueued_total", "completed_total"]) {
      shown[name] = ((ev.stats[name] - prev.stats[name]) * 1000 / (now - prev.t)).toFixed(1);
    }
    perSecond[ev.queue] = shown;
    showRates();
  }

  // The rates the page worked out, again after the live part was fetched anew.
  function showRates() {
    for (const [queue, shown] of Object.entries(perSecond)) {
      const scope = scopeOf(queue);
      if (!scope) continue;
      for (const cell of scope.querySelectorAll("[data-rate]")) {
        if (shown[cell.dataset.rate] !== undefined) cell.textContent = shown[cell.dataset.rate];
      }
    }
  }

  function logEvent(ev) {
    const log = document.getElementById("event-log");
    if (!log) return;
    const li = document.createElement("li");
    const job = ev.job_id ? " job " + ev.job_id + " → " + ev.state : "";
    const why = ev.reason ? " (" + ev.reason + ")" : "";
    li.textContent = "#" + ev.log_index + " " + ev.kind + " " + ev.queue + job + why;
    log.prepend(li);
    while (log.children.length > 30) log.lastChild.remove();
  }

  const state = document.getElementById("live-state");
  if (main && main.dataset.live && window.EventSource) {
    const source = new EventSource(main.dataset.live, { withCredentials: true });
    source.onopen = () => { state.textContent = "live: on"; state.className = "on"; };
    source.onerror = () => { state.textContent = "live: reconnecting…"; state.className = "off"; };
    source.onmessage = (msg) => {
      const ev = JSON.parse(msg.data);
      if (ev.kind === "QUEUE_STATS") {
        showStats(ev);
      } else {
        logEvent(ev);
        refresh();
      }
    };
    source.addEventListener("refused", (msg) => {
      const err = JSON.parse(msg.data);
      source.close();
      state.textContent = "live: refused";
      state.className = "off";
      say("<strong>Live updates refused: " + text(err.status + " " + err.code) + "</strong> " +
          text(err.message), "error");
    });
    window.addEventListener("pagehide", () => source.close());
  }
})();
