// Sign in (a wrong password first), find the node, sign out; at both sizes.
"use strict";
const { execFileSync } = require("node:child_process");
const { SIZES, launch, newPage, snap, signIn, need, run } = require("./lib.cjs");

run(async () => {
  const url = need("CONSOLE_URL");
  const user = need("CONSOLE_USER");
  const password = need("CONSOLE_PASSWORD");
  const node = need("CONSOLE_NODE");
  const browser = await launch();
  for (const size of SIZES) {
    const page = await newPage(browser, size);
    await page.goto(url);
    await page.locator("#signin").waitFor({ state: "visible", timeout: 10000 });
    await snap(page, "sign-in", size);

    await page.fill("#user", user);
    await page.fill("#password", "not the password");
    await page.click("#signin-button");
    await page.locator("#signin-error", { hasText: "wrong user name or password" })
      .waitFor({ timeout: 15000 });
    if (await page.locator("#nodes").isVisible()) throw new Error("signed in with a wrong password");

    await page.fill("#password", password);
    await page.click("#signin-button");
    await page.locator(`#node-table tr[data-node="${node}"]`).waitFor({ timeout: 15000 });
    const who = await page.textContent("#who");
    if (who !== user) throw new Error(`the bar shows ${who}, not ${user}`);
    await snap(page, "nodes", size);

    // The filter narrows the list.
    await page.fill("#node-filter", "no-such-node");
    await page.locator("#nodes-empty").waitFor({ state: "visible", timeout: 5000 });
    await page.fill("#node-filter", "env=");
    await page.locator(`#node-table tr[data-node="${node}"]`).waitFor({ timeout: 5000 });

    // The session cookie is not readable from the page.
    const cookies = await page.evaluate(() => document.cookie);
    if (cookies.includes("turnstile_session")) throw new Error("the session cookie is readable by scripts");

    await page.click("#signout");
    await page.locator("#signin").waitFor({ state: "visible", timeout: 10000 });
    const status = await page.evaluate(async () => (await fetch("/api/me")).status);
    if (status !== 401) throw new Error(`after sign-out /api/me answers ${status}`);
    // A reload stays signed out.
    await page.reload();
    await page.locator("#signin").waitFor({ state: "visible", timeout: 10000 });
    await page.context().close();
  }

  // From the page: a state-changing request without the CSRF token is
  // refused, and the same request with it succeeds.
  const page = await newPage(browser, SIZES[0]);
  await signIn(page, url, user, password);
  const without = await page.evaluate(async () => {
    const r = await fetch("/api/logout", { method: "POST" });
    return { status: r.status, body: await r.json() };
  });
  if (without.status !== 403 || !/CSRF/.test(without.body.error)) {
    throw new Error(`sign-out without the token: ${JSON.stringify(without)}`);
  }
  const stillIn = await page.evaluate(async () => (await fetch("/api/me")).status);
  if (stillIn !== 200) throw new Error(`the refused request signed the user out (${stillIn})`);
  const withToken = await page.evaluate(async () => {
    const me = await (await fetch("/api/me")).json();
    const r = await fetch("/api/logout", { method: "POST", headers: { "X-CSRF-Token": me.csrf_token } });
    return r.status;
  });
  if (withToken !== 200) throw new Error(`sign-out with the token answered ${withToken}`);

  // An operator removes a signed-in user: the page's next request finds the
  // session gone and asks to sign in, saying why.
  await signIn(page, url, user, password);
  execFileSync(need("TURNSTILE_BIN"), ["admin", "users", "rm", user, "--data-dir", need("TURNSTILE_DATA")]);
  await page.click('#nav a[data-view="recordings"]');
  await page.locator("#signin").waitFor({ state: "visible", timeout: 10000 });
  const notice = await page.textContent("#notice");
  if (!/removed/.test(notice)) throw new Error(`after users rm the page says: ${notice}`);
  await browser.close();
  console.log("signed out");
});
