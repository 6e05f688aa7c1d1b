// Turnstile's web console: one page, plain JavaScript, no inline script.
"use strict";

const state = { me: null, nodes: [] };

const $ = (id) => document.getElementById(id);

function show(view) {
  for (const id of ["signin", "nodes"]) {
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
    row.append(name, addr, labels);
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

function route() {
  if (!state.me) {
    show("signin");
    return;
  }
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
  window.addEventListener("hashchange", route);
  try {
    signedIn(await api("GET", "/api/me"));
  } catch (_) {
    signedOut("");
  }
}

start();
