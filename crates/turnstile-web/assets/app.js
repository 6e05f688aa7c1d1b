// Turnstile's web console: one page, plain JavaScript, no inline script.
"use strict";

const state = { me: null, nodes: [], term: null, player: null };

const $ = (id) => document.getElementById(id);

function show(view) {
  for (const id of ["signin", "nodes", "terminal", "recordings", "player", "audit"]) {
    $(id).hidden = id !== view;
  }
  const signedIn = state.me !== null;
  $("nav-audit").hidden = !(signedIn && state.me.may_read_audit);
  $("nav").hidden = !signedIn;
  $("who").hidden = !signedIn;
  $("signout").hidden = !signedIn;
  for (const a of document.querySelectorAll("#nav a")) {
    a.classList.toggle("active", a.dataset.view === view);
  }
}

function notice(text) {
  $("notice").textContent = text || "";
  $("notice").hidden = !text;
}

// Calls the API; state-changing calls carry the session's CSRF token.
async function api(method, path, body) {
  const headers = { "Accept": "application/json" };
  if (method !== "GET") {
    headers["Content-Type"] = "application/json";
    if (state.me) headers["X-CSRF-Token"] = state.me.csrf_token;
  }
  const response = await fetch(path, {
    method,
    headers,
    credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  let data = {};
  try {
    data = await response.json();
  } catch (_) {
    data = {};
  }
  if (!response.ok) {
    const error = new Error(data.error || `${response.status} ${response.statusText}`);
    error.status = response.status;
    throw error;
  }
  return data;
}

// A signed-out answer anywhere brings the sign-in form back, saying why.
function signedOut(reason) {
  closeTerminal();
  closePlayer();
  if (location.hash.startsWith("#/terminal")) history.replaceState(null, "", location.pathname);
  state.me = null;
  state.nodes = [];
  $("password").value = "";
  show("signin");
  notice(reason || "");
}

async function guarded(work) {
  try {
    return await work();
  } catch (e) {
    if (e.status === 401) {
      signedOut(e.message);
      return undefined;
    }
    notice(e.message);
    return undefined;
  }
}

function signedIn(me) {
  state.me = me;
  $("who").textContent = me.user;
  notice("");
  route();
}

function renderNodes() {
  const filter = $("node-filter").value.trim().toLowerCase();
  const body = $("node-table").querySelector("tbody");
  body.replaceChildren();
  const shown = state.nodes.filter((n) => {
    if (!filter) return true;
    const labels = Object.entries(n.labels || {}).map(([k, v]) => `${k}=${v}`);
    return [n.name, n.addr, ...labels].some((t) => t.toLowerCase().includes(filter));
  });
  for (const n of shown) {
    const row = document.createElement("tr");
    row.dataset.node = n.name;
    const name = document.createElement("td");
    name.textContent = n.name;
    const addr = document.createElement("td");
    addr.className = "mono";
    addr.textContent = n.addr;
    const labels = document.createElement("td");
    for (const [k, v] of Object.entries(n.labels || {}).sort()) {
      const chip = document.createElement("span");
      chip.className = "label";
      chip.textContent = `${k}=${v}`;
      labels.appendChild(chip);
    }
    const actions = document.createElement("td");
    actions.className = "actions";
    const login = document.createElement("select");
    login.setAttribute("aria-label", `Login on ${n.name}`);
    for (const l of state.me.logins || []) {
      const option = document.createElement("option");
      option.value = l;
      option.textContent = l;
      login.appendChild(option);
    }
    const connect = document.createElement("button");
    connect.type = "button";
    connect.textContent = "Connect";
    connect.className = "connect";
    connect.disabled = login.options.length === 0;
    connect.addEventListener("click", () => {
      location.hash = `#/terminal/${encodeURIComponent(n.name)}/${encodeURIComponent(login.value)}`;
    });
    actions.append(login, connect);
    row.append(name, addr, labels, actions);
    body.appendChild(row);
  }
  $("nodes-empty").hidden = shown.length > 0;
}

async function loadNodes() {
  const data = await guarded(() => api("GET", "/api/nodes"));
  if (data) {
    state.nodes = data.nodes;
    renderNodes();
  }
}

// The open terminal: xterm.js over a WebSocket carrying an SSH session.
function closeTerminal() {
  const t = state.term;
  state.term = null;
  if (!t) return;
  window.removeEventListener("resize", t.onWindowResize);
  try { t.socket.close(); } catch (_) { /* already closed */ }
  t.term.dispose();
  $("term").replaceChildren();
}

function openTerminal(node, login) {
  closeTerminal();
  show("terminal");
  $("term-title").textContent = `${login}@${node}`;
  $("term-status").textContent = "connecting…";
  $("term-error").textContent = "";
  const term = new Terminal({
    cursorBlink: true,
    fontFamily: 'ui-monospace, SFMono-Regular, Menlo, Consolas, monospace',
    fontSize: 14,
    scrollback: 5000,
    theme: { background: "#0f141c" },
  });
  const fit = new FitAddon.FitAddon();
  term.loadAddon(fit);
  term.open($("term"));
  fit.fit();
  const params = new URLSearchParams({
    node, login, cols: String(term.cols), rows: String(term.rows), csrf: state.me.csrf_token,
  });
  const socket = new WebSocket(`wss://${location.host}/api/terminal?${params}`);
  socket.binaryType = "arraybuffer";
  const t = { term, socket, node, login, ended: false, onWindowResize: () => fit.fit() };
  state.term = t;
  const encoder = new TextEncoder();
  socket.addEventListener("message", (event) => {
    if (typeof event.data !== "string") {
      term.write(new Uint8Array(event.data));
      return;
    }
    const msg = JSON.parse(event.data);
    if (msg.type === "ready") {
      $("term-status").textContent = "connected";
      term.focus();
    } else if (msg.type === "error") {
      t.ended = true;
      $("term-status").textContent = "closed";
      $("term-error").textContent = msg.message;
      term.write(`\r\n\x1b[31m${msg.message}\x1b[0m\r\n`);
    } else if (msg.type === "exit") {
      t.ended = true;
      $("term-status").textContent = `session ended (exit status ${msg.status})`;
    }
  });
  socket.addEventListener("close", () => {
    if (!t.ended && state.term === t) $("term-status").textContent = "disconnected";
  });
  term.onData((data) => {
    if (socket.readyState === WebSocket.OPEN) socket.send(encoder.encode(data));
  });
  term.onResize(({ cols, rows }) => {
    if (socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify({ resize: [cols, rows] }));
  });
  // Ctrl+Shift+C copies the selection, Ctrl+Shift+V pastes.
  term.attachCustomKeyEventHandler((e) => {
    if (e.type !== "keydown" || !e.ctrlKey || !e.shiftKey) return true;
    if (e.code === "KeyC") {
      const text = term.getSelection();
      if (text && navigator.clipboard) navigator.clipboard.writeText(text);
      return false;
    }
    if (e.code === "KeyV") {
      // Not a key for the session: the browser pastes into the terminal.
      return false;
    }
    return true;
  });
  window.addEventListener("resize", t.onWindowResize);
}

// What the terminal shows, as text (the canvas cannot be read from the DOM).
window.turnstileTerminalText = () => {
  const t = state.term;
  if (!t) return "";
  const buffer = t.term.buffer.active;
  const lines = [];
  for (let i = 0; i < buffer.length; i++) {
    lines.push(buffer.getLine(i).translateToString(true));
  }
  return lines.join("\n");
};

// ---- Audit log ----

const AUDIT_SKIP = new Set(["time", "event", "user", "uid", "code"]);

function auditParams() {
  const params = new URLSearchParams();
  const since = $("audit-since").value;
  if (since) params.set("since_ms", String(new Date(since).getTime()));
  for (const [key, id] of [["user", "audit-user"], ["event", "audit-event"], ["node", "audit-node"]]) {
    const v = $(id).value.trim();
    if (v) params.set(key, v);
  }
  return params;
}

async function loadAudit(after) {
  const params = auditParams();
  $("audit-export").href = `/api/audit/export?${params}`;
  if (after) params.set("after", after);
  params.set("limit", "50");
  $("audit-error").textContent = "";
  // Only the newest search's answer is shown, whatever order answers come in.
  const asked = (state.auditAsked = (state.auditAsked || 0) + 1);
  let data;
  try {
    data = await api("GET", `/api/audit?${params}`);
  } catch (e) {
    if (asked !== state.auditAsked) return;
    if (e.status === 401) { signedOut(e.message); return; }
    $("audit-error").textContent = e.message;
    return;
  }
  if (asked !== state.auditAsked) return;
  state.auditNext = data.next || "";
  state.auditPage = after ? (state.auditPage || 1) + 1 : 1;
  const body = $("audit-table").querySelector("tbody");
  body.replaceChildren();
  for (const e of data.events) {
    const row = document.createElement("tr");
    row.dataset.event = e.event || "";
    const when = document.createElement("td");
    when.className = "when";
    when.textContent = e.time ? new Date(e.time).toLocaleString() : "";
    const event = document.createElement("td");
    event.textContent = e.event || "";
    const code = document.createElement("span");
    code.className = "code";
    code.textContent = e.code || "";
    event.appendChild(code);
    const user = document.createElement("td");
    user.textContent = e.user || "";
    const details = document.createElement("td");
    details.className = "details";
    const text = Object.entries(e)
      .filter(([k]) => !AUDIT_SKIP.has(k))
      .map(([k, v]) => `${k}=${typeof v === "string" ? v : JSON.stringify(v)}`)
      .join("  ");
    details.textContent = text.length > 300 ? `${text.slice(0, 300)}…` : text;
    details.title = JSON.stringify(e, null, 2);
    row.append(when, event, user, details);
    body.appendChild(row);
  }
  $("audit-empty").hidden = data.events.length > 0;
  $("audit-next").disabled = !state.auditNext;
  $("audit-first").disabled = !after;
  $("audit-count").textContent = `page ${state.auditPage} · ${data.events.length} events`;
}

// ---- Recordings ----

function duration(ms) {
  const s = Math.max(0, Math.round(ms / 1000));
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const sec = String(s % 60).padStart(2, "0");
  return h > 0 ? `${h}:${String(m).padStart(2, "0")}:${sec}` : `${m}:${sec}`;
}

async function loadRecordings() {
  const params = new URLSearchParams();
  const user = $("rec-user").value.trim();
  const node = $("rec-node").value.trim();
  const st = $("rec-state").value;
  const since = $("rec-since").value;
  if (user) params.set("user", user);
  if (node) params.set("node", node);
  if (st) params.set("state", st);
  if (since) params.set("since_ms", String(new Date(since).getTime()));
  const asked = (state.recAsked = (state.recAsked || 0) + 1);
  const data = await guarded(() => api("GET", `/api/recordings?${params}`));
  if (!data || asked !== state.recAsked) return;
  const body = $("rec-table").querySelector("tbody");
  body.replaceChildren();
  for (const r of data.recordings) {
    const row = document.createElement("tr");
    row.dataset.sid = r.sid;
    const cells = [
      new Date(r.start_ms).toLocaleString(),
      `${r.user} (${r.login})`,
      r.node,
      r.stop_ms > 0 ? duration(r.stop_ms - r.start_ms) : "—",
    ];
    for (const text of cells) {
      const td = document.createElement("td");
      td.textContent = text;
      row.appendChild(td);
    }
    const stateCell = document.createElement("td");
    const chip = document.createElement("span");
    chip.className = `state ${r.status}`;
    chip.textContent = r.status;
    if (r.failure) chip.title = r.failure;
    stateCell.appendChild(chip);
    row.appendChild(stateCell);
    row.addEventListener("click", () => { location.hash = `#/recordings/${r.sid}`; });
    body.appendChild(row);
  }
  $("rec-empty").hidden = data.recordings.length > 0;
}

// The player: the recording's asciicast, replayed into xterm.js. Positions
// are in play time (idle gaps cut to a second when "Skip idle" is on);
// seeking back replays from the start, which xterm.js does at memory speed.
const MAX_IDLE = 1.0;

function closePlayer() {
  const p = state.player;
  state.player = null;
  if (!p) return;
  p.playing = false;
  if (p.timer) clearInterval(p.timer);
  p.term.dispose();
  $("player-term").replaceChildren();
  $("player-marks").replaceChildren();
}

function playTimes(p) {
  const skip = $("player-skip").checked;
  let last = 0;
  let pt = 0;
  for (const e of p.events) {
    const gap = Math.max(0, e.t - last);
    pt += skip ? Math.min(gap, MAX_IDLE) : gap;
    last = e.t;
    e.pt = pt;
  }
  p.duration = pt;
}

function drawMarks(p) {
  const marks = $("player-marks");
  marks.replaceChildren();
  for (const e of p.events) {
    if (e.kind !== "r" && e.kind !== "m") continue;
    const m = document.createElement("div");
    m.className = e.kind === "m" ? "mark command" : "mark resize";
    m.style.left = `${p.duration > 0 ? (e.pt / p.duration) * 100 : 0}%`;
    m.title = e.kind === "m" ? e.data : `resize ${e.data}`;
    marks.appendChild(m);
  }
}

// What goes to the screen is queued and written a slice at a time, each
// after xterm.js took the one before (it drops data written faster than it
// parses), resizes in their place among the writes.
const SLICE = 1 << 20;

function pump(p) {
  const generation = p.generation;
  p.pumping = true;
  const step = () => {
    if (generation !== p.generation) return; // a seek back replaced this queue
    const item = p.queue.shift();
    if (item === undefined) {
      p.pumping = false;
      const idle = p.idle;
      p.idle = [];
      for (const f of idle) f();
      return;
    }
    if (typeof item === "string") {
      if (item.length > SLICE) {
        p.queue.unshift(item.slice(SLICE));
        p.term.write(item.slice(0, SLICE), step);
      } else {
        p.term.write(item, step);
      }
    } else {
      p.term.resize(item[0], item[1]);
      step();
    }
  };
  step();
}

// Brings the screen to play time `pos`.
function renderTo(p, pos) {
  if (pos < p.pos) {
    p.generation += 1;
    p.queue = [];
    p.pumping = false;
    p.term.reset();
    p.term.resize(p.width, p.height);
    p.next = 0;
  }
  let out = "";
  while (p.next < p.events.length && p.events[p.next].pt <= pos) {
    const e = p.events[p.next];
    if (e.kind === "o") {
      out += e.data;
    } else if (e.kind === "r") {
      if (out) { p.queue.push(out); out = ""; }
      const [c, r] = e.data.split("x").map(Number);
      if (c > 0 && r > 0) p.queue.push([c, r]);
    }
    p.next += 1;
  }
  if (out) p.queue.push(out);
  if (!p.pumping) pump(p);
  p.pos = pos;
  $("player-seek").value = String(p.duration > 0 ? Math.round((pos / p.duration) * 1000) : 0);
  $("player-time").textContent = `${duration(pos * 1000)} / ${duration(p.duration * 1000)}`;
}

function setPlaying(p, playing) {
  p.playing = playing;
  $("player-play").textContent = playing ? "Pause" : "Play";
  if (p.timer) { clearInterval(p.timer); p.timer = null; }
  if (!playing) return;
  if (p.pos >= p.duration) renderTo(p, 0);
  let last = performance.now();
  p.timer = setInterval(() => {
    const now = performance.now();
    const speed = Number($("player-speed").value) || 1;
    const pos = Math.min(p.duration, p.pos + ((now - last) / 1000) * speed);
    last = now;
    renderTo(p, pos);
    if (pos >= p.duration) setPlaying(p, false);
  }, 50);
}

async function openPlayer(sid) {
  closeTerminal();
  closePlayer();
  show("player");
  $("player-title").textContent = `Recording ${sid.slice(0, 8)}`;
  $("player-status").textContent = "loading…";
  $("player-error").textContent = "";
  $("player-download").href = `/api/recordings/${encodeURIComponent(sid)}/asciicast?download=1`;
  let text;
  try {
    const response = await fetch(`/api/recordings/${encodeURIComponent(sid)}/asciicast`, { credentials: "same-origin" });
    if (!response.ok) {
      let message = `${response.status}`;
      try { message = (await response.json()).error || message; } catch (_) { /* not JSON */ }
      if (response.status === 401) { signedOut(message); return; }
      $("player-error").textContent = message;
      $("player-status").textContent = "";
      return;
    }
    text = await response.text();
  } catch (e) {
    $("player-error").textContent = String(e);
    return;
  }
  startPlayer(sid, text);
}

// Plays asciicast `text` (also the benchmark's way in: scripts/bench.sh web-seek).
function startPlayer(sid, text) {
  const lines = text.split("\n").filter((l) => l.length > 0);
  const header = JSON.parse(lines[0] || "{}");
  const events = lines.slice(1).map((l) => {
    const [t, kind, data] = JSON.parse(l);
    return { t, kind, data };
  });
  const width = header.width || 80;
  const height = header.height || 24;
  const term = new Terminal({
    cols: width, rows: height, disableStdin: true, scrollback: 1000,
    fontFamily: 'ui-monospace, SFMono-Regular, Menlo, Consolas, monospace', fontSize: 13,
    theme: { background: "#0f141c" },
  });
  term.open($("player-term"));
  const p = {
    sid, term, events, width, height, pos: 0, next: 0, duration: 0, playing: false, timer: null,
    queue: [], pumping: false, generation: 0, idle: [],
  };
  state.player = p;
  playTimes(p);
  drawMarks(p);
  renderTo(p, 0);
  $("player-status").textContent = "";
  setPlaying(p, true);
}

// What the player's screen shows, as text.
window.turnstilePlayerText = () => {
  const p = state.player;
  if (!p) return "";
  const buffer = p.term.buffer.active;
  const lines = [];
  for (let i = 0; i < buffer.length; i++) lines.push(buffer.getLine(i).translateToString(true));
  return lines.join("\n");
};
// Resolves once the player's screen has taken everything written to it
// (xterm.js parses writes asynchronously).
window.turnstilePlayCast = (text) => {
  closePlayer();
  show("player");
  startPlayer("bench", text);
  setPlaying(state.player, false);
};
window.turnstilePlayerFlush = () =>
  new Promise((resolve) => {
    const p = state.player;
    if (!p) return resolve();
    if (!p.pumping) return p.term.write("", resolve);
    p.idle.push(() => p.term.write("", resolve));
    return undefined;
  });
window.turnstilePlayerState = () => {
  const p = state.player;
  return p ? { pos: p.pos, duration: p.duration, playing: p.playing } : null;
};

// The terminal's size, [rows, cols].
window.turnstileTerminalSize = () => (state.term ? [state.term.term.rows, state.term.term.cols] : []);

function route() {
  if (!state.me) {
    closeTerminal();
    show("signin");
    return;
  }
  const parts = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
  if (parts[0] === "recordings") {
    closeTerminal();
    if (parts[1]) {
      if (!state.player || state.player.sid !== parts[1]) openPlayer(parts[1]);
      return;
    }
    closePlayer();
    show("recordings");
    loadRecordings();
    return;
  }
  closePlayer();
  if (parts[0] === "audit") {
    closeTerminal();
    show("audit");
    loadAudit("");
    return;
  }
  if (parts[0] === "terminal" && parts[1] && parts[2]) {
    if (!state.term || state.term.node !== parts[1] || state.term.login !== parts[2]) {
      openTerminal(parts[1], parts[2]);
    }
    return;
  }
  closeTerminal();
  show("nodes");
  loadNodes();
}

async function start() {
  $("signin-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    $("signin-error").textContent = "";
    $("signin-button").disabled = true;
    try {
      const me = await api("POST", "/api/login", {
        user: $("user").value.trim(),
        password: $("password").value,
      });
      $("password").value = "";
      signedIn(me);
    } catch (e) {
      $("signin-error").textContent = e.message;
    } finally {
      $("signin-button").disabled = false;
    }
  });
  $("signout").addEventListener("click", async () => {
    await guarded(() => api("POST", "/api/logout"));
    signedOut("Signed out.");
  });
  $("node-filter").addEventListener("input", renderNodes);
  $("term-close").addEventListener("click", () => { location.hash = "#/nodes"; });
  $("rec-filters").addEventListener("submit", (e) => { e.preventDefault(); loadRecordings(); });
  $("audit-filters").addEventListener("submit", (e) => { e.preventDefault(); loadAudit(""); });
  $("audit-first").addEventListener("click", () => loadAudit(""));
  $("audit-next").addEventListener("click", () => { if (state.auditNext) loadAudit(state.auditNext); });
  $("player-close").addEventListener("click", () => { location.hash = "#/recordings"; });
  $("player-play").addEventListener("click", () => {
    if (state.player) setPlaying(state.player, !state.player.playing);
  });
  $("player-seek").addEventListener("input", () => {
    const p = state.player;
    if (!p) return;
    renderTo(p, (Number($("player-seek").value) / 1000) * p.duration);
  });
  $("player-skip").addEventListener("change", () => {
    const p = state.player;
    if (!p) return;
    const fraction = p.duration > 0 ? p.pos / p.duration : 0;
    playTimes(p);
    drawMarks(p);
    p.pos = Infinity;
    renderTo(p, fraction * p.duration);
  });
  window.addEventListener("hashchange", route);
  try {
    signedIn(await api("GET", "/api/me"));
  } catch (_) {
    signedOut("");
  }
}

start();
