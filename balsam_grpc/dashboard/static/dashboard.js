/* balsam dashboard: live updates over Server-Sent Events, local times, charts.
   The server renders every page; this script only (1) shows times in the viewer's zone,
   (2) applies each coalesced batch of events (job rows change state in place, new jobs are
   fetched as rows), (3) refetches the server-rendered parts an event makes stale, at most
   once per their interval, and (4) draws the charts with the vendored uPlot. */
(function () {
  "use strict";
  const page = JSON.parse(document.getElementById("page-data").textContent || "{}");
  const styles = page.styles || {};
  // For tests and the curious: what arrived and when each job's new state was shown.
  const stats = window.__dash = { batches: 0, events: 0, seen: {}, cursor: page.cursor || "", opened: 0 };

  // ------------------------------------------------------------------ local times
  // Year-first in the viewer's zone whatever their locale: 2026-05-01 14:03:07, never 05/01/2026.
  const parts = new Intl.DateTimeFormat("en-CA", { year: "numeric", month: "2-digit", day: "2-digit",
    hour: "2-digit", minute: "2-digit", second: "2-digit", hourCycle: "h23" });
  function fields(d) {
    const p = {};
    parts.formatToParts(d).forEach(function (x) { p[x.type] = x.value; });
    return p;
  }
  // Today's times show the time of day only; the full UTC instant is in the tooltip.
  const fmt = { format: function (d) {
    const p = fields(d), today = fields(new Date());
    const clock = p.hour + ":" + p.minute + ":" + p.second;
    return p.year === today.year && p.month === today.month && p.day === today.day ? clock
      : p.year + "-" + p.month + "-" + p.day + " " + clock;
  } };
  function localTimes(root) {
    root.querySelectorAll("time[datetime]").forEach(function (t) {
      const d = new Date(t.getAttribute("datetime"));
      if (!isNaN(d)) { t.textContent = fmt.format(d); t.title = t.getAttribute("datetime") + " (UTC)"; }
    });
  }
  const tz = document.getElementById("tz");
  if (tz) tz.textContent = Intl.DateTimeFormat().resolvedOptions().timeZone || "local time";
  localTimes(document);

  // ------------------------------------------------------------------ keyboard
  document.addEventListener("keydown", function (e) {
    const typing = /^(INPUT|SELECT|TEXTAREA)$/.test((e.target || {}).tagName || "");
    if (e.key === "/" && !typing) {
      const first = document.querySelector("form.filters input, form.filters select");
      if (first) { e.preventDefault(); first.focus(); }
    }
  });

  // ------------------------------------------------------------------ live status
  const live = document.getElementById("live");
  function status(kind, text) {
    if (!live) return;
    live.className = "live live-" + kind;
    live.querySelector(".text").textContent = text;
  }

  // ------------------------------------------------------------------ refreshable regions
  // An element with data-live-url is refetched (server-rendered HTML) when an event of a
  // kind in data-live-on arrives, at most once per data-live-min-ms.
  function Region(el) {
    this.el = el;
    this.url = el.dataset.liveUrl;
    this.kinds = (el.dataset.liveOn || "").split(/\s+/);
    this.job = el.dataset.liveJob || "";
    this.minMs = parseInt(el.dataset.liveMinMs || "1000", 10);
    this.last = 0; this.timer = null; this.busy = false; this.again = false;
  }
  Region.prototype.wants = function (batch) {
    if (!batch) return this.kinds.indexOf("tick") >= 0;
    if (this.job) {
      if (batch.jobs[this.job]) return true;
      for (const id in batch.transfers) { if (String(batch.transfers[id][1]) === this.job) return true; }
      return false;
    }
    return (this.kinds.indexOf("job") >= 0 && Object.keys(batch.jobs).length > 0) ||
      (this.kinds.indexOf("batch_job") >= 0 && Object.keys(batch.batch_jobs).length > 0) ||
      (this.kinds.indexOf("transfer") >= 0 && Object.keys(batch.transfers).length > 0);
  };
  Region.prototype.schedule = function () {
    if (this.timer) return;
    const wait = Math.max(0, this.last + this.minMs - Date.now());
    this.timer = setTimeout(this.run.bind(this), wait);
  };
  Region.prototype.run = function () {
    this.timer = null;
    if (this.busy) { this.again = true; return; }
    this.busy = true; this.last = Date.now();
    const self = this;
    fetch(this.url, { headers: { "x-fragment": "1" }, credentials: "same-origin" })
      .then(function (r) { if (!r.ok) throw new Error(r.status); return r.text(); })
      .then(function (html) {
        const focused = document.activeElement && self.el.contains(document.activeElement) ? document.activeElement.id : "";
        self.el.innerHTML = html;
        localTimes(self.el);
        if (focused && document.getElementById(focused)) document.getElementById(focused).focus();
      })
      .catch(function () { /* the next event retries */ })
      .finally(function () { self.busy = false; if (self.again) { self.again = false; self.schedule(); } });
  };
  const regions = Array.prototype.map.call(document.querySelectorAll("[data-live-url]"), function (el) { return new Region(el); });

  // ------------------------------------------------------------------ job rows
  function badge(state) {
    const style = styles[state] || ["?", "waiting"];
    const span = document.createElement("span");
    span.className = "badge s-" + style[1];
    span.dataset.state = state;
    const icon = document.createElement("span");
    icon.className = "icon"; icon.setAttribute("aria-hidden", "true"); icon.textContent = style[0];
    const label = document.createElement("span");
    label.className = "label"; label.textContent = state;
    span.append(icon, " ", label);
    return span;
  }
  function timeEl(iso) {
    const t = document.createElement("time");
    t.setAttribute("datetime", iso); t.textContent = iso;
    localTimes({ querySelectorAll: function () { return [t]; } });
    return t;
  }
  const table = document.querySelector("table.jobs tbody");
  const rows = new Map();
  function indexRows() {
    rows.clear();
    if (!table) return;
    table.querySelectorAll("tr[data-job-id]").forEach(function (tr) { rows.set(tr.dataset.jobId, tr); });
  }
  indexRows();
  const latest = new Map();  // job id -> newest {state, time} seen in the stream
  function showState(id, change) {
    const tr = rows.get(id);
    if (!tr) return;
    const cell = tr.querySelector("td.state");
    const current = cell.querySelector(".badge");
    if (current && current.dataset.state === change.state) return;
    cell.replaceChildren(badge(change.state));
    const changed = tr.querySelector("td.changed");
    if (changed && change.time) changed.replaceChildren(timeEl(change.time));
    tr.classList.remove("changed-now"); void tr.offsetWidth; tr.classList.add("changed-now");
    stats.seen[id + ":" + change.state] = Date.now();
  }
  let pendingNew = [];
  let fetchingNew = false;
  function fetchNewRows() {
    if (fetchingNew || !pendingNew.length || !table) return;
    const ids = pendingNew.splice(0, 500);
    fetchingNew = true;
    fetch(page.rows_url + (page.rows_url.indexOf("?") >= 0 ? "&" : "?") + "ids=" + ids.join(","),
      { headers: { "x-fragment": "1" }, credentials: "same-origin" })
      .then(function (r) { if (!r.ok) throw new Error(r.status); return r.text(); })
      .then(function (html) {
        const tmp = document.createElement("tbody");
        tmp.innerHTML = html;
        const fresh = Array.prototype.filter.call(tmp.querySelectorAll("tr[data-job-id]"),
          function (tr) { return !rows.has(tr.dataset.jobId); });
        fresh.sort(function (a, b) { return Number(b.dataset.jobId) - Number(a.dataset.jobId); });
        localTimes(tmp);
        table.prepend.apply(table, fresh);
        const empty = document.getElementById("no-rows");
        if (empty && fresh.length) empty.remove();
        while (table.rows.length > page.page_size) table.deleteRow(table.rows.length - 1);
        indexRows();
        fresh.forEach(function (tr) {
          const id = tr.dataset.jobId;
          const badgeEl = tr.querySelector(".badge");
          if (badgeEl) stats.seen[id + ":" + badgeEl.dataset.state] = Date.now();
          if (latest.has(id)) showState(id, latest.get(id));
        });
      })
      .catch(function () { /* shown on the next batch or reload */ })
      .finally(function () { fetchingNew = false; if (pendingNew.length) fetchNewRows(); });
  }

  // The count under the heading: loaded after the table is painted, refreshed on job events.
  const countEl = document.getElementById("match-count");
  const counter = countEl && page.count_url ? { last: 0, timer: null, busy: false } : null;
  function refreshCount() {
    if (!counter || counter.busy) return;
    counter.timer = null; counter.busy = true; counter.last = Date.now();
    fetch(page.count_url, { credentials: "same-origin" })
      .then(function (r) { return r.json(); })
      .then(function (d) {
        if (typeof d.count === "number") countEl.textContent = d.count.toLocaleString() + (d.count === 1 ? " job matches" : " jobs match");
        else if (d.error) countEl.textContent = d.error;
      })
      .catch(function () {})
      .finally(function () { counter.busy = false; });
  }
  if (counter && countEl.textContent.indexOf("counting") >= 0) refreshCount();
  function scheduleCount() {
    if (!counter || counter.timer) return;
    counter.timer = setTimeout(refreshCount, Math.max(0, counter.last + 2000 - Date.now()));
  }

  // ------------------------------------------------------------------ charts
  const chartsBox = document.getElementById("charts");
  const palette = ["#1f5fbf", "#c2410c", "#15803d", "#7e22ce", "#b91c1c", "#0e7490", "#a16207"];
  const dashes = [[], [8, 4], [2, 3], [12, 3, 3, 3], [6, 6]];
  const plots = [];
  function chartPanel(title) {
    const panel = document.createElement("figure");
    panel.className = "chart";
    const h = document.createElement("h3"); h.textContent = title;
    const plot = document.createElement("div"); plot.className = "plot";
    panel.append(h, plot);
    chartsBox.append(panel);
    return plot;
  }
  function lineChart(plot, chart, yLabel) {
    if (!chart.x.length || !chart.series.length) {
      const p = document.createElement("p"); p.className = "muted"; p.textContent = "Nothing in this window.";
      plot.append(p); return;
    }
    const opts = {
      width: Math.max(280, plot.clientWidth), height: Math.round(Math.min(420, Math.max(200, window.innerHeight * 0.28))),
      series: [{}].concat(chart.series.map(function (s, i) {
        return { label: s.label, stroke: palette[i % palette.length], width: 2, dash: dashes[i % dashes.length],
          points: { show: chart.x.length < 3 } };
      })),
      axes: [{}, { label: yLabel }],
      scales: { x: { time: true } },
    };
    const u = new window.uPlot(opts, [chart.x].concat(chart.series.map(function (s) { return s.values; })), plot);
    plots.push({ u: u, el: plot });
  }
  function fixed(v, digits) { return v === null || v === undefined ? "–" : Number(v).toFixed(digits); }
  function latencyTable(panel, d) {
    if (!d.latency.length) {
      const p = document.createElement("p"); p.className = "muted"; p.textContent = "No job finished in this window.";
      panel.append(p); return;
    }
    const t = document.createElement("table"); t.className = "grid compact latency";
    const head = t.createTHead().insertRow();
    ["Site"].concat(d.phases.map(function (p) { return p.replace("_", "-"); })).forEach(function (text) {
      const th = document.createElement("th"); th.scope = "col"; th.textContent = text; head.append(th);
    });
    const body = t.createTBody();
    d.latency.forEach(function (row) {
      const tr = body.insertRow();
      const th = document.createElement("th"); th.scope = "row"; th.textContent = row.site; tr.append(th);
      d.phases.forEach(function (phase) {
        const p = row.phases[phase] || {};
        const td = tr.insertCell(); td.className = "num";
        td.textContent = p.count ? fixed(p.p50, 2) + " / " + fixed(p.p99, 2) : "–";
      });
    });
    panel.append(t);
    const lines = Object.keys(d.summary).map(function (site) {
      const s = d.summary[site];
      return site + ": " + s.finished + " finished, " + fixed(s.throughput_per_minute, 2) + "/min, utilisation " +
        (s.utilisation === null ? "– (no pilot held nodes)" : Math.round(s.utilisation * 100) + "%");
    });
    const note = document.createElement("p"); note.className = "small muted";
    note.textContent = lines.join(" · ") + (d.truncated ? " (only the first events of the window were read)" : "");
    panel.append(note);
  }
  let chartsLast = 0, chartsTimer = null;
  function drawCharts() {
    chartsTimer = null; chartsLast = Date.now();
    fetch(chartsBox.dataset.url, { credentials: "same-origin" })
      .then(function (r) { return r.json(); })
      .then(function (d) {
        plots.splice(0).forEach(function (p) { p.u.destroy(); });
        chartsBox.replaceChildren();
        // All panels first: the grid settles their widths before a chart is sized to one.
        const jobs = chartPanel("Jobs finished per minute, by site");
        const nodes = chartPanel("Nodes: running jobs vs held by pilots (all sites)");
        const latency = chartPanel("Latency of finished jobs (seconds, p50 / p99)");
        latency.parentNode.classList.add("wide");
        lineChart(jobs, d.throughput, "jobs/min");
        lineChart(nodes, d.nodes, "nodes");
        latencyTable(latency, d);
      })
      .catch(function () { chartsBox.textContent = "The charts could not be loaded."; });
  }
  if (chartsBox && window.uPlot) {
    drawCharts();
    window.addEventListener("resize", function () {
      plots.forEach(function (p) { p.u.setSize({ width: Math.max(280, p.el.clientWidth), height: p.u.height }); });
    });
  }
  function scheduleCharts() {
    if (!chartsBox || chartsTimer) return;
    chartsTimer = setTimeout(drawCharts, Math.max(0, chartsLast + 10000 - Date.now()));
  }

  // ------------------------------------------------------------------ the stream
  function handle(batch) {
    stats.batches += 1; stats.events += batch.events; stats.cursor = batch.cursor;
    const ids = Object.keys(batch.jobs);
    ids.forEach(function (id) { latest.set(id, batch.jobs[id]); showState(id, batch.jobs[id]); });
    if (latest.size > 20000) latest.clear();
    if (page.live_new && batch.created.length) {
      batch.created.forEach(function (id) { if (!rows.has(String(id))) pendingNew.push(id); });
      fetchNewRows();
    }
    if (ids.length) { scheduleCount(); scheduleCharts(); }
    regions.forEach(function (r) { if (r.wants(batch)) r.schedule(); });
  }
  if (page.cursor !== undefined && window.EventSource) {
    status("wait", "connecting…");
    const source = new EventSource("/events?cursor=" + encodeURIComponent(page.cursor || ""));
    source.onopen = function () { stats.opened += 1; status("on", "live"); };
    source.onerror = function () {
      status(source.readyState === EventSource.CLOSED ? "off" : "wait",
        source.readyState === EventSource.CLOSED ? "not live: reload the page" : "reconnecting…");
    };
    source.onmessage = function (e) { handle(JSON.parse(e.data)); };
    source.addEventListener("tick", function () { regions.forEach(function (r) { if (r.wants(null)) r.schedule(); }); });
    source.addEventListener("failure", function (e) {
      source.close();
      status("off", "not live: " + JSON.parse(e.data).message);
    });
    window.addEventListener("pagehide", function () { source.close(); });
  }
})();
