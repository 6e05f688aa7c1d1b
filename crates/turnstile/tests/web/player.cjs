// Find a recording in the list, play it, pause, seek to the middle: the
// screen shows the middle of the session and not its end. Download it.
"use strict";
const { SIZES, launch, newPage, snap, signIn, need, run } = require("./lib.cjs");

// Moves the player's position slider to `permille` as a user drags it, and
// returns the screen once xterm.js has taken what the seek wrote.
async function seekTo(page, permille) {
  await page.evaluate((value) => {
    const seek = document.getElementById("player-seek");
    seek.value = String(value);
    seek.dispatchEvent(new Event("input", { bubbles: true }));
  }, permille);
  await page.evaluate(() => window.turnstilePlayerFlush());
  return page.evaluate(() => window.turnstilePlayerText());
}

run(async () => {
  const url = need("CONSOLE_URL");
  const user = need("CONSOLE_USER");
  const password = need("CONSOLE_PASSWORD");
  const sid = need("RECORDING_SID");
  const browser = await launch();
  for (const size of SIZES) {
    const page = await newPage(browser, size);
    await signIn(page, url, user, password);

    await page.click('#nav a[data-view="recordings"]');
    const row = page.locator(`#rec-table tr[data-sid="${sid}"]`);
    await row.waitFor({ timeout: 15000 });
    await snap(page, "recordings", size);
    // A filter that matches nothing empties the list.
    await page.fill("#rec-node", "no-such-node");
    await page.click('#rec-filters button[type="submit"]');
    await page.locator("#rec-empty").waitFor({ state: "visible", timeout: 10000 });
    await page.fill("#rec-node", "");
    await page.click('#rec-filters button[type="submit"]');
    await row.waitFor({ timeout: 10000 });

    await row.click();
    await page.locator("#player").waitFor({ state: "visible", timeout: 10000 });
    await page.waitForFunction(() => {
      const s = window.turnstilePlayerState();
      return s && s.duration > 0;
    }, null, { timeout: 15000 });
    // Playing: pause, then seek to 55% of the session.
    await page.click("#player-play");
    await page.waitForFunction(() => !window.turnstilePlayerState().playing);
    const text = await seekTo(page, 550);
    const state = await page.evaluate(() => window.turnstilePlayerState());
    if (!/^mark-10$/m.test(text) || /^mark-20$/m.test(text)) {
      throw new Error(`at ${state.pos}s of ${state.duration}s the screen shows:\n${text}`);
    }
    await snap(page, "player", size);
    // Seeking back shows less.
    const early = await seekTo(page, 100);
    if (/^mark-10$/m.test(early)) throw new Error(`seeking back still shows mark-10:\n${early}`);

    const href = await page.getAttribute("#player-download", "href");
    const cast = await page.evaluate(async (h) => {
      const r = await fetch(h);
      return { status: r.status, disposition: r.headers.get("content-disposition"), text: await r.text() };
    }, href);
    const castHeader = JSON.parse(cast.text.split("\n")[0] || "{}");
    if (cast.status !== 200 || castHeader.version !== 2 || !/attachment/.test(cast.disposition || "")) {
      throw new Error(`download: ${cast.status} ${cast.disposition} ${cast.text.slice(0, 80)}`);
    }
    await page.context().close();
  }
  await browser.close();
  console.log("player works");
});
