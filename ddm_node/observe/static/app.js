// ddm-node dashboard: polls /api/swarm and renders it. Every peer-supplied string goes through textContent.
"use strict";

const COLORS = ["#39c5cf", "#a371f7", "#3fb950", "#d29922", "#58a6ff", "#f778ba", "#ffa657", "#7ee787",
                "#79c0ff", "#d2a8ff", "#56d4dd", "#e3b341"];
let last = null;        // the newest document
let lastOk = null;      // when (browser clock) it arrived
let timer = null;

function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") e.className = v; else if (k === "text") e.textContent = v; else e.setAttribute(k, v);
  }
  for (const k of kids) if (k !== null && k !== undefined) e.append(k);
  return e;
}
const $ = (id) => document.getElementById(id);
const short = (s, n = 8) => (s ? String(s).slice(-n) : "-");
const head = (s, n = 8) => (s ? String(s).slice(0, n) : "-");
const num = (v, d = 0) => (v === null || v === undefined ? "-" : Number(v).toLocaleString(undefined,
  { minimumFractionDigits: d, maximumFractionDigits: d }));

function duration(s) {
  if (s === null || s === undefined) return "-";
  s = Math.round(s);
  if (s < 60) return s + "s";
  if (s < 3600) return Math.floor(s / 60) + "m" + String(s % 60).padStart(2, "0") + "s";
  if (s < 86400) return Math.floor(s / 3600) + "h" + String(Math.floor(s % 3600 / 60)).padStart(2, "0") + "m";
  return Math.floor(s / 86400) + "d" + String(Math.floor(s % 86400 / 3600)).padStart(2, "0") + "h";
}
function bytes(n) {
  if (!n) return "0 B";
  const u = ["B", "KiB", "MiB", "GiB", "TiB"]; let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return n.toFixed(i ? 1 : 0) + " " + u[i];
}
const clock = (t) => new Date(t * 1000).toLocaleTimeString([], { hour12: false });

// ------------------------------------------------------------------------------------------ header and cards
function renderHeader(doc) {
  const run = doc.run;
  $("run-line").textContent = run
    ? `run ${head(run.run_id, 16)} · ${run.dataset} · ${run.num_shards} shards × ${num(run.target)} steps`
    : "waiting for the run's plan…";
  const n = doc.node || {};
  const who = n.mode === "client" ? "dashboard client" : `island ${short(n.peer_id)}`;
  $("node-line").textContent = `${who} · ${n.phase || "-"} · v${n.version || "?"}`;
  $("interval").textContent = doc.interval;
}

function health(doc) {
  const age = doc.updated ? doc.now - doc.updated : null;
  if (lastOk && Date.now() / 1000 - lastOk > doc.stale_after)
    return ["down", "node unreachable", `The node stopped answering at ${clock(lastOk)}; the data below is from then.`];
  if (age === null) return ["wait", "starting", doc.error ? `Waiting for the first DHT read: ${doc.error}` : null];
  if (age > doc.stale_after)
    return ["stale", "stale", `Last successful DHT read ${duration(age)} ago${doc.error ? ": " + doc.error : ""}.`];
  return ["live", "live", null];
}

function renderHealth(doc) {
  const [kind, label, message] = health(doc);
  const pill = $("health");
  pill.className = "pill pill-" + kind;
  pill.textContent = label;
  const banner = $("banner");
  banner.hidden = !message;
  banner.className = "banner" + (kind === "down" ? " bad" : "");
  banner.textContent = message || "";
  document.body.dataset.health = kind;
}

function card(k, v, d) { return el("div", { class: "card" }, el("div", { class: "k", text: k }),
  el("div", { class: "v", text: v }), el("div", { class: "d", text: d || "" })); }

function renderCards(doc) {
  const shards = doc.shards, target = doc.run ? doc.run.target : 0;
  const done = shards.filter((s) => s.state === "done").length;
  const training = shards.filter((s) => s.state === "training");
  const steps = shards.reduce((a, s) => a + Math.min(s.step || 0, target), 0);
  const pct = shards.length && target ? (100 * steps / (shards.length * target)) : 0;
  const rate = training.reduce((a, s) => a + (s.images_per_s || 0), 0);
  const etas = training.map((s) => s.eta_s).filter((v) => v !== null && v !== undefined);
  const live = doc.peers.filter((p) => !p.silent).length, silent = doc.peers.length - live;
  const kids = [
    card("progress", pct.toFixed(1) + "%", `${num(steps)} of ${num(shards.length * target)} steps`),
    card("shards", `${done} / ${shards.length}`, `done · ${training.length} training`),
    card("throughput", num(rate), "images/s, all trainers"),
    card("ETA", etas.length ? duration(Math.max(...etas)) : "-", "slowest training shard"),
    card("peers", String(live), silent ? `${silent} silent` : "all heartbeating"),
  ];
  const n = doc.node || {};
  if (n.mode === "island")
    kids.push(card("this island", `${n.checkpoints_published || 0} ckpt`,
      `served ${bytes(n.bytes_served)} · fetched ${bytes(n.bytes_fetched)}`));
  $("cards").replaceChildren(...kids);
  const warn = $("cards").lastChild;
  if (silent && warn) $("cards").children[4].querySelector(".d").className = "d warn";
}

// ------------------------------------------------------------------------------------------ shards
function spark(points, color) {
  const w = 110, h = 26, svgNS = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(svgNS, "svg");
  svg.setAttribute("class", "spark"); svg.setAttribute("width", w); svg.setAttribute("height", h);
  if (!points || points.length < 2) return svg;
  const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
  const d = points.map((p, i) => `${i ? "L" : "M"}${(2 + (w - 4) * (p[0] - x0) / Math.max(x1 - x0, 1)).toFixed(1)},` +
    `${(2 + (h - 4) * (1 - (p[1] - y0) / Math.max(y1 - y0, 1e-9))).toFixed(1)}`).join("");
  const path = document.createElementNS(svgNS, "path");
  path.setAttribute("d", d); path.setAttribute("fill", "none"); path.setAttribute("stroke", color);
  path.setAttribute("stroke-width", "1.6");
  svg.append(path);
  return svg;
}

function bar(step, target, cls) {
  const pct = target ? Math.min(100, 100 * (step || 0) / target) : 0;
  const b = el("div", { class: "bar " + cls }, el("i"), el("span", { text: `${num(step)} / ${num(target)}` }));
  b.firstChild.style.width = pct.toFixed(1) + "%";
  return b;
}

function renderShards(doc) {
  const me = doc.node && doc.node.public_key;
  const rows = doc.shards.map((s) => {
    const color = COLORS[s.shard % COLORS.length];
    const ownerCell = el("td", { class: "mono" }, s.owner ? short(s.owner.peer_id) : "-",
      s.owner && s.owner.public_key === me ? el("span", { class: "badge", text: "you" }) : null);
    const silent = s.owner_silent;
    const ck = s.newest_step === null ? el("td", { class: "muted", text: "none yet" })
      : el("td", {}, `step ${num(s.newest_step)}`, el("span", { class: "muted mono", text: "  by " + head(s.newest_publisher) }));
    const hb = el("td", { class: "num" + (silent ? " bad" : "") },
      s.heartbeat_age === null ? (s.state === "training" ? "no heartbeat" : "-")
        : (silent ? "silent " : "") + duration(s.heartbeat_age) + " ago");
    return el("tr", { "data-shard": s.shard, "data-state": s.state },
      el("td", { class: "num mono", text: String(s.shard) }),
      el("td", {}, el("span", { class: "pill pill-" + s.state, text: s.state })),
      ownerCell,
      el("td", { class: "step", "data-step": s.step === null ? "" : s.step },
        bar(s.step, s.target, s.state === "done" ? "done" : silent ? "stale" : "")),
      el("td", { class: "num mono", text: s.loss === null ? "-" : Number(s.loss).toFixed(4) }),
      el("td", {}, spark(s.curve, color)),
      el("td", { class: "num", text: num(s.images_per_s) }),
      el("td", { class: "num", text: s.state === "training" ? duration(s.eta_s) : "-" }),
      el("td", { class: "num", text: String(s.replicas) }),
      ck, hb);
  });
  const r = doc.router;
  if (r && r.state !== "disabled") {
    rows.push(el("tr", { class: "router" }, el("td", { class: "num", text: "router" }),
      el("td", {}, el("span", { class: "pill pill-" + r.state, text: r.state })),
      el("td", { class: "mono", text: r.owner ? short(r.owner.peer_id) : "-" }),
      el("td", { text: r.step === null ? "-" : `step ${num(r.step)}` }), el("td"), el("td"), el("td"), el("td"),
      el("td", { class: "num", text: String(r.records) }), el("td", { class: "mono", text: head(r.publisher) }),
      el("td", { class: "num", text: r.heartbeat_age === null ? "-" : duration(r.heartbeat_age) + " ago" })));
  }
  $("shards").tBodies[0].replaceChildren(...rows);
  const silent = doc.shards.filter((s) => s.owner_silent).length;
  $("shards-note").textContent = silent ? `${silent} owner(s) silent: their step is the last one heard` : "";
  $("shards-note").className = "sub" + (silent ? " warn" : "");
}

// ------------------------------------------------------------------------------------------ loss chart
function renderChart(doc) {
  const series = doc.shards.filter((s) => s.curve && s.curve.length > 1);
  const box = $("chart");
  if (!series.length) {
    box.replaceChildren(el("div", { class: "empty", text: "no loss reported yet" }));
    $("legend").replaceChildren();
    return;
  }
  const svgNS = "http://www.w3.org/2000/svg", W = Math.max(box.clientWidth, 300), H = 262, L = 50, R = 14, T = 10, B = 24;
  const all = series.flatMap((s) => s.curve);
  const x1 = Math.max(...all.map((p) => p[0]), 1), ys = all.map((p) => p[1]);
  const y0 = Math.min(...ys), y1 = Math.max(...ys), span = Math.max(y1 - y0, 1e-9);
  const X = (x) => L + (W - L - R) * x / x1, Y = (y) => T + (H - T - B) * (1 - (y - y0) / span);
  const svg = document.createElementNS(svgNS, "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  const add = (tag, attrs, text) => {
    const e = document.createElementNS(svgNS, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    svg.append(e); return e;
  };
  for (let i = 0; i <= 4; i++) {
    const y = y0 + span * i / 4;
    add("line", { x1: L, x2: W - R, y1: Y(y), y2: Y(y), class: "axis" });
    add("text", { x: L - 6, y: Y(y) + 4, "text-anchor": "end" }, y.toFixed(3));
  }
  for (let i = 0; i <= 4; i++)
    add("text", { x: X(x1 * i / 4), y: H - 6, "text-anchor": ["start", "middle", "middle", "middle", "end"][i] },
      num(Math.round(x1 * i / 4)));
  for (const s of series) {
    const d = s.curve.map((p, i) => `${i ? "L" : "M"}${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`).join("");
    add("path", { d, fill: "none", stroke: COLORS[s.shard % COLORS.length], "stroke-width": 1.8 });
  }
  box.replaceChildren(svg);
  $("legend").replaceChildren(...series.map((s) => el("span", {}, el("i"), `shard ${s.shard}`)));
  [...$("legend").children].forEach((e, i) => { e.firstChild.style.background = COLORS[series[i].shard % COLORS.length]; });
}

// ------------------------------------------------------------------------------------------ peers, events, sample
function renderPeers(doc) {
  const rows = doc.peers.map((p) => el("tr", { "data-silent": p.silent ? "1" : null },
    el("td", { class: "mono" }, short(p.peer_id), p.me ? el("span", { class: "badge", text: "you" }) : null),
    el("td", { class: "mono", text: head(p.public_key) }), el("td", { text: p.version }),
    el("td", { text: p.state }), el("td", { class: "num", text: p.shard < 0 ? "-" : String(p.shard) }),
    el("td", { class: "num", text: num(p.step) }),
    el("td", { class: "num mono", text: p.loss === null || p.loss === undefined ? "-" : Number(p.loss).toFixed(4) }),
    el("td", { class: "num" + (p.silent ? " bad" : ""), text: (p.silent ? "silent " : "") + duration(p.heartbeat_age) + " ago" })));
  $("peers").tBodies[0].replaceChildren(...(rows.length ? rows
    : [el("tr", {}, el("td", { colspan: 8, class: "empty", text: "no peers heard yet" }))]));
  const silent = doc.peers.filter((p) => p.silent).length;
  $("peers-note").textContent = `${doc.peers.length} known` + (silent ? `, ${silent} silent` : "");
}

function renderEvents(doc) {
  const items = doc.events.slice(-60).reverse().map((e) => el("li", { class: e.level === "warn" ? "warn" : null },
    el("time", { text: clock(e.t) }), el("span", { class: "src", text: e.source === "self" ? "this node" : "swarm" }),
    el("span", { text: e.text })));
  $("events").replaceChildren(...(items.length ? items : [el("li", { class: "empty", text: "nothing yet" })]));
  $("events-note").textContent = doc.events.length ? `${doc.events.length} kept` : "";
}

function renderSample(doc) {
  const panel = $("sample-panel");
  panel.hidden = !doc.sample;
  $("bottom").classList.toggle("single", !doc.sample);
  if (!doc.sample) return;
  if ($("sample").getAttribute("src") !== doc.sample.url) $("sample").setAttribute("src", doc.sample.url);
  $("sample-note").textContent = `${doc.sample.name} · ${clock(doc.sample.mtime)}`;
}

function render(doc) {
  renderHeader(doc); renderHealth(doc); renderCards(doc); renderShards(doc); renderChart(doc);
  renderPeers(doc); renderEvents(doc); renderSample(doc);
}

async function poll() {
  try {
    const res = await fetch("/api/swarm", { cache: "no-store" });
    if (!res.ok) throw new Error("HTTP " + res.status);
    last = await res.json();
    lastOk = Date.now() / 1000;
    render(last);
  } catch (err) {
    if (last) renderHealth(last);
    else { $("health").className = "pill pill-down"; $("health").textContent = "unreachable"; }
  }
  clearTimeout(timer);
  timer = setTimeout(poll, 1000 * Math.max(1, (last && last.interval) || 2));
}
poll();
