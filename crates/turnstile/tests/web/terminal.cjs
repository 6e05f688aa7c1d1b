// Open a terminal on a node, type a command and read its output; resize the
// window and see the session's size follow; a second terminal over a
// max_connections of 1 is refused with the limit's message.
"use strict";
const { SIZES, launch, newPage, snap, signIn, need, run } = require("./lib.cjs");

async function openTerminal(page, node) {
  await page.locator(`#node-table tr[data-node="${node}"] button.connect`).click();
  await page.locator("#terminal").waitFor({ state: "visible", timeout: 10000 });
}

async function screenText(page) {
  return page.evaluate(() => window.turnstileTerminalText());
}

async function waitForText(page, wanted, timeout) {
  const deadline = Date.now() + timeout;
  let seen = "";
  while (Date.now() < deadline) {
    seen = await screenText(page);
    if (wanted.test(seen)) return seen;
    await page.waitForTimeout(100);
  }
  throw new Error(`the terminal never showed ${wanted}; it shows:\n${seen}`);
}

async function typeLine(page, line) {
  await page.locator("#term").click();
  await page.keyboard.type(line);
  await page.keyboard.press("Enter");
}

run(async () => {
  const url = need("CONSOLE_URL");
  const user = need("CONSOLE_USER");
  const password = need("CONSOLE_PASSWORD");
  const node = need("CONSOLE_NODE");
  const browser = await launch();
  const mode = process.env.TERMINAL_TEST || "session";

  if (mode === "session") {
    for (const size of SIZES) {
      const page = await newPage(browser, size);
      await signIn(page, url, user, password);
      await openTerminal(page, node);
      await page.locator("#term-status", { hasText: "connected" }).waitFor({ timeout: 20000 });
      await typeLine(page, "echo hello-$((6*7))");
      await waitForText(page, /^hello-42$/m, 15000);
      // Paste (Ctrl+Shift+V) types the clipboard; copy (Ctrl+Shift+C) takes
      // the selection.
      await page.evaluate(() => navigator.clipboard.writeText("echo pasted-$((2+3))"));
      await page.locator("#term").click();
      await page.keyboard.press("Control+Shift+V");
      await page.keyboard.press("Enter");
      await waitForText(page, /^pasted-5$/m, 15000);
      const box = await page.locator("#term .xterm-screen").boundingBox();
      await page.mouse.move(box.x + 2, box.y + 4);
      await page.mouse.down();
      await page.mouse.move(box.x + box.width - 4, box.y + box.height / 2, { steps: 5 });
      await page.mouse.up();
      await page.keyboard.press("Control+Shift+C");
      const copied = await page.evaluate(() => navigator.clipboard.readText());
      if (!/hello-42/.test(copied)) throw new Error(`copied: ${JSON.stringify(copied)}`);
      await snap(page, "terminal", size);
      // The session's size follows the page's.
      const before = await page.evaluate(() => window.turnstileTerminalSize().join(" "));
      await page.setViewportSize({ width: size.width - 100, height: size.height - 120 });
      await page.waitForFunction((b) => window.turnstileTerminalSize().join(" ") !== b, before);
      const [rows, cols] = await page.evaluate(() => window.turnstileTerminalSize());
      await typeLine(page, "stty size | sed 's/^/size=/'");
      await waitForText(page, new RegExp(`^size=${rows} ${cols}$`, "m"), 15000);
      await typeLine(page, "exit");
      await page.locator("#term-status", { hasText: "session ended" }).waitFor({ timeout: 15000 });
      await page.context().close();
    }
    console.log("terminal works");
  } else {
    // Two pages of one user; the role allows one connection.
    const first = await newPage(browser, SIZES[0]);
    await signIn(first, url, user, password);
    await openTerminal(first, node);
    await first.locator("#term-status", { hasText: "connected" }).waitFor({ timeout: 20000 });
    const second = await newPage(browser, SIZES[0]);
    await signIn(second, url, user, password);
    await openTerminal(second, node);
    const refusal = second.locator("#term-error");
    await refusal.filter({ hasText: "too many concurrent ssh connections" }).waitFor({ timeout: 20000 });
    console.log(`refused: ${await refusal.textContent()}`);
    await snap(second, "terminal-refused", SIZES[0]);
  }
  await browser.close();
});
