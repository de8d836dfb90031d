// The status-bar menu: its content from a stats object, and its actions
// against the fake vscode and a small HTTP stand-in for the stats route.

import "./fake-vscode";
import assert from "node:assert/strict";
import { createServer, type IncomingMessage, type Server } from "node:http";
import { after, before, test } from "node:test";
import { fakeContext, messages, opened, quickPick, registered, settings, statusItems, type PickItem } from "./fake-vscode";
import { activate, deactivate } from "../src/extension";
import { dashboardUrl, type MenuItem, menuItems, type MenuStats } from "../src/menu";
import { FakeClient } from "./fake-client";

const READY: MenuStats = {
  state: "ready", serverUrl: "http://127.0.0.1:8000", sessionId: "s1", version: 12, meanRank: 7.25, queue: 3,
  acceptanceRate: 0.625, decided: 8, enabled: true,
};
const labels = (items: MenuItem[]) => items.map((i) => i.label);
const actions = (items: MenuItem[]) => items.filter((i) => i.action).map((i) => i.action);

test("menu content: the numbers, then the actions", () => {
  const items = menuItems(READY);
  assert.deepEqual(labels(items).slice(0, 4), [
    "$(versions) Adapter version 12", "$(symbol-ruler) Mean LoRA rank 7.25", "$(inbox) Queue depth 3", "$(pass) Acceptance rate 63%",
  ]);
  assert.equal(items[0].description, "session s1");
  assert.equal(items[3].description, "of 8 accepted or rejected");
  assert.deepEqual(actions(items), ["toggle", "reset", "fineTune", "dashboard"]);
  assert.match(items.find((i) => i.action === "toggle")!.label, /Disable/);
  assert.equal(items.find((i) => i.action === "dashboard")!.description, "http://127.0.0.1:8000/dashboard");
  assert.equal(items[4].kind, -1, "a separator between numbers and actions");
});

test("menu content: disabled, offline, no decisions yet, stats unavailable", () => {
  assert.match(menuItems({ ...READY, enabled: false }).find((i) => i.action === "toggle")!.label, /Enable/);
  const offline = menuItems({ state: "offline", serverUrl: "http://h:1" });
  assert.deepEqual(labels(offline).slice(0, 5), [
    "$(debug-disconnect) Offline", "$(versions) Adapter version -", "$(symbol-ruler) Mean LoRA rank -",
    "$(inbox) Queue depth 0", "$(pass) Acceptance rate -",
  ]);
  assert.deepEqual(actions(offline), ["toggle", "reset", "fineTune", "dashboard"], "actions stay available offline");
  const none = menuItems({ ...READY, acceptanceRate: null, decided: 0 })[3];
  assert.equal(none.label, "$(pass) Acceptance rate -");
  assert.match(none.description!, /no suggestion accepted or rejected yet/);
  assert.equal(menuItems({ ...READY, statsError: "HTTP 404" })[3].label, "$(pass) Acceptance rate unavailable");
});

test("dashboard URL: the key goes in the fragment", () => {
  assert.equal(dashboardUrl("http://h:8000/"), "http://h:8000/dashboard");
  assert.equal(dashboardUrl("http://h:8000", "k/1"), "http://h:8000/dashboard#key=k%2F1");
});

// -- the menu in the running extension ---------------------------------------------

let server: Server;
let url: string;
const seen: Array<{ path: string; auth?: string }> = [];

before(async () => {
  server = createServer((req: IncomingMessage, res) => {
    seen.push({ path: req.url ?? "", auth: req.headers.authorization });
    res.setHeader("content-type", "application/json");
    if (req.url === "/v1/sessions/s1/stats") {
      res.end(JSON.stringify({ object: "session.stats", session_id: "s1", adapter_version: 5,
        feedback: { accepted: 3, partially_accepted: 1, rejected: 4, acceptance_rate: 0.5 } }));
    } else if (req.method === "POST" && req.url === "/v1/fine_tuning/jobs") {
      res.end(JSON.stringify({ id: "job1", status: "succeeded", step: 4, total_steps: 4, adapter_name: "repo",
        fine_tuned_model: "base:repo", error: null }));
    } else {
      res.statusCode = 404;
      res.end(JSON.stringify({ error: { message: "not here" } }));
    }
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  url = `http://127.0.0.1:${(server.address() as { port: number }).port}`;
});

after(() => {
  server.close();
});

/** Pick the item of `action` in the next menu. */
const choose = (action: string) => {
  quickPick.pick = (items: PickItem[]) => (items as MenuItem[]).find((i) => i.action === action);
};

test("status bar click opens the menu with the server's acceptance rate; actions run", async () => {
  const saved = { ...settings };
  settings.serverUrl = url;
  settings.apiKeyEnvVar = "DYNARANK_TEST_MENU_KEY";
  process.env.DYNARANK_TEST_MENU_KEY = "env-key";
  const clients: FakeClient[] = [];
  const context = fakeContext();
  context.secretStore.set("dynarank.apiKey", "stored-key");
  await activate(context as never, (options) => {
    const c = new FakeClient();
    c.options = options;
    clients.push(c);
    return c as never;
  });
  try {
    assert.equal((clients[0].options as { apiKey?: string }).apiKey, "env-key", "the variable wins over the stored key");
    const item = statusItems.at(-1)!;
    assert.equal(item.command, "dynarank.showMenu");
    clients[0].emit("status", { type: "status", version: 3, queue_depth: 2, dropped: 0 });

    // Nothing chosen: the menu shows the numbers, fetched with the key.
    quickPick.pick = () => undefined;
    assert.equal(await registered.commands.get(item.command!)!(), undefined);
    const shown = quickPick.shown.at(-1)!.items as MenuItem[];
    assert.deepEqual(labels(shown).slice(0, 4), [
      "$(versions) Adapter version 5", "$(symbol-ruler) Mean LoRA rank 7.50", "$(inbox) Queue depth 2", "$(pass) Acceptance rate 50%",
    ]);
    assert.deepEqual(seen.at(-1), { path: "/v1/sessions/s1/stats", auth: "Bearer env-key" });

    choose("toggle");
    assert.equal(await registered.commands.get("dynarank.showMenu")!(), "toggle");
    assert.equal(settings.enable, false);
    assert.match(item.text, /dynarank off/);
    assert.match(menuItems({ ...READY, enabled: false }).find((i) => i.action === "toggle")!.label, /Enable/);
    await registered.commands.get("dynarank.toggle")!(); // the keybinding's command still works
    assert.equal(settings.enable, true);

    choose("dashboard");
    await registered.commands.get("dynarank.showMenu")!();
    assert.deepEqual(opened, [`${url}/dashboard#key=env-key`]);

    choose("reset");
    await registered.commands.get("dynarank.showMenu")!();
    assert.equal(clients.length, 2, "a new client");
    assert.equal((clients[1].options as { resumeToken?: string }).resumeToken, undefined, "a fresh session");

    choose("fineTune");
    await registered.commands.get("dynarank.showMenu")!();
    assert.ok(seen.some((s) => s.path === "/v1/fine_tuning/jobs"));
    assert.ok(messages.some((m) => /base:repo is ready/.test(m)), messages.join("\n"));

    // Without the variable the stored key is used; a failed stats fetch still shows the menu.
    delete process.env.DYNARANK_TEST_MENU_KEY;
    choose("none");
    server.closeAllConnections();
    settings.serverUrl = "http://127.0.0.1:1";
    await registered.commands.get("dynarank.resetSession")!();
    assert.equal((clients.at(-1)!.options as { apiKey?: string }).apiKey, "stored-key");
    await registered.commands.get("dynarank.showMenu")!();
    assert.equal((quickPick.shown.at(-1)!.items as MenuItem[])[3].label, "$(pass) Acceptance rate unavailable");
  } finally {
    for (const k of Object.keys(settings)) delete settings[k];
    Object.assign(settings, saved);
    delete process.env.DYNARANK_TEST_MENU_KEY;
    deactivate();
  }
});
