// scripts/bench.sh web-seek: how long the console's player takes to seek in
// a one-hour session, in headless Chromium. The page is the real one (its
// files served from crates/turnstile-web/assets through Playwright's
// routing); the recording is synthetic: one hour, an output event every
// BENCH_EVERY_MS (default 100) of BENCH_EVENT_BYTES (default 200) coloured
// text. Prints a table; each seek is measured until xterm.js has taken it.
"use strict";
const fs = require("node:fs");
const path = require("node:path");
const { launch, newPage, run } = require("./lib.cjs");

const ASSETS = path.join(__dirname, "../../../turnstile-web/assets");
const TYPES = { ".html": "text/html", ".js": "text/javascript", ".css": "text/css" };

function cast(everyMs, eventBytes) {
  const lines = [JSON.stringify({ version: 2, width: 120, height: 40, timestamp: 0 })];
  const filler = "abcdefghijklmnopqrstuvwxyz0123456789 ".repeat(Math.ceil(eventBytes / 37));
  let n = 0;
  for (let ms = 0; ms < 3600 * 1000; ms += everyMs) {
    const text = `\x1b[3${n % 8}m${n} ${filler.slice(0, eventBytes)}\x1b[0m\r\n`;
    lines.push(JSON.stringify([ms / 1000, "o", text]));
    n += 1;
  }
  return { text: lines.join("\n") + "\n", events: n };
}

run(async () => {
  const everyMs = Number(process.env.BENCH_EVERY_MS || 100);
  const eventBytes = Number(process.env.BENCH_EVENT_BYTES || 200);
  const { text, events } = cast(everyMs, eventBytes);
  const browser = await launch();
  const page = await newPage(browser, { name: "1280x800", width: 1280, height: 800 });
  await page.route("https://bench.invalid/**", (route) => {
    const url = new URL(route.request().url());
    const name = url.pathname === "/" ? "index.html" : path.basename(url.pathname);
    const file = [path.join(ASSETS, name), path.join(ASSETS, "vendor", name)].find((f) => fs.existsSync(f));
    if (!file || url.pathname.startsWith("/api/")) {
      return route.fulfill({ status: 401, contentType: "application/json", body: '{"error":"bench"}' });
    }
    return route.fulfill({ status: 200, contentType: TYPES[path.extname(file)] || "application/octet-stream", body: fs.readFileSync(file) });
  });
  await page.goto("https://bench.invalid/");
  await page.waitForFunction(() => typeof window.turnstilePlayCast === "function");
  const loadMs = await page.evaluate(async (t) => {
    const start = performance.now();
    window.turnstilePlayCast(t);
    await window.turnstilePlayerFlush();
    return performance.now() - start;
  }, text);
  const seek = async (fraction) =>
    page.evaluate(async (f) => {
      const seekInput = document.getElementById("player-seek");
      const start = performance.now();
      seekInput.value = String(Math.round(f * 1000));
      seekInput.dispatchEvent(new Event("input", { bubbles: true }));
      await window.turnstilePlayerFlush();
      return performance.now() - start;
    }, fraction);
  const rows = [];
  for (const [label, f] of [["to the end", 1], ["back to the middle", 0.5], ["forward to 90%", 0.9], ["back to 10%", 0.1], ["to the end again", 1]]) {
    rows.push([label, await seek(f)]);
  }
  await browser.close();
  const mib = (Buffer.byteLength(text) / (1 << 20)).toFixed(1);
  console.log(`Player seek in a one-hour session: ${events} output events of ${eventBytes} B every ${everyMs} ms (asciicast ${mib} MiB), Chromium headless`);
  console.log("| seek | ms |");
  console.log("|---|---|");
  console.log(`| open (parse, first frame) | ${loadMs.toFixed(0)} |`);
  for (const [label, ms] of rows) console.log(`| ${label} | ${ms.toFixed(0)} |`);
});
