// The audit log page: search for logins, see them, export; at both sizes.
"use strict";
const { SIZES, launch, newPage, snap, signIn, need, run } = require("./lib.cjs");

run(async () => {
  const url = need("CONSOLE_URL");
  const user = need("CONSOLE_USER");
  const password = need("CONSOLE_PASSWORD");
  const browser = await launch();
  for (const size of SIZES) {
    const page = await newPage(browser, size);
    await signIn(page, url, user, password);
    await page.locator("#nav-audit").waitFor({ state: "visible", timeout: 5000 });
    await page.click("#nav-audit");
    await page.locator("#audit").waitFor({ state: "visible", timeout: 10000 });
    await page.fill("#audit-event", "user.login");
    await page.click('#audit-filters button[type="submit"]');
    // The filtered answer: only logins.
    await page.waitForFunction(() => {
      const rows = [...document.querySelectorAll("#audit-table tbody tr")];
      return rows.length > 0 && rows.every((r) => r.dataset.event === "user.login");
    }, null, { timeout: 10000 });
    await snap(page, "audit", size);
    const href = await page.getAttribute("#audit-export", "href");
    const exported = await page.evaluate(async (h) => (await (await fetch(h)).text()), href);
    const lines = exported.split("\n").filter((l) => l);
    if (lines.length === 0 || !lines.every((l) => JSON.parse(l).event === "user.login")) {
      throw new Error(`export: ${exported.slice(0, 200)}`);
    }
    await page.context().close();
  }
  await browser.close();
  console.log("audit works");
});
