// The live dashboard: polls /dashboard/data, derives rates and quantiles between two polls
// (dashboard-math.js) and draws them with uPlot. Panels whose data the service does not have
// say so instead of drawing anything. The <body>'s data-ready turns "1" once a chart has
// received data (the browser test waits for it); data-polls and data-errors count polls.
"use strict";

(function () {
  const M = window.DashMath;
  const main = document.getElementById("panels");
  const FEED = main.dataset.feed;
  const POLL_MS = Number(main.dataset.pollMs) || 1000;
  const WINDOW_S = Number(main.dataset.windowS) || 600;
  // Rates and quantiles over the last RATE_S seconds (PromQL's rate(x[5s])): between two
  // consecutive polls a p99 rests on a few dozen requests and jumps about.
  const RATE_S = Number(main.dataset.rateS) || 5;
  const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2"];
  const SCORE = { route: "/v1/score" };
  // The service never sees the truth behind a click; the simulator of `ctrloop stack` does and
  // writes it to a file the service reads (CTRLOOP_SIM_STATUS_FILE). `ctrloop drive` does not.
  const NO_SIM = "Needs the simulator's status, which ctrloop stack writes: the service " +
    "itself never sees the truth behind a click.";
  const EVENTS = { route: "/v1/events" };

  // ------------------------------------------------------------------ formatting

  function fmt(x, digits) {
    if (x === null || x === undefined || !Number.isFinite(x)) return "–";
    return x.toLocaleString(undefined, { maximumFractionDigits: digits === undefined ? 2 : digits });
  }
  const pct = (x, d) => (x === null || x === undefined || !Number.isFinite(x) ? "–" : fmt(100 * x, d === undefined ? 2 : d) + "%");
  const ms = (s) => (s === null ? "–" : fmt(1000 * s, 1) + " ms");

  function ago(seconds) {
    if (!Number.isFinite(seconds)) return "–";
    if (seconds < 90) return fmt(seconds, 1) + " s";
    if (seconds < 5400) return fmt(seconds / 60, 1) + " min";
    return fmt(seconds / 3600, 1) + " h";
  }

  function node(tag, attrs, text) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    return e;
  }

  // ------------------------------------------------------------------ panels

  // A panel: a title, a note saying where its numbers come from (or why it is empty), a row
  // of current values and a chart. `series`: [{label, scale, fmt, points}].
  class Panel {
    constructor(id, title, note, series, opts) {
      this.id = id;
      this.series = series;
      this.opts = opts || {};
      this.section = node("section", { id: id, "data-has-data": "0" });
      this.section.append(node("h2", {}, title));
      this.note = node("p", { class: "note" }, note);
      this.values = node("dl", { class: "values" });
      this.box = node("div", { class: "chart" });
      this.section.append(this.note, this.values, this.box);
      main.append(this.section);
      this.x = [];
      this.ys = series.map(() => []);
      this.plot = null;
    }

    setNote(text) { this.note.textContent = text; }

    // The current values row: [[key, label, value, text]].
    show(items) {
      this.values.replaceChildren();
      for (const [key, label, value, text] of items) {
        this.values.append(node("dt", {}, label));
        const dd = node("dd", { "data-key": key }, text);
        if (value !== null && value !== undefined && Number.isFinite(value)) dd.dataset.value = String(value);
        this.values.append(dd);
      }
    }

    // Append one point per series at time t (seconds), keeping the last WINDOW_S.
    push(t, values) {
      this.x.push(t);
      values.forEach((v, i) => this.ys[i].push(v === undefined ? null : v));
      while (this.x.length && this.x[0] < t - WINDOW_S) {
        this.x.shift();
        this.ys.forEach((y) => y.shift());
      }
      this.draw();
    }

    // One point per named series, for series that come and go (one per embedding field): a
    // new name starts with gaps, and the chart is rebuilt with the new set.
    pushNamed(t, named) {
      const labels = [...named.keys()].sort();
      const current = this.series.map((s) => s.label);
      if (labels.join("\n") !== current.join("\n")) {
        const old = new Map(current.map((l, i) => [l, this.ys[i]]));
        this.series = labels.map((l) => ({ label: l, axis: this.opts.axis }));
        this.ys = labels.map((l) => old.get(l) || this.x.map(() => null));
        if (this.plot) {
          this.plot.destroy();
          this.plot = null;
        }
      }
      this.push(t, labels.map((l) => named.get(l)));
    }

    // Replace the whole history (the simulator's status carries its own).
    replace(xs, ys) {
      this.x = xs;
      this.ys = ys;
      this.draw();
    }

    draw() {
      const any = this.ys.some((y) => y.some((v) => v !== null && Number.isFinite(v)));
      if (any) this.section.dataset.hasData = "1";
      const data = [this.x, ...this.ys];
      if (this.plot) {
        this.plot.setData(data);
        return;
      }
      if (!any) return;
      this.plot = new uPlot(this.options(), data, this.box);
    }

    options() {
      const scales = { x: { time: true } };
      const axes = [{}];
      const seen = [];
      for (const s of this.series) {
        const scale = s.scale || "y";
        if (seen.includes(scale)) continue;
        seen.push(scale);
        scales[scale] = s.range ? { range: s.range } : {};
        axes.push({ scale: scale, side: seen.length === 1 ? 3 : 1, size: 60,
                    grid: { show: seen.length === 1 },
                    values: (u, ticks) => ticks.map((v) => (s.axis || fmt)(v)) });
      }
      return {
        width: Math.max(this.box.clientWidth, 300), height: 210,
        scales: scales, axes: axes, legend: { live: false },
        cursor: { drag: { x: false, y: false } },
        series: [{}, ...this.series.map((s, i) => ({
          label: s.label, scale: s.scale || "y", stroke: s.color || COLORS[i % COLORS.length],
          width: 2, spanGaps: !s.points,
          paths: s.points ? () => null : s.stepped ? uPlot.paths.stepped({ align: 1 }) : undefined,
          points: s.points ? { show: true, size: 7, fill: s.color || COLORS[i % COLORS.length] } : { show: false },
        }))],
      };
    }

    resize() {
      if (this.plot) this.plot.setSize({ width: Math.max(this.box.clientWidth, 300), height: 210 });
    }
  }

  const panels = {
    traffic: new Panel("traffic", "Requests per second",
      "Answered requests by route, and 4xx/5xx answers of either, from ctrloop_requests_total.",
      [{ label: "/v1/score" }, { label: "/v1/events" }, { label: "4xx + 5xx" }]),
    latency: new Panel("latency", "/v1/score latency",
      "p50 and p99 of the handler's time over the last 5 s (ctrloop_request_seconds: the " +
      "service's own time, not the queueing in front of it).",
      [{ label: "p50", axis: (v) => fmt(1000 * v, 1) + " ms" }, { label: "p99" }]),
    model: new Panel("model", "Served model",
      "The highest registry version any worker serves (ctrloop_model_version); the dots are " +
      "publish→serve lags: how long after its publication a worker swapped a version in " +
      "(seen on the worker that answered the poll).",
      [{ label: "version", stepped: true, axis: (v) => "v" + fmt(v, 0) },
       { label: "publish→serve lag (s)", scale: "lag", points: true, axis: (v) => fmt(v, 1) + " s" }]),
    ctr: new Panel("ctr", "CTR served vs oracle and random",
      NO_SIM,
      [{ label: "served", axis: (v) => pct(v, 1) }, { label: "oracle" }, { label: "random" }]),
    calibration: new Panel("calibration", "Calibration of the served pCTR",
      NO_SIM,
      [{ label: "mean served pCTR", axis: (v) => pct(v, 1) }, { label: "true CTR of the shown ads" },
       { label: "realised so far" }]),
    auc: new Panel("auc", "AUC of the served pCTR on fresh traffic",
      NO_SIM,
      [{ label: "vs ad appeal", range: [0.4, 1] }, { label: "vs true CTR" },
       { label: "ceiling (the truth's own)" }]),
    explore: new Panel("explore", "Exploration",
      "Share of score requests answered with a Thompson-sampled ranking " +
      "(ctrloop_explore_decisions_total), and its mean cost per explored request " +
      "(ctrloop_explore_cost: 1 − value of the explored top k / the greedy top k).",
      [{ label: "explored share", axis: (v) => pct(v, 1) }, { label: "mean cost" }]),
    losses: new Panel("losses", "Dead letters and losses",
      "Cumulative counts: messages the trainer dead-lettered (as of the served model's record), " +
      "impressions the service could not log, events refused (4xx) and event batches answered " +
      "503 (Kafka down).",
      [{ label: "trainer dead-lettered", axis: (v) => fmt(v, 0) }, { label: "impressions lost" },
       { label: "events rejected" }, { label: "event batches 503" }]),
  };

  // Information Abundance per field: a chart over time and a table of the latest values.
  panels.ia = new Panel("ia", "Information Abundance per embedding field",
    "None yet: no served model's record carries the trainer's collapse report.",
    [], { axis: (v) => fmt(v, 1) });
  const iaTable = node("table", { class: "ia" });
  const iaBox = node("div", { class: "scroll short" });
  iaBox.append(iaTable);
  panels.ia.section.classList.add("wide");
  panels.ia.section.append(iaBox);

  // The delay report: a table (one row per advertiser), not a chart.
  const delays = node("section", { id: "delays", class: "wide", "data-has-data": "0" });
  delays.append(node("h2", {}, "Conversion delays and pCVR (the delay report)"));
  const delayNote = node("p", { class: "note" },
    "Per advertiser, from the served pCVR head's record (ctrloop_delay_*, ctrloop_cvr_*, " +
    "ctrloop_pcvr_calibration). None yet: no served model carries a delay report.");
  const delayTable = node("table");
  const delayBox = node("div", { class: "scroll" });
  delayBox.append(delayTable);
  delays.append(delayNote, delayBox);
  main.append(delays);

  window.addEventListener("resize", () => Object.values(panels).forEach((p) => p.resize()));

  // ------------------------------------------------------------------ one poll

  let feeds = []; // the polls of the last RATE_S seconds, oldest first
  const swaps = new Map(); // "pid/version" -> lag seen already (one dot per worker's swap)
  const status = document.getElementById("status");

  // The poll to take differences from: the newest at least RATE_S old, else the oldest.
  function base(cur) {
    feeds.push(cur);
    let k = 0;
    while (k + 1 < feeds.length - 1 && cur.now - feeds[k + 1].now >= RATE_S) k += 1;
    feeds = feeds.slice(k);
    return feeds.length > 1 ? feeds[0] : null;
  }

  function update(cur) {
    const t = cur.now;
    const v = (name, match) => M.total(cur, name, match);
    const prev = base(cur);
    if (prev) {
      const errors = ["4xx", "5xx"].reduce((acc, c) => acc + (M.rate(prev, cur, "ctrloop_requests_total", { status: c }) || 0), 0);
      const score = M.rate(prev, cur, "ctrloop_requests_total", SCORE);
      const events = M.rate(prev, cur, "ctrloop_requests_total", EVENTS);
      panels.traffic.push(t, [score, events, errors]);
      panels.traffic.show([["score_rps", "/v1/score", score, fmt(score, 1) + " /s"],
                           ["events_rps", "/v1/events", events, fmt(events, 1) + " /s"],
                           ["error_rps", "4xx + 5xx", errors, fmt(errors, 2) + " /s"]]);

      const buckets = M.bucketIncrease(prev, cur, "ctrloop_request_seconds", SCORE);
      const p50 = M.histogramQuantile(0.5, buckets);
      const p99 = M.histogramQuantile(0.99, buckets);
      panels.latency.push(t, [p50, p99]);
      panels.latency.show([["p50_s", "p50", p50, ms(p50)], ["p99_s", "p99", p99, ms(p99)]]);

      const inc = (name, match) => M.totalIncrease(prev, cur, name, match);
      const decided = inc("ctrloop_explore_decisions_total");
      const explored = inc("ctrloop_explore_decisions_total", { decision: "explored" });
      const costSum = inc("ctrloop_explore_cost_sum");
      const costN = inc("ctrloop_explore_cost_count");
      const sh = M.share(explored === null ? 0 : explored, decided);
      const cost = M.share(costSum, costN);
      panels.explore.push(t, [sh, cost]);
      const why = M.samples(cur, "ctrloop_explore_decisions_total")
        .filter(([l, n]) => l.decision !== "explored" && n > 0)
        .map(([l, n]) => l.decision + " " + fmt(n, 0)).join(", ");
      panels.explore.show([["explore_share", "explored", sh, pct(sh, 1)],
                           ["explore_cost", "mean cost", cost, pct(cost, 2)],
                           ["explore_cost_avg", "running avg cost", v("ctrloop_explore_cost_running_avg"),
                            pct(v("ctrloop_explore_cost_running_avg"), 2)],
                           ["explore_not", "not explored (total)", null, why || "–"]]);
    }

    const version = v("ctrloop_model_version");
    const w = cur.worker || {};
    let lag = null;
    if (w.published_at && w.loaded_at) {
      const key = w.pid + "/" + w.version;
      if (!swaps.has(key)) {
        lag = w.loaded_at - w.published_at;
        swaps.set(key, lag);
      }
    }
    panels.model.push(t, [version, lag]);
    const published = v("ctrloop_model_published_timestamp_seconds");
    const lags = [...swaps.values()];
    const lastLag = lags.length ? lags[lags.length - 1] : null;
    panels.model.show([["version", "version", version, version ? "v" + fmt(version, 0) : "prior"],
                       ["samples", "samples seen", v("ctrloop_model_samples_seen"), fmt(v("ctrloop_model_samples_seen"), 0)],
                       ["model_age_s", "published", published ? t - published : null, published ? ago(t - published) + " ago" : "–"],
                       ["lag_s", "last publish→serve lag", lastLag, lastLag === null ? "–" : fmt(lastLag, 2) + " s"],
                       ["reloads", "swaps (all workers)", v("ctrloop_model_reloads_total"), fmt(v("ctrloop_model_reloads_total"), 0)]]);

    const losses = [v("ctrloop_trainer_dead_lettered"), v("ctrloop_impressions_log_failed_total"),
                    v("ctrloop_events_rejected_total"), v("ctrloop_events_unavailable_total")];
    panels.losses.push(t, losses);
    panels.losses.show(losses.map((x, i) => [["dead_lettered", "lost", "rejected", "unavailable"][i],
                                             panels.losses.series[i].label, x, fmt(x, 0)]));

    updateDelays(cur);
    updateIA(cur, t);
    updateSim(cur.sim, cur.sim_expected);
    const kafka = v("ctrloop_kafka_available");
    status.textContent = [
      version ? "serving v" + fmt(version, 0) + " (" + (w.status || "?") + ")" : "serving the prior (no trained model yet)",
      "Kafka " + (kafka === null ? "?" : kafka >= 1 ? "up" : "DOWN"),
      "answered by pid " + w.pid,
      "updated " + new Date(1000 * t).toLocaleTimeString(),
    ].join(" · ");
    status.classList.toggle("bad", kafka === 0);
  }

  // ------------------------------------------------------------------ delay report

  const DELAY_COLUMNS = [
    ["ctrloop_delay_wait_seconds", "wait", (x) => ago(x)],
    ["ctrloop_delay_clicks_recent", "clicks (decayed)", (x) => fmt(x, 0)],
    ["ctrloop_delay_window_reports", "reports", (x) => fmt(x, 0)],
    ["ctrloop_delay_dispersion_shrunk", "dispersion", (x) => fmt(x, 2)],
    ["ctrloop_cvr_observed", "CVR recent", (x) => pct(x, 2)],
    ["ctrloop_cvr_history", "CVR history", (x) => pct(x, 2)],
    ["ctrloop_pcvr_calibration", "pCVR / conversions", (x) => fmt(x, 3)],
  ];

  function updateDelays(cur) {
    const rows = new Map();
    for (const [name] of DELAY_COLUMNS) {
      for (const [l, x] of M.samples(cur, name)) {
        const key = l.conversion_type + "\u0000" + l.advertiser;
        if (!rows.has(key)) rows.set(key, { type: l.conversion_type, adv: l.advertiser });
        rows.get(key)[name] = x;
      }
    }
    if (!rows.size) return;
    delays.dataset.hasData = "1";
    delayNote.textContent = "Per advertiser, from the served pCVR head's record (ctrloop_delay_*, " +
      "ctrloop_cvr_*, ctrloop_pcvr_calibration, as the answering worker serves it).";
    const head = node("tr");
    for (const h of ["conversion type", "advertiser", ...DELAY_COLUMNS.map((c) => c[1])]) head.append(node("th", {}, h));
    const body = [head];
    for (const r of rows.values()) {
      const tr = node("tr");
      tr.append(node("td", {}, r.type), node("td", {}, r.adv));
      for (const [name, , f] of DELAY_COLUMNS) tr.append(node("td", {}, r[name] === undefined ? "–" : f(r[name])));
      body.push(tr);
    }
    delayTable.replaceChildren(...body);
  }

  // ------------------------------------------------------------------ collapse

  function updateIA(cur, t) {
    const rows = new Map();
    for (const [l, x] of M.samples(cur, "ctrloop_model_information_abundance")) {
      rows.set(l.head + "/" + l.table + "/" + l.field, { head: l.head, table: l.table, field: l.field, ia: x });
    }
    for (const [l, x] of M.samples(cur, "ctrloop_model_embedding_rows_trained")) {
      const r = rows.get(l.head + "/" + l.table + "/" + l.field);
      if (r) r.rows = x;
    }
    // Over time, per head, the lowest and the median field (a line per field is a tangle of
    // dozens); the table below has every field.
    // A field without trained rows has no spectrum (the record says IA 0): left out.
    const perHead = new Map();
    for (const r of rows.values()) {
      if (!(r.rows > 0)) continue;
      if (!perHead.has(r.head)) perHead.set(r.head, []);
      perHead.get(r.head).push(r.ia);
    }
    const lines = new Map();
    for (const [head, values] of perHead) {
      values.sort((a, b) => a - b);
      const mid = values.length >> 1;
      lines.set(head + " lowest field", values[0]);
      lines.set(head + " median field", values.length % 2 ? values[mid] : (values[mid - 1] + values[mid]) / 2);
    }
    panels.ia.pushNamed(t, lines);
    if (!rows.size) return;
    panels.ia.setNote("Information Abundance (sum of singular values / the largest) of each field's " +
      "trained embedding rows in the served model (ctrloop_model_information_abundance, as the " +
      "answering worker serves it): per head, the lowest and the median field over time, and " +
      "every field now. Falling toward 1: the field's embeddings collapse onto fewer directions; " +
      "a field with few trained rows has a low ceiling whatever its health.");
    const rank = (r) => (r.rows > 0 ? r.ia : Infinity); // untrained fields last
    const sorted = [...rows.values()].sort((a, b) => a.head.localeCompare(b.head) || rank(a) - rank(b));
    const top = Math.max(...sorted.map((r) => r.ia), 1);
    const head = node("tr");
    for (const h of ["head", "table", "field", "IA", "rows trained", ""]) head.append(node("th", {}, h));
    const body = [head];
    for (const r of sorted) {
      const tr = node("tr");
      const width = r.rows > 0 ? (100 * r.ia / top).toFixed(1) : "0";
      const bar = node("span", { class: "bar", style: "width:" + width + "%" });
      const cell = node("td", { class: "barcell" });
      cell.append(bar);
      tr.append(node("td", {}, r.head), node("td", {}, r.table), node("td", {}, r.field),
                node("td", {}, r.rows > 0 ? fmt(r.ia, 2) : "no trained rows"),
                node("td", {}, fmt(r.rows, 0)), cell);
      body.push(tr);
    }
    iaTable.replaceChildren(...body);
  }

  // ------------------------------------------------------------------ the simulator's status

  let simWritten = null;

  function updateSim(sim, expected) {
    if (!sim) {
      if (expected) {
        [panels.ctr, panels.calibration, panels.auc].forEach((p) => p.setNote(
          "Waiting for the simulator's first status (ctrloop stack writes it every 5 s)."));
      }
      return;
    }
    if (sim.error) {
      [panels.ctr, panels.calibration, panels.auc].forEach((p) => p.setNote("The simulator's status: " + sim.error));
      return;
    }
    const s = sim.status;
    const stale = sim.age_s > 30 ? " Stale: written " + ago(sim.age_s) + " ago (has the stack stopped?)" : "";
    panels.ctr.setNote("From the simulator driving this service (" + (s.source || "ctrloop stack") +
      "): the expected CTR of the ads served in each full " + s.bucket_s + " s bucket (their true CTR at " +
      "the shown position, without the click draw's noise), the best ads' and a random order's." + stale);
    panels.calibration.setNote("Per " + s.bucket_s + " s bucket: the mean pCTR the service served vs the " +
      "true CTR of those ads at their positions (the simulator knows it), and the realised CTR " +
      "(clicks arrived so far: recent buckets still wait for late clicks)." + stale);
    panels.auc.setNote("AUC of the served pCTR over the last " + s.fresh_window_s + " s of trained-model " +
      "impressions, against each ad's appeal (its CTR at position 1: the ranking's quality) and " +
      "against the true CTR at the shown position; the ceiling is the truth's own AUC." + stale);
    if (s.written_at === simWritten) return;
    simWritten = s.written_at;
    const elapsed = s.written_at - s.started_at;
    const full = (s.timeline || []).filter((b) => b.start_s + s.bucket_s <= elapsed && b.impressions > 0);
    const xs = full.map((b) => s.started_at + b.start_s + s.bucket_s);
    const col = (k) => full.map((b) => (b[k] === null ? null : b[k]));
    panels.ctr.replace(xs, [col("expected_ctr"), col("oracle_ctr"), col("random_ctr")]);
    panels.calibration.replace(xs, [col("mean_pctr"), col("expected_ctr"), col("realised_ctr")]);
    const last = full.slice(-3);
    const sum = (k) => last.reduce((a, b) => a + (b[k] || 0) * b.impressions, 0);
    const calib = M.share(sum("mean_pctr"), sum("expected_ctr"));
    const lb = full.length ? full[full.length - 1] : {};
    panels.ctr.show([["ctr_served", "served", lb.expected_ctr, pct(lb.expected_ctr)],
                     ["ctr_oracle", "oracle", lb.oracle_ctr, pct(lb.oracle_ctr)],
                     ["ctr_random", "random", lb.random_ctr, pct(lb.random_ctr)]]);
    panels.calibration.show([["calibration", "pCTR / true CTR, last " + last.length + " buckets", calib, fmt(calib, 3)],
                             ["realised_ctr", "realised CTR, whole run", s.snapshot && s.snapshot.realised_ctr,
                              pct(s.snapshot && s.snapshot.realised_ctr)]]);
    const fresh = s.fresh_auc || [];
    panels.auc.replace(fresh.map((r) => r.t), [fresh.map((r) => r.auc_ad_appeal), fresh.map((r) => r.auc_true_ctr),
                                             fresh.map((r) => r.oracle_auc_true_ctr)]);
    const lf = fresh.length ? fresh[fresh.length - 1] : {};
    panels.auc.show([["auc_ad_appeal", "vs ad appeal", lf.auc_ad_appeal, fmt(lf.auc_ad_appeal, 3)],
                     ["auc_true_ctr", "vs true CTR", lf.auc_true_ctr, fmt(lf.auc_true_ctr, 3)],
                     ["auc_n", "impressions", lf.n, fmt(lf.n, 0)]]);
  }

  // ------------------------------------------------------------------ polling

  async function poll() {
    try {
      const resp = await fetch(FEED, { cache: "no-store" });
      if (!resp.ok) throw new Error(FEED + " answered " + resp.status);
      const cur = await resp.json();
      update(cur);
      document.body.dataset.polls = String(Number(document.body.dataset.polls) + 1);
      if (panels.traffic.section.dataset.hasData === "1") document.body.dataset.ready = "1";
      status.classList.remove("down");
    } catch (e) {
      document.body.dataset.errors = String(Number(document.body.dataset.errors) + 1);
      status.textContent = "cannot reach the service (" + e.message + "); retrying";
      status.classList.add("down");
    }
    setTimeout(poll, POLL_MS);
  }

  poll();
})();
