// What the web console's browser scripts share: Chromium as Debian installs
// it (Playwright cannot download its own here), a page that trusts the
// console's self-signed certificate, and the two sizes screenshots are taken at.
"use strict";
const { chromium } = require("playwright-core");

const SIZES = [
  { name: "1280x800", width: 1280, height: 800 },
  { name: "390x844", width: 390, height: 844 },
];

async function launch() {
  return chromium.launch({
    executablePath: "/usr/bin/chromium",
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
  });
}

async function newPage(browser, size) {
  const context = await browser.newContext({
    ignoreHTTPSErrors: true,
    viewport: { width: size.width, height: size.height },
  });
  await context.grantPermissions(["clipboard-read", "clipboard-write"]);
  const page = await context.newPage();
  page.on("pageerror", (e) => {
    console.error(`page error: ${e.message}`);
    process.exitCode = 1;
  });
  page.on("console", (m) => {
    if (m.type() === "error") console.error(`console: ${m.text()}`);
  });
  return page;
}

// Saves a screenshot and fails if the page scrolls sideways.
async function snap(page, name, size) {
  const dir = process.env.SCREENSHOTS;
  if (dir) {
    await page.screenshot({ path: `${dir}/${name}-${size.name}.png`, fullPage: true });
  }
  const overflow = await page.evaluate(
    () => document.documentElement.scrollWidth - document.documentElement.clientWidth,
  );
  if (overflow > 0) {
    throw new Error(`${name} at ${size.name} scrolls horizontally by ${overflow}px`);
  }
}

// Signs in through the page's form; resolves on the nodes page.
async function signIn(page, url, user, password) {
  await page.goto(url);
  await page.locator("#signin").waitFor({ state: "visible", timeout: 10000 });
  await page.fill("#user", user);
  await page.fill("#password", password);
  await page.click("#signin-button");
  await page.locator("#nodes").waitFor({ state: "visible", timeout: 15000 });
}

function need(name) {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set`);
  return v;
}

async function run(main) {
  try {
    await main();
  } catch (e) {
    console.error(e && e.stack ? e.stack : String(e));
    process.exit(1);
  }
}

module.exports = { SIZES, launch, newPage, snap, signIn, need, run };
