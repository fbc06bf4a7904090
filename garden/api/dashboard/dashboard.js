// The garden dashboard: polls this peer's JSON endpoints (same origin) every 2 s and draws them.
//
// Plain JS, no framework, no build step, no external files. Everything that comes from the network
// (peer ids, mission and model names are chosen by strangers) goes into the page as text nodes
// (textContent) or attribute values, never as HTML.
"use strict";

(function () {
  const POLL_MS = 2000;
  const TIMEOUT_MS = 8000;
  // a chat answer is generated while the peer may shake, train or serve on a home PC's few cores: 48 tokens took
  // over TIMEOUT_MS on a busy 2-core machine, and the panel gave up on an answer that was on its way
  const CHAT_TIMEOUT_MS = 300000;
  const MAX_MISSION_DETAILS = 12;
  const SVG_NS = "http://www.w3.org/2000/svg";
  const $ = (id) => document.getElementById(id);

  // --- DOM helpers ----------------------------------------------------------------------------------

  // el("td", {class: "num", title: "..."}, "text", childNode, ...): strings become text nodes
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    setAttrs(node, attrs);
    append(node, children);
    return node;
  }

  function svg(tag, attrs, ...children) {
    const node = document.createElementNS(SVG_NS, tag);
    setAttrs(node, attrs);
    append(node, children);
    return node;
  }

  function setAttrs(node, attrs) {
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      node.setAttribute(key, String(value));
    }
  }

  function append(node, children) {
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.appendChild(child instanceof Node ? child : document.createTextNode(String(child)));
    }
  }

  function facts(dl, pairs) {
    const items = [];
    for (const [label, value] of pairs) {
      if (value === undefined) continue;
      items.push(el("dt", null, label), el("dd", null, value === null ? "—" : value));
    }
    dl.replaceChildren(...items);
  }

  // --- formatting ----------------------------------------------------------------------------------

  const isNum = (x) => typeof x === "number" && Number.isFinite(x);

  function fmtBytes(n) {
    if (!isNum(n)) return "—";
    const units = [["TiB", 2 ** 40], ["GiB", 2 ** 30], ["MiB", 2 ** 20], ["KiB", 2 ** 10]];
    for (const [unit, size] of units) {
      if (Math.abs(n) >= size) {
        const v = n / size;
        return `${v >= 100 ? v.toFixed(0) : v >= 10 ? v.toFixed(1) : v.toFixed(2)} ${unit}`;
      }
    }
    return `${Math.round(n)} B`;
  }

  const fmtRate = (n) => (isNum(n) ? `${fmtBytes(n)}/s` : "no limit");

  function fmtDuration(s) {
    if (!isNum(s)) return "—";
    s = Math.max(0, s);
    if (s < 60) return `${s < 10 ? s.toFixed(1) : Math.round(s)} s`;
    const m = Math.floor(s / 60);
    if (m < 60) return `${m} m ${Math.round(s - m * 60)} s`;
    const h = Math.floor(m / 60);
    if (h < 48) return `${h} h ${m % 60} m`;
    return `${Math.floor(h / 24)} d ${h % 24} h`;
  }

  function fmtPct(x, digits) {
    if (!isNum(x)) return "—";
    return `${(x * 100).toFixed(digits === undefined ? (x < 0.1 ? 1 : 0) : digits)} %`;
  }

  function fmtInt(n) {
    return isNum(n) ? Math.round(n).toLocaleString("en-US") : "—";
  }

  function fmtNum(x) {
    if (!isNum(x)) return "—";
    const a = Math.abs(x);
    if (a === 0) return "0";
    if (a >= 1000) return x.toFixed(0);
    if (a >= 10) return x.toFixed(1);
    if (a >= 0.01) return x.toFixed(3);
    return x.toExponential(2);
  }

  function fmtClock(unix) {
    if (!isNum(unix)) return "—";
    return new Date(unix * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  }

  function fmtAgo(unix) {
    if (!isNum(unix)) return "—";
    return `${fmtDuration(Date.now() / 1000 - unix)} ago`;
  }

  function shortId(id) {
    id = String(id || "");
    return id.length > 16 ? `${id.slice(0, 8)}…${id.slice(-6)}` : id;
  }

  function gpuText(gpu) {
    return gpu && typeof gpu === "object" ? `${gpu.name} (${fmtBytes(gpu.memory_bytes)})` : "none";
  }

  function plural(n, word) {
    return `${fmtInt(n)} ${word}${n === 1 ? "" : "s"}`;
  }

  function list(xs) {
    return Array.isArray(xs) && xs.length ? xs.join(", ") : "none";
  }

  // --- fetching ------------------------------------------------------------------------------------

  async function fetchJSON(path, options, timeoutMs = TIMEOUT_MS) {
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort(), timeoutMs);
    try {
      const response = await fetch(path, { cache: "no-store", ...options, signal: controller.signal });
      if (!response.ok) {
        let detail = "";
        try {
          const body = await response.json();
          detail = body.detail || (body.error && body.error.message) || "";
        } catch (_) { /* not JSON */ }
        throw new Error(`${path}: HTTP ${response.status}${detail ? ` (${detail})` : ""}`);
      }
      return await response.json();
    } catch (err) {
      if (err && err.name === "AbortError") throw new Error(`${path}: no answer in ${timeoutMs / 1000} s`);
      if (err instanceof TypeError) throw new Error(`${path}: not reachable`);
      throw err;
    } finally {
      clearTimeout(timer);
    }
  }

  const problems = new Map(); // what failed, by source: shown in the notice until it works again

  function showProblems() {
    const notice = $("unreachable");
    if (problems.size === 0) {
      notice.hidden = true;
      notice.textContent = "";
      return;
    }
    const messages = [...new Set(problems.values())];
    notice.hidden = false;
    notice.textContent = messages.every((m) => m.endsWith("not reachable"))
      ? "Not reachable: the peer does not answer (is the daemon running?). Retrying every 2 s…"
      : `Not reachable right now: ${messages.join("; ")}. Retrying every 2 s…`;
  }

  // run one part of the page; a failure is shown in the notice, never thrown
  async function part(key, work) {
    try {
      await work();
      problems.delete(key);
    } catch (err) {
      problems.set(key, err && err.message ? err.message : String(err));
      if (!(err instanceof Error) || !/not reachable|HTTP \d|no answer/.test(err.message)) {
        // a bug in this page, not the network: say so where developers look
        console.error("dashboard:", err);
      }
    }
  }

  // --- this peer -------------------------------------------------------------------------------------

  let lastStatus = null;

  function stateClass(working, paused) {
    if (paused) return "badge paused";
    if (String(working || "").startsWith("waiting")) return "badge waiting";
    return "badge";
  }

  function showState(working, paused, until) {
    const state = $("peer-state");
    let text = working || (paused ? "paused" : "working");
    if (paused && isNum(until)) text = `paused until ${fmtClock(until)}`;
    state.textContent = text;
    state.className = stateClass(working, paused);
    $("pause-button").disabled = !!paused;
    $("resume-button").disabled = !paused;
  }

  function reachText(net) {
    if (!net) return undefined;
    const how = net.mode === "relayed" ? `through ${net.relays.length} relay(s)` : net.mode === "client" ? "dials out only" : "direct";
    const relays = net.relay_service ? ", relays for others" : "";
    const limits = net.relay_limits === "libp2p-default" ? " (libp2p's default limits: 128 KiB a relayed connection)" : "";
    return `${net.reachability}, ${how}${relays}${limits}`;
  }

  function renderStatus(s) {
    lastStatus = s;
    $("peer-id").textContent = s.peer_id;
    $("version").textContent = s.version || "";
    $("swarm-name").textContent = s.swarm ? `· ${s.swarm}` : "";
    document.title = `garden · ${shortId(s.peer_id)}`;
    const pause = s.pause || {};
    showState(s.working, s.paused, pause.until);

    const banner = $("upgrade");
    banner.hidden = !s.upgrade;
    banner.textContent = s.upgrade ? `Upgrade needed: ${s.upgrade}` : "";

    const m = s.machine || {};
    const skipped = Object.entries(s.skipped_roles || {}).map(([role, why]) => `${role} (${why})`);
    facts($("peer-facts"), [
      ["uptime", fmtDuration(s.uptime_s)],
      ["roles", list(s.roles)],
      ["skipped", skipped.length ? skipped.join(", ") : undefined],
      ["peers seen", fmtInt(s.peers)],
      ["reach", reachText(s.network)],
      ["machine", `${fmtInt(m.cores)} cores, ${fmtBytes(m.ram_bytes)} RAM`],
      ["GPU", gpuText(m.gpu)],
      ["paused", s.paused ? (isNum(pause.since) ? `since ${fmtClock(pause.since)}` : "yes") : "no"],
      ["serving paused", s.paused ? (pause.serving ? "yes" : "no, still serving") : undefined],
    ]);

    const r = s.resources || {};
    facts($("peer-resources"), [
      ["CPU", isNum(r.cpu) ? `${fmtPct(r.cpu)} of the machine`
        : isNum((s.caps || {}).max_cpu) ? "measuring…" : "— (no cap)"],
      ["held for cap", fmtDuration(r.held_s)],
      ["owner's load", isNum(r.owner_load) ? fmtPct(r.owner_load) : undefined],
      ["disk", fmtBytes(r.disk_bytes)],
      ["pruned", r.disk_pruned ? fmtInt(r.disk_pruned) : undefined],
      ["disk note", r.disk_note || undefined],
    ]);

    const c = s.caps || {};
    facts($("peer-caps"), [
      ["CPU", isNum(c.max_cpu) ? `${c.max_cpu} %` : "no limit"],
      ["threads", isNum(c.max_threads) ? fmtInt(c.max_threads) : "auto"],
      ["memory", isNum(c.max_memory) ? fmtBytes(c.max_memory) : "no limit"],
      ["disk", isNum(c.max_disk) ? fmtBytes(c.max_disk) : "no limit"],
      ["upload", fmtRate(c.max_upload_rate)],
      ["download", fmtRate(c.max_download_rate)],
      ["works", c.when === "idle" ? "when the machine is idle" : "always"],
    ]);

    const t = s.contribution || {};
    facts($("peer-contribution"), [
      ["rows shaken", fmtInt(t.rows_shaken)],
      ["shards shaken", fmtInt(t.shards_shaken)],
      ["samples trained", fmtInt(t.samples_trained)],
      ["tokens served", fmtInt(t.tokens_served)],
      ["hours online", isNum(t.hours_online) ? t.hours_online.toFixed(1) : "—"],
    ]);

    const serving = Array.isArray(s.serving) ? s.serving : [];
    $("serving").hidden = serving.length === 0;
    $("serving-rows").replaceChildren(
      ...serving.map((x) =>
        el("tr", null,
          el("td", null, x.model),
          el("td", null, x.layers || "loading"),
          el("td", { class: "num" }, isNum(x.throughput) ? `${fmtNum(x.throughput)} tok/s` : "—"),
          el("td", { class: "num" }, `${fmtInt(x.sessions)} / ${fmtInt(x.max_sessions)}`),
          el("td", { class: "num" }, fmtInt(x.tokens_served)),
          el("td", null, x.error || ""),
        ),
      ),
    );
  }

  // --- the swarm ---------------------------------------------------------------------------------------

  function renderPeers(peers) {
    peers = Array.isArray(peers) ? peers.slice() : [];
    peers.sort((a, b) => (b.is_self - a.is_self) || String(a.peer_id).localeCompare(String(b.peer_id)));
    const rows = peers.map((p) => {
      const c = p.contribution || {};
      const machine = `${fmtInt(p.cores)} cores, ${fmtBytes(p.ram_bytes)}${p.gpu ? `, ${gpuText(p.gpu)}` : ""}`;
      const doing = p.paused ? "paused" : p.working || (p.client_mode ? "client" : "working");
      return el("tr", { class: p.is_self ? "self" : null },
        el("td", { class: "mono", title: p.peer_id }, shortId(p.peer_id)),
        el("td", null, p.version),
        el("td", null, list(p.roles)),
        el("td", null, p.client_mode ? "client" : p.reachability || "unknown"),
        el("td", null, machine),
        el("td", { class: "num" }, fmtPct(p.load)),
        el("td", null, el("span", { class: stateClass(doing, p.paused) }, doing)),
        el("td", { class: "num" }, p.contribution ? fmtInt(c.rows_shaken) : "—"),
        el("td", { class: "num" }, p.contribution ? fmtInt(c.samples_trained) : "—"),
        el("td", { class: "num" }, p.contribution ? fmtInt(c.tokens_served) : "—"),
        el("td", { class: "num" }, p.contribution && isNum(c.hours_online) ? `${c.hours_online.toFixed(1)} h` : "—"),
        el("td", { title: `record expires in ${fmtDuration(p.expires_in_s)}` }, fmtAgo(p.last_seen)),
      );
    });
    if (rows.length === 0) rows.push(el("tr", null, el("td", { colspan: 12, class: "muted" }, "no peers seen yet")));
    $("peers").replaceChildren(...rows);
  }

  // --- missions ------------------------------------------------------------------------------------

  function bar(label, value, max, text, cls) {
    const attrs = { class: cls, max: Math.max(1, max || 0), value: Math.max(0, Math.min(value || 0, max || 0)) };
    return el("div", { class: "bar-row" },
      el("span", { class: "label" }, label),
      el("progress", attrs, text),
      el("span", { class: "value" }, text),
    );
  }

  const METRICS = [
    { key: "loss", label: "loss", color: "#e8590c" },
    { key: "kl", label: "KL", color: "#4c6ef5" },
    { key: "pref_acc", label: "preference accuracy", color: "#2f9e44", fixed: [0, 1], pct: true },
  ];

  function lineChart(history, metric) {
    const W = 300, H = 100, PAD = 6;
    const points = history.filter((p) => p && isNum(p.t) && isNum(p[metric.key]));
    const latest = points.length ? points[points.length - 1][metric.key] : null;
    const fmt = metric.pct ? (x) => fmtPct(x, 1) : fmtNum;
    const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none", role: "img",
      "aria-label": `${metric.label} over time` });
    for (const f of [0.25, 0.5, 0.75]) {
      root.appendChild(svg("line", { class: "grid", x1: 0, x2: W, y1: H * f, y2: H * f,
        "vector-effect": "non-scaling-stroke" }));
    }
    let range = "";
    if (points.length) {
      const values = points.map((p) => p[metric.key]);
      let [lo, hi] = metric.fixed || [Math.min(...values), Math.max(...values)];
      if (hi - lo < 1e-12) { lo -= Math.abs(lo) * 0.1 || 0.5; hi += Math.abs(hi) * 0.1 || 0.5; }
      const t0 = points[0].t, t1 = points[points.length - 1].t;
      const span = t1 - t0 || 1;
      const x = (t) => (points.length === 1 ? W / 2 : ((t - t0) / span) * W);
      const y = (v) => PAD + (1 - (v - lo) / (hi - lo)) * (H - 2 * PAD);
      const coords = points.map((p) => `${x(p.t).toFixed(1)},${y(p[metric.key]).toFixed(1)}`);
      root.appendChild(svg("polyline", { class: "line", points: coords.join(" "), stroke: metric.color,
        "vector-effect": "non-scaling-stroke" }));
      if (points.length === 1) {
        const [cx, cy] = coords[0].split(",");
        root.appendChild(svg("circle", { cx, cy, r: 3, fill: metric.color }));
      }
      range = `${fmt(lo)} – ${fmt(hi)} · ${fmtDuration(span)}`;
    }
    return el("div", { class: "chart" },
      el("div", { class: "chart-title" },
        el("span", null, metric.label),
        el("span", { class: "latest", style: `color: ${metric.color}` }, latest === null ? "—" : fmt(latest)),
      ),
      root,
      el("div", { class: "muted small" }, range || "no points yet"),
    );
  }

  function renderMission(summary, detail) {
    const m = detail || summary;
    const shards = m.shards || {};
    const head = el("div", { class: "mission-head" },
      el("h3", { class: "mission-name" }, m.name),
      el("span", { class: stateClass(m.state, false) }, m.state),
      el("span", { class: "muted small mono", title: m.id }, shortId(m.id)),
    );
    const doneText = `${fmtInt(shards.done)} / ${fmtInt(shards.total)} shards` +
      (shards.leased ? ` · ${fmtInt(shards.leased)} leased` : "");
    const parts = [head, bar("shaking", shards.done, shards.total, doneText, "mission-progress")];

    const train = detail ? detail.train : null;
    if (train) {
      const epochText = `epoch ${fmtInt(train.epoch)} / ${fmtInt(train.max_epochs)}`;
      parts.push(bar("training", train.epoch, train.max_epochs, epochText, "mission-epochs epochs"));
    }

    const meta = [
      ["prompts", fmtInt(m.prompts)],
      ["rows", fmtInt(m.rows)],
      ["lead", shortId(m.lead)],
      ["created", fmtAgo(m.created)],
    ];
    if (detail) {
      if (isNum(detail.eta_s) && m.state === "shaking") meta.push(["ETA", fmtDuration(detail.eta_s)]);
      meta.push(["peers", fmtInt((detail.peers || []).length)]);
      const here = detail.this_peer || {};
      meta.push(["this peer", `${here.state || "—"}, ${plural(here.shards_shaken, "shard")}, ${plural(here.rows_shaken, "row")}`]);
      if (train) meta.push(["training", `${train.state}, ${plural(train.samples, "sample")}, ${plural(train.peers, "trainer")}`]);
      const checks = detail.verification;
      if (checks && (checks.verified || checks.refuted || checks.pending || checks.unconfirmed)) {
        let text = `${fmtInt(checks.verified)} verified, ${fmtInt(checks.refuted)} refuted, ${fmtInt(checks.pending)} pending`;
        if (checks.unconfirmed) text += `, ${plural(checks.unconfirmed, "unconfirmed refutation")}`;
        meta.push(["checked", text]);
      }
      if (detail.cancel_reason) meta.push(["cancelled", detail.cancel_reason]);
      const student = detail.student;
      if (student) {
        const kl = student.metrics && isNum(student.metrics.kl) ? `, KL ${student.metrics.kl.toFixed(3)}` : "";
        meta.push(["model", `mission:${String(student.mission_id).slice(0, 12)} (epoch ${fmtInt(student.epoch)}${kl})`]);
      }
      if (train && train.error) meta.push(["error", train.error]);
    }
    parts.push(el("div", { class: "mission-meta" },
      meta.map(([k, v]) => el("span", null, el("span", { class: "muted" }, `${k} `), v))));

    const history = train && Array.isArray(train.history) ? train.history : [];
    if (history.length) {
      parts.push(el("div", { class: "charts" }, METRICS.map((metric) => lineChart(history, metric))));
    } else {
      const why = !detail ? "" : !train ? " (this peer does not train missions)" : ` (trainer: ${train.state})`;
      parts.push(el("p", { class: "no-training muted small" }, `no training yet${why}`));
    }
    return el("div", { class: "card mission", "data-mission": m.id }, parts);
  }

  async function renderMissions() {
    const missions = await fetchJSON("/missions");
    const sorted = (Array.isArray(missions) ? missions.slice() : []).sort((a, b) => (b.created || 0) - (a.created || 0));
    const details = await Promise.all(
      sorted.map((m, i) =>
        i < MAX_MISSION_DETAILS
          ? fetchJSON(`/missions/${encodeURIComponent(m.id)}`).catch((err) => {
              problems.set(`mission ${m.id}`, err.message);
              return null;
            })
          : Promise.resolve(null),
      ),
    );
    sorted.forEach((m, i) => { if (details[i]) problems.delete(`mission ${m.id}`); });
    const cards = sorted.map((m, i) => renderMission(m, details[i]));
    $("missions").replaceChildren(...(cards.length ? cards : [el("p", { class: "muted" }, "no missions")]));
  }

  // --- models ------------------------------------------------------------------------------------------

  function coverageBar(model) {
    const n = Math.max(0, Math.min(Math.floor(model.num_layers || 0), 10000));
    const counts = new Array(n).fill(0);
    for (const span of model.spans || []) {
      for (let i = Math.max(0, span.start); i < Math.min(n, span.end); i++) counts[i] += 1;
    }
    const CELL = 10;
    const root = svg("svg", { class: "coverage", viewBox: `0 0 ${Math.max(1, n * CELL)} 20`, preserveAspectRatio: "none",
      role: "img", "aria-label": `layer coverage of ${model.model}` });
    counts.forEach((count, i) => {
      root.appendChild(svg("rect", { class: `c${Math.min(count, 3)}`, x: i * CELL, y: 0, width: CELL - 1.5, height: 20, rx: 1 },
        svg("title", null, `layer ${i}: ${count ? `${count} server${count > 1 ? "s" : ""}` : "missing"}`)));
    });
    return root;
  }

  function renderModels(models) {
    models = Array.isArray(models) ? models : [];
    const cards = models.map((m) => {
      const missing = (m.missing || []).map(([a, b]) => (b - a > 1 ? `${a}–${b - 1}` : `${a}`));
      const student = m.student;
      const kl = student && student.metrics && isNum(student.metrics.kl) ? `, KL ${student.metrics.kl.toFixed(3)}` : "";
      return el("div", { class: "card model" },
        el("div", { class: "model-head" },
          el("span", { class: "model-name" }, m.model),
          student ? el("span", { class: "muted small" }, `student of ${student.name}, epoch ${fmtInt(student.epoch)}${kl}`) : null,
          el("span", { class: m.complete ? "badge" : "badge bad" }, m.complete ? "complete" : "incomplete"),
          el("span", { class: "muted small" }, `${fmtInt(m.num_layers)} layers · ${plural(m.servers, "server")}`),
          missing.length ? el("span", { class: "small", style: "color: var(--bad)" }, `missing layers ${missing.join(", ")}`) : null,
        ),
        coverageBar(m),
        el("div", { class: "legend" },
          el("span", null, el("i", { style: "background: var(--bad)" }), "missing"),
          el("span", null, el("i", { style: "background: var(--cover-1)" }), "1 server"),
          el("span", null, el("i", { style: "background: var(--cover-2)" }), "2"),
          el("span", null, el("i", { style: "background: var(--cover-3)" }), "3+"),
        ),
      );
    });
    $("models").replaceChildren(...(cards.length ? cards : [el("p", { class: "muted" }, "no models served in the swarm")]));
  }

  // --- chat: ask a model of the swarm, rate its answer (POST /v1/feedback) ------------------------------

  const chat = { id: null, text: "" };

  function postJSON(path, body) {  // the chat's calls: an answer, a rating (a redo generates a new answer)
    const options = { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
    return fetchJSON(path, options, CHAT_TIMEOUT_MS);
  }

  function renderChatModels(list) {
    const select = $("chat-model");
    const ids = (list && Array.isArray(list.data) ? list.data : []).map((m) => String(m.id));
    const shown = [...select.options].map((o) => o.value);
    if (ids.join("\n") !== shown.join("\n")) {
      const current = select.value;
      select.replaceChildren(...ids.map((id) => el("option", { value: id }, id)));
      if (ids.includes(current)) select.value = current;
    }
    if (!chat.busy) $("chat-ask").disabled = !ids.length;
  }

  function showAnswer(completion) {
    const choice = (completion.choices || [])[0] || {};
    chat.id = completion.id;
    chat.text = (choice.message || {}).content || "";
    $("chat-answer").textContent = chat.text || "(an empty answer)";
    $("chat-answer").hidden = false;
    $("chat-rate").hidden = false;
    $("chat-editor").hidden = true;
  }

  function counted(reply, what) {
    $("chat-pairs").textContent = `${what}; ${plural(reply.pairs, "pair")} kept on this machine`;
  }

  async function chatStep(work) {
    const buttons = ["chat-ask", "chat-accept", "chat-redo", "chat-edit", "chat-save"];
    chat.busy = true;
    buttons.forEach((id) => { $(id).disabled = true; });
    $("chat-note").textContent = "…";
    try {
      await work();
      $("chat-note").textContent = "Answers and your ratings stay on this machine (garden feedback).";
    } catch (err) {
      $("chat-note").textContent = err && err.message ? err.message : String(err);
    } finally {
      chat.busy = false;
      buttons.forEach((id) => { $(id).disabled = false; });
      $("chat-ask").disabled = !$("chat-model").value;
    }
  }

  $("chat-ask").addEventListener("click", () => chatStep(async () => {
    const question = $("chat-input").value.trim();
    if (!question) throw new Error("ask something first");
    showAnswer(await postJSON("/v1/chat/completions", {
      model: $("chat-model").value, messages: [{ role: "user", content: question }], max_tokens: 48, temperature: 0.7,
    }));
    $("chat-pairs").textContent = "";
  }));
  $("chat-input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !$("chat-ask").disabled) $("chat-ask").click();
  });
  $("chat-accept").addEventListener("click", () => chatStep(async () => {
    counted(await postJSON("/v1/feedback", { id: chat.id, verdict: "accept" }), "accepted");
  }));
  $("chat-redo").addEventListener("click", () => chatStep(async () => {
    const reply = await postJSON("/v1/feedback", { id: chat.id, verdict: "redo" });
    showAnswer(reply.completion);
    counted(reply, "rejected; a new answer");
  }));
  $("chat-edit").addEventListener("click", () => {
    $("chat-edit-text").value = chat.text;
    $("chat-editor").hidden = false;
    $("chat-edit-text").focus();
  });
  $("chat-save").addEventListener("click", () => chatStep(async () => {
    const text = $("chat-edit-text").value;
    const reply = await postJSON("/v1/feedback", { id: chat.id, verdict: "edit", text });
    $("chat-editor").hidden = true;
    $("chat-answer").textContent = text;
    counted(reply, "your edit is kept");
  }));

  // --- polling and controls ----------------------------------------------------------------------------

  let timer = null;
  let polling = false;

  async function poll() {
    if (polling) return;
    polling = true;
    clearTimeout(timer);
    try {
      await Promise.all([
        part("status", async () => renderStatus(await fetchJSON("/status"))),
        part("peers", async () => renderPeers(await fetchJSON("/peers"))),
        part("missions", renderMissions),
        part("models", async () => renderModels(await fetchJSON("/models"))),
        part("chat models", async () => renderChatModels(await fetchJSON("/v1/models"))),
      ]);
    } finally {
      showProblems();
      polling = false;
      timer = setTimeout(poll, POLL_MS);
    }
  }

  async function control(path, body) {
    $("pause-button").disabled = true;
    $("resume-button").disabled = true;
    await part("control", async () => {
      const options = { method: "POST" };
      if (body !== undefined) {
        options.headers = { "Content-Type": "application/json" };
        options.body = JSON.stringify(body);
      }
      const reply = await fetchJSON(path, options);
      showState(reply.working, reply.paused, reply.until);
    });
    showProblems();
    if (problems.has("control") && lastStatus) {
      showState(lastStatus.working, lastStatus.paused, (lastStatus.pause || {}).until);
    }
    poll();
  }

  $("pause-button").addEventListener("click", () => {
    const seconds = Number($("pause-for").value);
    control("/pause", { for_s: seconds > 0 ? seconds : null });
  });
  $("resume-button").addEventListener("click", () => control("/resume"));

  window.addEventListener("unhandledrejection", (event) => {
    // nothing above should reject unhandled; if something does, keep it out of the way of polling
    event.preventDefault();
    console.error("dashboard:", event.reason);
  });

  poll();
})();
