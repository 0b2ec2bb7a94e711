// What the dashboard computes from two polls of /dashboard/data: sums over labels, rates and
// histogram quantiles, as PromQL's sum(), rate() and histogram_quantile() do. Pure functions
// (no DOM), so tests can run them in node: tests/unit/test_dashboard.py.
"use strict";

(function (root) {
  // Every sample of `name` whose labels include `match` ({label: value}).
  function samples(feed, name, match) {
    const rows = (feed && feed.metrics && feed.metrics[name]) || [];
    return rows.filter(([labels]) =>
      Object.entries(match || {}).every(([k, v]) => labels[k] === v));
  }

  // sum(name{match}); null when no sample matches (the metric is not exported yet).
  function total(feed, name, match) {
    const rows = samples(feed, name, match);
    if (!rows.length) return null;
    return rows.reduce((acc, [, v]) => acc + (Number.isFinite(v) ? v : 0), 0);
  }

  // A counter's increase between two polls. A counter that went down was reset (the service
  // restarted): its whole current value is the increase, as Prometheus counts it.
  function increase(before, after) {
    if (after === null || after === undefined) return null;
    if (before === null || before === undefined) return null;
    return after >= before ? after - before : after;
  }

  const key = (labels) => JSON.stringify(Object.entries(labels).sort());

  // Each series' increase between two polls, [[labels, increase], ...], as PromQL takes it:
  // per series (one series reset does not cancel another's counts), then summed. A series
  // absent from the earlier poll was created since: all of its value is new.
  function seriesIncrease(prev, cur, name, match) {
    const before = new Map(samples(prev, name, match).map(([l, v]) => [key(l), v]));
    return samples(cur, name, match)
      .filter(([, v]) => Number.isFinite(v))
      .map(([l, v]) => [l, increase(before.has(key(l)) ? before.get(key(l)) : 0, v)]);
  }

  // sum(increase(name{match})) between two polls; null when no series matches.
  function totalIncrease(prev, cur, name, match) {
    const rows = seriesIncrease(prev, cur, name, match);
    return rows.length ? rows.reduce((acc, [, v]) => acc + v, 0) : null;
  }

  // sum(rate(name{match})) between two polls, per second of the server's clock.
  function rate(prev, cur, name, match) {
    const dt = cur.now - prev.now;
    if (!(dt > 0)) return null;
    const inc = totalIncrease(prev, cur, name, match);
    return inc === null ? null : inc / dt;
  }

  // The increase of each bucket of histogram `name` between two polls, summed over every
  // label but `le`: [[upper bound, cumulative count], ...] sorted by bound.
  function bucketIncrease(prev, cur, name, match) {
    const m = new Map();
    for (const [labels, v] of seriesIncrease(prev, cur, name + "_bucket", match)) {
      const le = labels.le === "+Inf" ? Infinity : Number(labels.le);
      m.set(le, (m.get(le) || 0) + v);
    }
    return [...m.entries()].sort((a, b) => a[0] - b[0]);
  }

  // histogram_quantile(q, ...): linear inside the bucket the rank falls in; the lowest bucket
  // starts at 0; a rank in the +Inf bucket gives the highest finite bound. null without
  // observations.
  function histogramQuantile(q, buckets) {
    if (!buckets.length) return null;
    const count = buckets[buckets.length - 1][1];
    if (!(count > 0)) return null;
    const rank = q * count;
    let prevLe = 0;
    let prevCount = 0;
    for (const [le, c] of buckets) {
      if (c >= rank) {
        if (le === Infinity) return prevLe;
        if (c === prevCount) return le;
        return prevLe + (le - prevLe) * (rank - prevCount) / (c - prevCount);
      }
      prevLe = le;
      prevCount = c;
    }
    return prevLe;
  }

  // part / whole of two increases; null when nothing happened in between.
  function share(part, whole) {
    if (part === null || whole === null || !(whole > 0)) return null;
    return part / whole;
  }

  const api = { samples, total, increase, seriesIncrease, totalIncrease, rate, bucketIncrease,
                histogramQuantile, share };
  if (typeof module !== "undefined" && module.exports) module.exports = api;
  else root.DashMath = api;
})(this);
