// The protocol client against a live `dynarank serve` (tiny model): hello,
// edits, a completion, cancel, an `adapted` event, resume.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { DynarankClient, ProtocolError } from "../src/client";
import type { Adapted } from "../src/protocol";
import { LiveServer } from "./live-server";

const V1 = "def area(width, height):\n    return width * height\n";
const TAIL = "\n\ndef perimeter(width, height):\n    total = 2 * (width + height)\n    return total\n";

let server: LiveServer;
const clients: DynarankClient[] = [];

function client(extra: Partial<ConstructorParameters<typeof DynarankClient>[0]> = {}): DynarankClient {
  const c = new DynarankClient({ server: server.url, ...extra });
  clients.push(c);
  return c;
}

function nextEvent<T>(c: DynarankClient, name: string, timeoutMs = 60_000): Promise<T> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no ${name} within ${timeoutMs} ms`)), timeoutMs);
    c.once(name, (msg: T) => {
      clearTimeout(timer);
      resolve(msg);
    });
  });
}

before(async () => {
  server = await LiveServer.start();
}, { timeout: 300_000 });

after(async () => {
  for (const c of clients) c.close();
  await server?.stop();
  assert.ok(!server.output.includes("Traceback"), server.output.slice(-3000));
});

test("hello, range edits, adapted event, completion at the cursor", { timeout: 120_000 }, async () => {
  const c = client({ repository: { id: "geo-node", root_name: "geo" } });
  const ready = await c.connect();
  assert.equal(ready.protocol, 1);
  assert.equal(ready.adapter_version, 0);
  assert.ok(ready.mean_rank > 0 && ready.model.endsWith(ready.session_id));
  c.open("geometry.py", V1, 1, "python");
  const adapted = nextEvent<Adapted>(c, "adapted");
  const end = { line: 2, character: 0 };
  c.editChanges("geometry.py", 2, [{ range: { start: end, end }, text: TAIL }], V1 + TAIL);
  const a = await adapted;
  assert.ok(a.version >= 1 && a.loss > 0 && a.mean_rank > 0 && Object.keys(a.ranks).length > 0);
  const status = await c.status();
  assert.deepEqual(status.documents, { "geometry.py": 2 });
  const deltas: string[] = [];
  const done = await c.complete({ path: "geometry.py", cursor: { line: 5, character: 4 }, max_tokens: 6 }, (t) => deltas.push(t)).done;
  assert.equal(done.text, deltas.join(""));
  assert.ok(["stop", "length"].includes(done.finish_reason));
  assert.ok(done.adapter_version >= a.version);
  assert.ok((await c.ping()) < 5000);
});

test("cancel stops generation", { timeout: 60_000 }, async () => {
  const c = client();
  await c.connect();
  let first!: () => void;
  const gotDelta = new Promise<void>((r) => (first = r));
  // raw: deltas token by token (shaped completions arrive a line at a time)
  const handle = c.complete({ prefix: "def main():\n", max_tokens: 400, temperature: 1.0, seed: 1, mode: "raw" },
                            () => first());
  await gotDelta;
  const t0 = Date.now();
  handle.cancel();
  const done = await handle.done;
  assert.equal(done.finish_reason, "cancelled");
  assert.ok(Date.now() - t0 < 2000);
  handle.cancel(); // after the end: a no-op
  assert.ok((await c.ping()) < 5000);
});

test("resume token joins the same session; errors are typed", { timeout: 60_000 }, async () => {
  const first = client();
  const ready = await first.connect();
  first.open("shared.py", "x = 1\n", 1);
  await first.status();
  const second = client({ resumeToken: ready.resume_token });
  const again = await second.connect();
  assert.equal(again.session_id, ready.session_id);
  assert.deepEqual(again.documents, { "shared.py": 1 });
  const bad = client({ resumeToken: "not-a-token", reconnect: false });
  await assert.rejects(bad.connect(), (e: unknown) => e instanceof ProtocolError && e.code === "invalid_resume_token");
  await assert.rejects(second.complete({ prefix: "x", max_tokens: 100000 }).done,
    (e: unknown) => e instanceof ProtocolError && e.code === "invalid_field");
});

test("an edit with more changes than the server takes in one message goes as the whole text", { timeout: 60_000 }, async () => {
  const c = client();
  await c.connect();
  const errors: unknown[] = [];
  c.on("server-error", (e) => errors.push(e));
  c.open("many.py", "x = 0\n", 1, "python");
  // 300 line breaks inserted at the start, one change each: past the server's 256 per message.
  const start = { line: 0, character: 0 };
  const changes = Array.from({ length: 300 }, () => ({ range: { start, end: start }, text: "\n" }));
  const text = "\n".repeat(300) + "x = 0\n";
  c.editChanges("many.py", 2, changes, text);
  const status = await c.status();
  assert.deepEqual(status.documents, { "many.py": 2 });
  // A cursor on line 300 exists only in the new text: the server holds it.
  const done = await c.complete({ path: "many.py", cursor: { line: 300, character: 0 }, max_tokens: 2 }).done;
  assert.ok(["stop", "length"].includes(done.finish_reason));
  assert.deepEqual(errors, []);
});
