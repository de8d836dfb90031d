// The VS Code-facing parts against the fake `vscode` module (no server).

import "./fake-vscode";
import assert from "node:assert/strict";
import { beforeEach, test } from "node:test";
import {
  CancellationTokenSource, FakeDocument, Position, events, fakeContext, fileUri, messages, output, registered, settings, statusItems, vscode,
} from "./fake-vscode";
import { activate, deactivate } from "../src/extension";
import { InlineProvider } from "../src/inline";
import type { Settings } from "../src/settings";
import { allowAll, FakeClient, noToken, opts } from "./fake-client";
import { statusText } from "../src/statusbar";
import { DocumentTracker, toRangeChanges } from "../src/tracker";
import { repositoryInfo } from "../src/repository";

beforeEach(() => {
  messages.length = 0;
  vscode.workspace.textDocuments = [];
});

test("range changes keep LSP shape", () => {
  const changes = toRangeChanges([{ range: new vscode.Range(new Position(1, 2), new Position(1, 5)), text: "xy", rangeOffset: 0, rangeLength: 3 } as never]);
  assert.deepEqual(changes, [{ range: { start: { line: 1, character: 2 }, end: { line: 1, character: 5 } }, text: "xy" }]);
});

test("tracker opens, edits with versions, closes, and skips non-file documents", () => {
  const client = new FakeClient();
  const tracker = new DocumentTracker(() => client as never, allowAll);
  const doc = new FakeDocument(fileUri("pkg/a.py"), "x = 1\n");
  events.open.fire(doc);
  events.open.fire(new FakeDocument(fileUri("a.py", "git"), "ignored"));
  events.open.fire(new FakeDocument({ scheme: "file", fsPath: "/elsewhere/b.py", path: "/elsewhere/b.py" }, "outside"));
  doc.text = "x = 12\n";
  doc.version = 2;
  const change = { range: new vscode.Range(new Position(0, 5), new Position(0, 5)), text: "2" };
  events.change.fire({ document: doc, contentChanges: [change] });
  events.change.fire({ document: doc, contentChanges: [] }); // dirty-state only: nothing to send
  events.close.fire(doc);
  assert.deepEqual(client.calls, [
    ["open", "pkg/a.py", "x = 1\n", 1, "python"],
    ["edit", "pkg/a.py", 2, [{ range: { start: { line: 0, character: 5 }, end: { line: 0, character: 5 } }, text: "2" }], "x = 12\n"],
    ["close", "pkg/a.py"],
  ]);
  tracker.dispose();
  events.open.fire(doc);
  assert.equal(client.calls.length, 3, "disposed tracker stops listening");
});

test("a change to a document the session has not seen opens it", () => {
  const client = new FakeClient();
  const tracker = new DocumentTracker(() => client as never, allowAll);
  const doc = new FakeDocument(fileUri("late.py"), "y = 2\n");
  doc.version = 4;
  events.change.fire({ document: doc, contentChanges: [{ range: new vscode.Range(new Position(0, 0), new Position(0, 0)), text: "" }] });
  assert.deepEqual(client.calls, [["open", "late.py", "y = 2\n", 4, "python"]]);
  tracker.dispose();
});

test("inline provider completes at the cursor from the session's mirror", async () => {
  const client = new FakeClient();
  client.documents.set("m.py", {});
  const provider = new InlineProvider(() => client as never, opts({ completionMode: "line" }), allowAll);
  const doc = new FakeDocument(fileUri("m.py"), "def add(a, b):\n    ");
  const items = await provider.provideInlineCompletionItems(doc as never, new Position(1, 4) as never, {} as never, new CancellationTokenSource().token as never);
  assert.equal(items.length, 1);
  assert.equal((items[0] as unknown as { insertText: string }).insertText, "return a + b");
  assert.deepEqual(client.calls[0], ["complete", { path: "m.py", cursor: { line: 1, character: 4 }, max_tokens: 8, mode: "line" }]);
  // Not in the mirror yet: the prefix is sent instead.
  const other = new FakeDocument(fileUri("n.py"), "import os\nos.");
  await provider.provideInlineCompletionItems(other as never, new Position(1, 3) as never, {} as never, new CancellationTokenSource().token as never);
  assert.deepEqual(client.calls[1], ["complete", { prefix: "import os\nos.", max_tokens: 8, mode: "line" }]);
});

test("inline provider cancels on the server when VS Code cancels, and is quiet offline", async () => {
  const client = new FakeClient();
  client.documents.set("m.py", {});
  const provider = new InlineProvider(() => client as never, opts({ completionMode: "line" }), allowAll);
  const doc = new FakeDocument(fileUri("m.py"), "x = ");
  const source = new CancellationTokenSource();
  const pending = provider.provideInlineCompletionItems(doc as never, new Position(0, 4) as never, {} as never, source.token as never);
  await new Promise((r) => setImmediate(r)); // past the (zero) debounce: the request is out
  assert.equal(client.calls.length, 1);
  source.cancel();
  assert.deepEqual(await pending, []);
  assert.equal(client.cancelled.length, 1);
  client.connected = false;
  assert.deepEqual(await provider.provideInlineCompletionItems(doc as never, new Position(0, 4) as never, {} as never, new CancellationTokenSource().token as never), []);
});

test("status text shows adapter version and mean rank", () => {
  assert.match(statusText({ state: "ready", version: 12, meanRank: 7.25 }), /v12 r\u0304 7\.3/);
  assert.match(statusText({ state: "offline" }), /offline/);
});

test("activate wires provider, commands, status bar and saves the session", async () => {
  const context = fakeContext();
  const clients: FakeClient[] = [];
  const factory = (options: unknown) => {
    const c = new FakeClient();
    c.options = options;
    clients.push(c);
    return c as never;
  };
  const open = new FakeDocument(fileUri("open.py"), "a = 1\n");
  vscode.workspace.textDocuments = [open];
  const ext = await activate(context as never, factory);
  assert.ok(registered.commands.has("dynarank.fineTuneRepository"));
  assert.ok(registered.commands.has("dynarank.resetSession"));
  assert.equal(registered.providers.length, 1);
  const item = statusItems[statusItems.length - 1];
  assert.ok(item.shown);
  assert.match(item.text, /v3 r\u0304 7\.5/);
  assert.deepEqual(clients[0].calls[0], ["open", "open.py", "a = 1\n", 1, "python"]);
  assert.deepEqual((clients[0].options as { repository: unknown }).repository, repositoryInfo("/home/user/fake-repo"));
  const key = `dynarank.session:${settings.serverUrl}`;
  assert.deepEqual(context.state.get(key), { sessionId: "s1", resumeToken: "t1" });
  clients[0].emit("adapted", { type: "adapted", version: 4, loss: 1.5, mean_rank: 6, ranks: {} });
  assert.match(item.text, /v4 r\u0304 6\.0/);
  clients[0].emit("disconnected");
  assert.match(item.text, /offline/);
  // A second start resumes with the saved token; resetSession starts fresh.
  await ext.start();
  assert.equal((clients[1].options as { resumeToken?: string }).resumeToken, "t1");
  await registered.commands.get("dynarank.resetSession")!();
  assert.equal((clients[2].options as { resumeToken?: string }).resumeToken, undefined);
  assert.deepEqual(clients[1].calls[clients[1].calls.length - 1], ["shutdown"]);
  deactivate();
  assert.ok(item.disposed);
});

test("feedback: shown with the item, accepted by its command, rejected when replaced", async () => {
  const { FeedbackTracker, ACCEPT_COMMAND } = await import("../src/feedback");
  const sent: string[] = [];
  const tracker = new FeedbackTracker((id, event) => sent.push(`${id}:${event}`), 20);
  const client = new FakeClient();
  client.documents.set("m.py", {});
  const provider = new InlineProvider(() => client as never, opts({ completionMode: "line" }), allowAll, { feedback: tracker });
  const doc = new FakeDocument(fileUri("m.py"), "x = ");
  const ask = () => provider.provideInlineCompletionItems(doc as never, new Position(0, 4) as never, {} as never, new CancellationTokenSource().token as never);
  const [item] = (await ask()) as unknown as Array<{ command: { command: string; arguments: string[] } }>;
  assert.equal(item.command.command, ACCEPT_COMMAND);
  assert.deepEqual(sent, ["x:shown"]);
  await ask(); // replaced: the first is rejected after the grace period, unless its command runs first
  tracker.accepted(item.command.arguments[0]);
  await new Promise((r) => setTimeout(r, 40));
  assert.deepEqual(sent, ["x:shown", "x:shown", "x:accepted"]);
  // Empty prefix (line 1, column 1) of a document the server does not mirror: the suffix goes instead.
  const fresh = new FakeDocument(fileUri("new.py"), "print(1)\n");
  await provider.provideInlineCompletionItems(fresh as never, new Position(0, 0) as never, {} as never, new CancellationTokenSource().token as never);
  assert.deepEqual(client.calls.at(-1), ["complete", { prefix: "", suffix: "print(1)\n", max_tokens: 8, mode: "line" }]);
  tracker.dismiss();
  await new Promise((r) => setTimeout(r, 40));
  assert.equal(sent.at(-1), "x:rejected");
  tracker.dispose();
});

test("debounce: a keystroke within the window cancels the pending request before it is sent", async () => {
  const client = new FakeClient();
  client.documents.set("m.py", {});
  const provider = new InlineProvider(() => client as never, opts({ debounceMs: 30, completionMode: "line" }), allowAll);
  const doc = new FakeDocument(fileUri("m.py"), "x = ");
  const first = new CancellationTokenSource();
  const pending = provider.provideInlineCompletionItems(doc as never, new Position(0, 4) as never, {} as never, first.token as never);
  await new Promise((r) => setTimeout(r, 5));
  first.cancel(); // VS Code cancels the older request when the user types on
  const second = provider.provideInlineCompletionItems(doc as never, new Position(0, 4) as never, {} as never, noToken());
  assert.deepEqual(await pending, []);
  assert.equal(client.calls.length, 0, "nothing is sent during the debounce");
  assert.equal((await second).length, 1);
  assert.equal(client.calls.filter((c) => c[0] === "complete").length, 1);
  assert.deepEqual(client.cancelled, [], "the first never reached the server, so there is nothing to cancel");
  // Without a cancel from VS Code, the newer request still wins.
  const a = provider.provideInlineCompletionItems(doc as never, new Position(0, 4) as never, {} as never, noToken());
  const b = provider.provideInlineCompletionItems(doc as never, new Position(0, 4) as never, {} as never, noToken());
  assert.deepEqual(await a, []);
  assert.equal((await b).length, 1);
  assert.equal(client.calls.filter((c) => c[0] === "complete").length, 2);
});

test("disabled, or a disabled language: no request; completion mode is sent", async () => {
  const client = new FakeClient();
  client.documents.set("m.py", {});
  client.documents.set("notes.md", {});
  let current: Partial<Settings> = { enable: false };
  const provider = new InlineProvider(() => client as never, () => opts(current)(), allowAll);
  const py = new FakeDocument(fileUri("m.py"), "x = ");
  const md = new FakeDocument(fileUri("notes.md"), "# x", "markdown");
  const ask = (doc: FakeDocument) => provider.provideInlineCompletionItems(doc as never, new Position(0, 3) as never, {} as never, noToken());
  assert.deepEqual(await ask(py), []);
  assert.deepEqual(client.calls, [], "disabled: nothing sent");
  current = {};
  assert.deepEqual(await ask(md), [], "markdown is off by default");
  assert.equal(client.calls.length, 0);
  current = { languages: { "*": false, markdown: true }, completionMode: "line" };
  assert.deepEqual(await ask(py), [], "\"*\" covers languages not listed");
  assert.equal((await ask(md)).length, 1);
  assert.deepEqual(client.calls, [["complete", { path: "notes.md", cursor: { line: 0, character: 3 }, max_tokens: 8, mode: "line" }]]);
});

test("toggle command flips dynarank.enable and the status bar; errors reach the output channel", async () => {
  const context = fakeContext();
  const clients: FakeClient[] = [];
  await activate(context as never, () => {
    const c = new FakeClient();
    clients.push(c);
    return c as never;
  });
  try {
    const item = statusItems.at(-1)!;
    assert.equal(item.command, "dynarank.showMenu", "clicking the status bar opens the menu");
    assert.match(item.text, /v3/);
    const log = output.get("dynarank")!;
    assert.ok(log.some((l) => /connected, session s1, adapter v3/.test(l)), log.join("\n"));

    const provider = registered.providers.at(-1) as InlineProvider;
    clients[0].documents.set("m.py", {});
    const doc = new FakeDocument(fileUri("m.py"), "x = ");
    const ask = () => provider.provideInlineCompletionItems(doc as never, new Position(0, 4) as never, {} as never, noToken());

    await registered.commands.get("dynarank.toggle")!();
    assert.equal(settings.enable, false);
    assert.match(item.text, /dynarank off/);
    assert.deepEqual(await ask(), []);
    assert.ok(!clients[0].calls.some((c) => c[0] === "complete"), "disabled: no completion request");

    await registered.commands.get("dynarank.toggle")!();
    assert.equal(settings.enable, true);
    assert.match(item.text, /v3/);

    // A failed request and a pushed server error are logged.
    settings.debounceMs = 0;
    clients[0].complete = () => ({ id: "c", done: Promise.reject(new Error("boom")), cancel: () => undefined }) as never;
    assert.deepEqual(await ask(), []);
    clients[0].emit("server-error", { type: "error", code: "unknown_document", message: "no such document", ref: "edit" });
    clients[0].emit("disconnected");
    assert.ok(log.some((l) => /completion failed: boom/.test(l)), log.join("\n"));
    assert.ok(log.some((l) => /server error unknown_document \(edit\): no such document/.test(l)));
    assert.ok(log.some((l) => /disconnected; reconnecting/.test(l)));
  } finally {
    delete settings.enable;
    delete settings.debounceMs;
    deactivate();
  }
});
