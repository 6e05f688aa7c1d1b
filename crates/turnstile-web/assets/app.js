// Turnstile's web console: one page, plain JavaScript, no inline script.
"use strict";

const state = { me: null, nodes: [], term: null };

const $ = (id) => document.getElementById(id);

function show(view) {
  for (const id of ["signin", "nodes", "terminal"]) {
    $(id).hidden = id !== view;
  }
  const signedIn = state.me !== null;
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
      if (navigator.clipboard) navigator.clipboard.readText().then((text) => term.paste(text));
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

// The terminal's size, [rows, cols].
window.turnstileTerminalSize = () => (state.term ? [state.term.term.rows, state.term.term.cols] : []);

function route() {
  if (!state.me) {
    closeTerminal();
    show("signin");
    return;
  }
  const parts = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
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
  window.addEventListener("hashchange", route);
  try {
    signedIn(await api("GET", "/api/me"));
  } catch (_) {
    signedOut("");
  }
}

start();
