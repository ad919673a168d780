// HomeFleet dashboard: reads the controller's JSON API and draws tables and SVG charts.
// No library and no network beyond this origin, so it works offline. Every piece of data
// reaches the DOM through textContent or setAttribute (never innerHTML): a device or
// model name cannot inject markup.
"use strict";

(() => {
  const SVG_NS = "http://www.w3.org/2000/svg";
  const COLORS = ["#2563eb", "#d97706", "#059669", "#7c3aed", "#db2777", "#0891b2", "#65a30d"];
  const WIDTH = 520;
  const HEIGHT = 200;
  const PAD = { left: 52, right: 14, top: 12, bottom: 26 };
  const BUCKETS = 60;
  const REFRESH_MS = 15000;
  const FLEET_PAGE = 200; // devices per page of the fleet table
  const CHARTS = [
    { kind: "p95", title: "p95 latency (ms)", value: "p95_ms", budget: "p95_budget_ms" },
    {
      kind: "energy",
      title: "energy per inference (mJ)",
      value: "energy_per_inference_mj",
      budget: "energy_budget_mj",
    },
  ];

  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function svgEl(tag, attrs, text) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  async function getJSON(url) {
    const response = await fetch(url, { headers: { Accept: "application/json" } });
    const body = await response.json();
    if (!response.ok) throw new Error(`${url}: ${body.error || response.status}`);
    return body;
  }

  function num(value) {
    if (value === null || value === undefined) return "—";
    const v = Number(value);
    const abs = Math.abs(v);
    if (abs >= 100) return v.toFixed(0);
    if (abs >= 10) return v.toFixed(1);
    if (abs >= 0.01 || abs === 0) return v.toFixed(2);
    return v.toPrecision(2);
  }

  function when(ms) {
    return ms ? new Date(ms).toLocaleString() : "—";
  }

  function clock(ms, spanMs) {
    const d = new Date(ms);
    const hm = d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    if (spanMs <= 86400000) return hm;
    return `${d.toLocaleDateString([], { month: "short", day: "numeric" })} ${hm}`;
  }

  // rows: arrays of cells; a cell is a value or {text, cls}.
  function fillTable(id, rows, emptyText, rowAttrs) {
    const body = document.querySelector(`#${id} tbody`);
    const columns = document.querySelectorAll(`#${id} thead th`).length;
    body.replaceChildren();
    if (rows.length === 0) {
      const tr = el("tr");
      tr.append(el("td", { colspan: columns, class: "empty" }, emptyText));
      body.append(tr);
      return;
    }
    rows.forEach((cells, i) => {
      const tr = el("tr", rowAttrs ? rowAttrs(i) : {});
      for (const cell of cells) {
        const isObj = cell !== null && typeof cell === "object";
        const td = el("td", isObj && cell.cls ? { class: cell.cls } : {}, isObj ? cell.text : cell);
        tr.append(td);
      }
      body.append(tr);
    });
  }

  function niceStep(raw) {
    const power = Math.pow(10, Math.floor(Math.log10(raw)));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * power >= raw) return m * power;
    return 10 * power;
  }

  function chart(spec, series, budget, range) {
    const figure = el("figure", { class: "chart", "data-chart": spec.kind });
    figure.append(el("figcaption", {}, spec.title));
    const svg = svgEl("svg", {
      width: WIDTH,
      height: HEIGHT,
      viewBox: `0 0 ${WIDTH} ${HEIGHT}`,
      role: "img",
      "aria-label": spec.title,
    });
    const plotW = WIDTH - PAD.left - PAD.right;
    const plotH = HEIGHT - PAD.top - PAD.bottom;
    const span = range.until_unix_ms - range.since_unix_ms;
    const values = [];
    for (const s of series) for (const p of s.points) if (p[spec.value] !== null) values.push(p[spec.value]);
    const top = Math.max(...values, budget || 0) * 1.15 || 1;
    const step = niceStep(top / 4);
    const yMax = Math.ceil(top / step) * step;
    const x = (t) => PAD.left + ((t - range.since_unix_ms) / span) * plotW;
    const y = (v) => PAD.top + plotH - (v / yMax) * plotH;

    for (let v = 0; v <= yMax + step / 2; v += step) {
      svg.append(svgEl("line", { class: "grid", x1: PAD.left, x2: WIDTH - PAD.right, y1: y(v), y2: y(v), stroke: "#e5e7eb" }));
      svg.append(svgEl("text", { x: PAD.left - 6, y: y(v) + 3, "text-anchor": "end" }, num(v)));
    }
    for (let i = 0; i <= 4; i++) {
      const t = range.since_unix_ms + (span * i) / 4;
      const anchor = i === 0 ? "start" : i === 4 ? "end" : "middle";
      svg.append(svgEl("text", { x: x(t), y: HEIGHT - 8, "text-anchor": anchor }, clock(t, span)));
    }
    svg.append(svgEl("line", { x1: PAD.left, x2: PAD.left, y1: PAD.top, y2: PAD.top + plotH, stroke: "#9ca3af" }));
    svg.append(svgEl("line", { x1: PAD.left, x2: WIDTH - PAD.right, y1: PAD.top + plotH, y2: PAD.top + plotH, stroke: "#9ca3af" }));

    series.forEach((s, i) => {
      const color = COLORS[i % COLORS.length];
      const points = s.points.filter((p) => p[spec.value] !== null);
      const coords = points.map((p) => [x(p.start_unix_ms + range.bucket_ms / 2), y(p[spec.value])]);
      const line = svgEl("polyline", {
        class: "series",
        "data-series": `${s.model} ${s.artifact_id}`,
        "data-points": coords.length,
        points: coords.map(([px, py]) => `${px.toFixed(1)},${py.toFixed(1)}`).join(" "),
        fill: "none",
        stroke: color,
        "stroke-width": 2,
      });
      svg.append(line);
      points.forEach((p, j) => {
        const over = budget !== null && p[spec.value] > budget;
        // over budget: a red ring around the series' own colour, so two artifacts'
        // points stay apart exactly where the comparison matters
        const dot = svgEl("circle", {
          class: over ? "dot over" : "dot",
          cx: coords[j][0],
          cy: coords[j][1],
          r: over ? 4 : 2.5,
          fill: color,
          stroke: over ? "#dc2626" : "none",
          "stroke-width": over ? 2 : 0,
        });
        const label = `${seriesLabel(s)} at ${when(p.start_unix_ms)}: ${num(p[spec.value])} (${p.count} inferences)`;
        dot.append(svgEl("title", {}, label));
        svg.append(dot);
      });
    });
    if (budget !== null) {
      svg.append(svgEl("line", {
        class: "budget",
        "data-budget": budget,
        x1: PAD.left,
        x2: WIDTH - PAD.right,
        y1: y(budget),
        y2: y(budget),
        stroke: "#dc2626",
        "stroke-dasharray": "6 4",
        "stroke-width": 1.5,
      }));
      svg.append(svgEl("text", { class: "budget-label", x: WIDTH - PAD.right - 2, y: y(budget) - 4, "text-anchor": "end", fill: "#dc2626" }, `budget ${num(budget)}`));
    }
    figure.append(svg);
    return figure;
  }

  // Artifact ids usually start with the model's name; say the model only when they do not.
  function seriesLabel(s) {
    return s.artifact_id.startsWith(`${s.model}/`) ? s.artifact_id : `${s.model} · ${s.artifact_id}`;
  }

  function renderCharts(classes, seriesList) {
    const byClass = new Map();
    for (const s of seriesList.series) {
      if (!byClass.has(s.device_class)) byClass.set(s.device_class, []);
      byClass.get(s.device_class).push(s);
    }
    const budgets = new Map(classes.classes.map((c) => [c.name, c]));
    const root = document.getElementById("charts");
    root.replaceChildren();
    if (seriesList.omitted_series > 0) {
      root.append(
        el(
          "p",
          { class: "hint", id: "series-omitted" },
          `${seriesList.omitted_series} quieter series not drawn: only the ` +
            `${seriesList.max_series} busiest in this range are`,
        ),
      );
    }
    const names = [...new Set([...byClass.keys(), ...budgets.keys()])].sort();
    for (const name of names) {
      const series = byClass.get(name) || [];
      const box = el("div", { class: "class-charts", "data-class": name });
      box.append(el("h3", {}, name));
      if (series.length === 0) {
        box.append(el("p", { class: "hint" }, "no telemetry in this range"));
        root.append(box);
        continue;
      }
      const row = el("div", { class: "chart-row" });
      const info = budgets.get(name);
      for (const spec of CHARTS) {
        const budget = info && info[spec.budget] !== undefined ? info[spec.budget] : null;
        row.append(chart(spec, series, budget, seriesList));
      }
      box.append(row);
      const legend = el("div", { class: "legend" });
      series.forEach((s, i) => {
        const item = el("span", { class: "legend-item" });
        const swatch = el("span", { class: "swatch" });
        swatch.style.background = COLORS[i % COLORS.length];
        item.append(swatch, document.createTextNode(seriesLabel(s)));
        legend.append(item);
      });
      box.append(legend);
      root.append(box);
    }
  }

  function summary(d) {
    const x = d.detail || {};
    switch (d.kind) {
      case "budget.miss":
        return `${x.artifact_id}: p95 ${num(x.p95_ms)} ms (budget ${num(x.p95_budget_ms)}), ` +
          `energy ${num(x.energy_mj)} mJ (budget ${num(x.energy_budget_mj)}) over ` +
          `${x.windows} windows, ${x.samples} inferences`;
      case "rollout.recompress":
        return `recompression job ${x.job_id}: relative speed ${num(x.relative_speed_before)} → ` +
          `${num(x.relative_speed_after)}, p95 target ${num(x.p95_target_ms)} ms`;
      case "rollout.canary": {
        const devices = Array.isArray(x.devices) ? x.devices : [];
        return `canary ${x.artifact_id} (baseline ${x.baseline_artifact_id}) on ` +
          `${devices.length} device(s): ${devices.join(", ")}`;
      }
      case "rollout.promote":
      case "rollout.rollback":
        return `${x.artifact_id}: canary p95 ${num(x.canary_p95_ms)} ms vs baseline ` +
          `${num(x.baseline_p95_ms)} ms (budget ${num(x.p95_budget_ms)}); ${x.reason || ""}`;
      case "rollout.failed":
        return x.reason || d.message;
      default:
        return d.message;
    }
  }

  const BAD_KINDS = new Set(["budget.miss", "rollout.rollback", "rollout.failed"]);

  function renderTables(fleet, classes, decisions) {
    fillTable(
      "classes",
      classes.classes.map((c) => [
        c.name,
        { text: c.devices, cls: "num" },
        { text: c.online, cls: "num" },
        { text: num(c.p95_budget_ms), cls: "num" },
        { text: num(c.energy_budget_mj), cls: "num" },
        c.declared ? c.description : "(not declared: no budgets)",
      ]),
      "no device classes",
    );
    const rollouts = decisions.rollouts;
    fillTable(
      "rollouts",
      rollouts.map((r) => [
        r.rollout_id,
        r.device_class,
        r.model,
        { text: r.state, cls: r.state === "promoted" ? "good" : r.state === "rolled back" || r.state === "failed" ? "bad" : "" },
        r.artifact_id,
        r.baseline_artifact_id,
        { text: num(r.baseline_p95_ms), cls: "num" },
        { text: num(r.canary_p95_ms), cls: "num" },
        { text: num(r.p95_budget_ms), cls: "num" },
        when(r.updated_unix_ms),
        r.reason,
      ]),
      "no rollouts yet",
      (i) => ({ "data-rollout": rollouts[i].rollout_id }),
    );
    const newestFirst = [...decisions.decisions].reverse();
    fillTable(
      "decisions",
      newestFirst.map((d) => [
        { text: d.id, cls: "num" },
        when(d.unix_ms),
        d.kind,
        (d.detail && d.detail.device_class) || "",
        (d.detail && d.detail.model) || "",
        summary(d),
      ]),
      "no decisions yet",
      (i) => ({
        "data-kind": newestFirst[i].kind,
        class: BAD_KINDS.has(newestFirst[i].kind) ? "miss" : "",
      }),
    );
    renderPager(fleet);
    const devices = fleet.devices;
    // A device behind its desired artifact is the news: "serving → desired", and the
    // last outcome when the update failed or was rolled back on the device.
    const stuck = (m) => m.desired_artifact_id && m.desired_artifact_id !== m.serving_artifact_id;
    const failed = (m) => m.last_outcome === "failed" || m.last_outcome === "rolled_back";
    const modelText = (m) =>
      `${m.model}: ${m.serving_artifact_id || "—"}` +
      (stuck(m) ? ` → ${m.desired_artifact_id}` : "") +
      (stuck(m) && m.last_outcome ? ` (${m.last_outcome.replace("_", " ")})` : "");
    fillTable(
      "fleet",
      devices.map((d) => [
        d.device_id,
        d.device_class,
        { text: d.online ? "online" : "offline", cls: d.online ? "good" : "" },
        when(d.last_seen_unix_ms),
        {
          text: d.models.map(modelText).join("; ") || "—",
          cls: d.models.some((m) => stuck(m) && failed(m)) ? "bad" : "",
        },
        d.agent_version || "—",
      ]),
      "no devices registered",
      (i) => ({ "data-device": devices[i].device_id }),
    );
  }

  // The fleet is paged by device id: the stack holds each shown page's "after" (the id
  // the page starts after), so "previous" goes back without the server keeping state.
  const fleetStarts = [""];
  let fleetNext = "";

  function renderPager(fleet) {
    fleetNext = fleet.next_after;
    const first = (fleetStarts.length - 1) * FLEET_PAGE;
    const shown = fleet.devices.length;
    document.getElementById("fleet-page").textContent = shown
      ? `devices ${first + 1}–${first + shown} of ${fleet.total}`
      : `${fleet.total} devices`;
    document.getElementById("fleet-prev").disabled = fleetStarts.length < 2;
    document.getElementById("fleet-next").disabled = !fleetNext;
  }

  function turnPage(forward) {
    if (forward && fleetNext) fleetStarts.push(fleetNext);
    else if (!forward && fleetStarts.length > 1) fleetStarts.pop();
    else return;
    refresh();
  }

  let busy = false;
  let again = false; // asked for while a refresh was in flight (a page turn): run once more

  async function refresh() {
    if (busy) {
      again = true;
      return;
    }
    busy = true;
    const status = document.getElementById("status");
    try {
      const range = Number(document.getElementById("range").value);
      const step = Math.ceil(range / BUCKETS);
      const until = Math.ceil(Date.now() / step) * step;
      const since = until - step * BUCKETS;
      const [fleet, classes, seriesList, decisions] = await Promise.all([
        getJSON(
          `/api/fleet?limit=${FLEET_PAGE}&after=${encodeURIComponent(fleetStarts[fleetStarts.length - 1])}`,
        ),
        getJSON("/api/classes"),
        getJSON(`/api/series?since=${since}&until=${until}&buckets=${BUCKETS}`),
        getJSON("/api/decisions"),
      ]);
      renderTables(fleet, classes, decisions);
      renderCharts(classes, seriesList);
      status.className = "";
      status.textContent = `updated ${new Date().toLocaleTimeString()}: ${fleet.total} ` +
        `devices, ${seriesList.series.length} series, ${decisions.decisions.length} decisions`;
      document.body.dataset.renders = String(Number(document.body.dataset.renders || 0) + 1);
    } catch (err) {
      status.className = "error";
      status.textContent = `cannot load: ${err.message}`;
      console.error("dashboard refresh failed:", err);
    } finally {
      busy = false;
      if (again) {
        again = false;
        refresh();
      }
    }
  }

  document.getElementById("range").addEventListener("change", refresh);
  document.getElementById("fleet-prev").addEventListener("click", () => turnPage(false));
  document.getElementById("fleet-next").addEventListener("click", () => turnPage(true));
  refresh();
  setInterval(refresh, REFRESH_MS);
})();
