// The fedge dashboard page: renders each snapshot the server pushes over server-sent events.
// Everything shown comes from untrusted MQTT payloads, so text goes in through textContent only.
"use strict";

const $ = (id) => document.getElementById(id);
let latest = null;
let plots = null;

function cell(row, text, cls) {
  const td = row.insertCell();
  td.textContent = text === null || text === undefined ? "-" : String(text);
  if (cls) td.className = cls;
  return td;
}

function kB(bytes) {
  return bytes === undefined || bytes === null ? "-" : (bytes / 1000).toFixed(1) + " kB";
}

function fixed(value, digits) {
  return value === undefined || value === null ? "-" : Number(value).toFixed(digits);
}

function exp(value) {
  return value === undefined || value === null ? "-" : Number(value).toExponential();
}

function renderAgents(agents) {
  const body = $("agents").tBodies[0];
  body.replaceChildren();
  for (const a of agents) {
    const row = body.insertRow();
    row.dataset.agent = a.agent;
    cell(row, a.agent);
    const state = cell(row, a.state, "state");
    state.replaceChildren();
    const badge = document.createElement("span");
    badge.className = "badge " + (["online", "offline"].includes(a.state) ? a.state : "unknown");
    badge.textContent = a.state;
    state.appendChild(badge);
    cell(row, a.model_version, "model");
    cell(row, a.samples, "num");
    const f = a.frames;
    cell(row, f ? `${f.received} / ${f.processed} / ${f.dropped_stale + f.dropped_rate}` : "-", "num");
    cell(row, a.latency_ms === undefined ? "-" : fixed(a.latency_ms, 1) + " ms", "num");
    cell(row, a.runtime);
  }
  const online = agents.filter((a) => a.state === "online").length;
  $("agents-online").textContent = `${online} of ${agents.length} online`;
}

function renderRound(snapshot) {
  const c = snapshot.coordinator;
  const r = snapshot.round;
  $("coordinator-state").textContent = c ? c.state : "no status yet";
  $("round-number").textContent = c && c.round !== null ? c.round : r ? r.round : "-";
  $("model-version").textContent = (c && c.model_version) || "-";
  const busy = c && c.state === "announced";
  const selected = busy ? c.selected : 0;
  $("round-progress").max = Math.max(selected, 1);
  $("round-progress").value = busy ? c.updates_received : 0;
  $("round-updates").textContent = busy ? `${c.updates_received} of ${selected}` : "-";
  if (busy && r && r.round === c.round) {
    const left = Math.max(0, r.deadline_at - Date.now() / 1000);
    $("round-deadline").textContent =
      `${new Date(r.deadline_at * 1000).toLocaleTimeString()} (${left.toFixed(0)} s left)`;
  } else {
    $("round-deadline").textContent = "-";
  }
  $("round-detail").textContent = (c && c.detail) || "-";
}

// (epsilon, delta) spent so far, from the newest DP release, against the plan's budget.
function renderPrivacy(privacy) {
  const bar = $("privacy-budget");
  if (!privacy) {
    bar.hidden = true;
    $("privacy-spent").textContent = "no DP rounds";
    $("privacy-accounting").textContent = "-";
    return;
  }
  const spent = `epsilon ${fixed(privacy.epsilon, 3)} at delta ${exp(privacy.delta)}`;
  const budget = privacy.target_epsilon;
  bar.hidden = budget === null || budget === undefined;
  if (!bar.hidden) {
    bar.max = budget;
    bar.value = Math.min(privacy.epsilon, budget);
  }
  $("privacy-spent").textContent = bar.hidden
    ? `${spent}, no budget (${privacy.rounds} rounds charged)`
    : `${spent} of a budget of ${fixed(budget, 3)} (${privacy.rounds} rounds charged)`;
  $("privacy-accounting").textContent =
    `${privacy.accounting}; noise multiplier ${fixed(privacy.noise_multiplier, 4)}, clip norm ${privacy.clip_norm}`;
}

function makePlot(target, title, series) {
  const width = Math.max(280, $(target).clientWidth || 320);
  return new uPlot(
    {
      title,
      width,
      height: 200,
      scales: { x: { time: false } },
      axes: [{ label: "round" }, { label: series[0].unit }],
      series: [{ label: "round" }, ...series.map((s) => ({ label: s.label, stroke: s.stroke, width: 2, points: { show: true } }))],
    },
    [[], ...series.map(() => [])],
    $(target),
  );
}

function renderHistory(history) {
  const rounds = history.filter((h) => h.round > 0);
  if (plots === null) {
    plots = {
      accuracy: makePlot("plot-accuracy", "Accuracy (held-out set)", [{ label: "accuracy", unit: "accuracy (0-1)", stroke: "#2b6cb0" }]),
      loss: makePlot("plot-loss", "Loss (held-out set)", [{ label: "loss", unit: "cross-entropy", stroke: "#c05621" }]),
      bytes: makePlot("plot-bytes", "Bytes per round", [
        { label: "up (updates)", unit: "kB", stroke: "#2f855a" },
        { label: "down (weights)", unit: "kB", stroke: "#6b46c1" },
      ]),
      epsilon: makePlot("plot-epsilon", "Privacy spent (DP rounds)", [{ label: "epsilon", unit: "epsilon", stroke: "#b83280" }]),
    };
  }
  const x = rounds.map((h) => h.round);
  const val = (key, scale) => rounds.map((h) => (h[key] === undefined || h[key] === null ? null : h[key] * scale));
  plots.accuracy.setData([x, val("accuracy", 1)]);
  plots.loss.setData([x, val("loss", 1)]);
  plots.bytes.setData([x, val("bytes_up", 0.001), val("bytes_down", 0.001)]);
  plots.epsilon.setData([x, val("epsilon", 1)]);

  const body = $("history").tBodies[0];
  body.replaceChildren();
  for (const h of rounds.slice().reverse().slice(0, 20)) {
    const row = body.insertRow();
    row.dataset.round = h.round;
    cell(row, h.round);
    cell(row, h.version);
    cell(row, fixed(h.accuracy, 3), "num accuracy");
    cell(row, fixed(h.loss, 3), "num loss");
    cell(row, h.updates === undefined ? "-" : `${h.updates} of ${h.selected ?? "?"}`, "num");
    cell(row, kB(h.bytes_up), "num");
    cell(row, kB(h.bytes_down), "num");
    cell(row, h.epsilon === undefined ? "-" : `${fixed(h.epsilon, 3)} (${exp(h.delta)})`, "num epsilon");
  }
}

function renderCameras(cameras, now) {
  const body = $("cameras").tBodies[0];
  body.replaceChildren();
  for (const c of cameras) {
    const row = body.insertRow();
    row.dataset.camera = c.camera;
    cell(row, c.camera);
    cell(row, c.agent);
    cell(row, c.frame_id);
    const top = c.predictions[0];
    cell(row, top ? `${top.label} (${top.score.toFixed(2)})` : `${c.outputs} raw outputs`, "result");
    cell(row, c.model_version);
    cell(row, fixed(c.latency_ms, 1) + " ms", "num");
    cell(row, Math.max(0, now - c.timestamp).toFixed(0) + " s", "num");
  }
}

function render(snapshot) {
  latest = snapshot;
  $("fleet").textContent = `fleet ${snapshot.fleet} (topics under ${snapshot.root}/)`;
  renderAgents(snapshot.agents);
  renderRound(snapshot);
  renderPrivacy(snapshot.privacy);
  renderHistory(snapshot.history);
  renderCameras(snapshot.cameras, snapshot.now);
}

function connect() {
  const source = new EventSource("/api/events");
  source.addEventListener("state", (event) => render(JSON.parse(event.data)));
  source.onopen = () => {
    $("link").textContent = "live";
    $("link").className = "badge online";
  };
  // EventSource reconnects by itself; say so meanwhile.
  source.onerror = () => {
    $("link").textContent = "reconnecting";
    $("link").className = "badge offline";
  };
}

async function act(path, body) {
  const headers = { "Content-Type": "application/json" };
  const token = $("in-token").value;
  if (token) headers.Authorization = "Bearer " + token;
  $("action-result").textContent = "waiting for the coordinator...";
  try {
    const response = await fetch(path, { method: "POST", headers, body: JSON.stringify(body) });
    const answer = await response.json();
    $("action-result").textContent = answer.ok
      ? `accepted${answer.detail && answer.detail.next_round ? ", starting with round " + answer.detail.next_round : ""}`
      : `refused: ${answer.message || ""} (${answer.reason})`;
  } catch (error) {
    $("action-result").textContent = `failed: ${error}`;
  }
}

async function setUpActions() {
  const config = await (await fetch("/api/config")).json();
  $("token-label").hidden = !config.needs_token;
  if (!config.actions) {
    for (const id of ["start-rounds", "stop-rounds"]) $(id).disabled = true;
    $("action-result").textContent = `actions disabled here (${config.why_not})`;
    return;
  }
  $("start-rounds").addEventListener("click", () =>
    act("/api/rounds/start", {
      rounds: Number($("in-rounds").value),
      min_agents: Number($("in-min-agents").value),
      deadline_s: Number($("in-deadline").value),
      strategy: $("in-strategy").value,
      options: { update_encoding: $("in-encoding").value },
    }),
  );
  $("stop-rounds").addEventListener("click", () => act("/api/rounds/stop", {}));
}

// The deadline countdown moves between pushes too.
setInterval(() => latest && renderRound(latest), 1000);
connect();
setUpActions();
