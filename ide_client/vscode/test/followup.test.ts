// The first line at once, the whole block after it: request order, the kept
// block, the re-trigger, and cancelling the background request.

import "./fake-vscode";
import assert from "node:assert/strict";
import { beforeEach, test } from "node:test";
import { FakeDocument, Position, executed, fileUri, vscode } from "./fake-vscode";
import { FeedbackTracker } from "../src/feedback";
import { InlineProvider, TRIGGER_COMMAND } from "../src/inline";
import { allowAll, FakeClient, noToken, opts, tick, type Reply } from "./fake-client";

const LINE: Reply = { text: "if x:", finish_reason: "stop", completion_id: "L" };
const BLOCK: Reply = { text: "if x:\n    return 1", finish_reason: "stop", completion_id: "B" };

function setup(mode: "block" | "line" = "block") {
  const client = new FakeClient();
  client.auto = false;
  client.respond = (o) => (o.mode === "line" ? LINE : BLOCK);
  client.documents.set("m.py", {});
  const sent: string[] = [];
  const feedback = new FeedbackTracker((id, event) => sent.push(`${id}:${event}`), 20);
  const provider = new InlineProvider(() => client as never, opts({ completionMode: mode }), allowAll, { feedback });
  const doc = new FakeDocument(fileUri("m.py"), "def f(x):\n    ");
  const at = new Position(1, 4);
  vscode.window.activeTextEditor = { document: doc, selection: { active: at, isEmpty: true } };
  const ask = (position = at) => provider.provideInlineCompletionItems(doc as never, position as never, {} as never, noToken());
  const texts = (items: unknown[]) => items.map((i) => (i as { insertText: string }).insertText);
  return { client, sent, feedback, provider, doc, at, ask, texts };
}

beforeEach(() => {
  executed.length = 0;
});

test("block mode: the first line is shown at once, the block follows and re-triggers the suggestion", async () => {
  const { client, sent, feedback, ask, texts } = setup();
  const first = ask();
  await tick();
  assert.deepEqual(client.modes, ["line"], "the short request goes first, alone");
  client.requests[0].release();
  assert.deepEqual(texts(await first), ["if x:"], "shown before the block exists");
  assert.deepEqual(client.modes, ["line", "block"], "then the block, in the background");
  assert.deepEqual(client.requests[1].options, { path: "m.py", cursor: { line: 1, character: 4 }, max_tokens: 8, mode: "block" });
  assert.deepEqual(executed, [], "nothing to re-trigger yet");

  client.requests[1].release();
  await tick();
  assert.deepEqual(executed, [TRIGGER_COMMAND]);
  // VS Code asks again at the same spot: the kept block, with no new request.
  assert.deepEqual(texts(await ask()), ["if x:\n    return 1"]);
  assert.equal(client.requests.length, 2);
  await tick(40);
  assert.deepEqual(sent, ["L:shown", "B:shown"], "the superseded first line is not reported rejected");
  // Kept once: the next call is a new request.
  const again = ask();
  await tick();
  assert.deepEqual(client.modes, ["line", "block", "line"]);
  client.requests[2].release();
  await again;
  feedback.dispose();
});

test("the next keystroke cancels the background block; a late block is dropped", async () => {
  const { client, doc, ask, texts, provider } = setup();
  const first = ask();
  await tick();
  client.requests[0].release();
  await first;
  assert.ok(provider.followUp.busy);
  // The user types: a new document version, a new request.
  doc.text += "r";
  doc.version = 2;
  const second = ask(new Position(1, 5));
  assert.equal(client.requests[1].cancelled, true, "the background block is cancelled on the server");
  assert.deepEqual(client.cancelled, ["c2"]);
  assert.ok(!provider.followUp.busy);
  await tick();
  client.requests[2].release({ text: "eturn x", finish_reason: "stop", completion_id: "L2" });
  assert.deepEqual(texts(await second), ["eturn x"]);
  assert.deepEqual(client.modes, ["line", "block", "line", "block"]);
  // A document change event cancels it too (the extension wires this).
  provider.followUp.cancelFor(doc);
  assert.equal(client.requests[3].cancelled, true);
  client.requests[3].release(BLOCK); // too late: already settled as cancelled
  await tick();
  assert.deepEqual(executed, [], "no re-trigger for a cancelled block");
});

test("the block is dropped when the cursor moved, equals the line, or is hidden", async () => {
  for (const [name, block, moveCursor] of [
    ["cursor moved", BLOCK, true],
    ["same as the line", { ...BLOCK, text: "if x:\n" }, false],
    ["hidden by the gate", { ...BLOCK, hidden: true }, false],
  ] as const) {
    executed.length = 0;
    const { client, ask, at } = setup();
    const first = ask();
    await tick();
    client.requests[0].release();
    await first;
    if (moveCursor) vscode.window.activeTextEditor = { document: {}, selection: { active: at, isEmpty: true } }; // another editor
    client.requests[1].release(block);
    await tick();
    assert.deepEqual(executed, [], name);
    const next = ask();
    await tick();
    assert.equal(client.requests.length, 3, `${name}: nothing kept, a new request`);
    client.requests[2].release();
    await next;
  }
});

test("line mode: one request, no background block", async () => {
  const { client, ask, texts } = setup("line");
  const first = ask();
  await tick();
  client.requests[0].release();
  assert.deepEqual(texts(await first), ["if x:"]);
  await tick();
  assert.deepEqual(client.modes, ["line"]);
});

test("no block is asked for when the first line shows nothing", async () => {
  const { client, ask } = setup();
  const first = ask();
  await tick();
  client.requests[0].release({ text: "", finish_reason: "stop" });
  assert.deepEqual(await first, []);
  assert.deepEqual(client.modes, ["line"]);
});
