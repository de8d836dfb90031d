// A stand-in for DynarankClient: records what it is sent; completions answer
// after a few milliseconds, or when the test releases them (auto = false).

import { EventEmitter } from "node:events";
import { CancellationTokenSource } from "./fake-vscode";
import { DEFAULTS, type Settings } from "../src/settings";
import type { Policy } from "../src/tracker";

export interface Reply { text: string; finish_reason: string; completion_id?: string; hidden?: boolean }

export interface FakeRequest {
  id: string;
  options: { mode?: string; [k: string]: unknown };
  cancelled: boolean;
  /** Answer now (with `respond`'s reply unless given one). */
  release(reply?: Reply): void;
}

export class FakeClient extends EventEmitter {
  connected = true;
  documents = new Map<string, unknown>();
  calls: unknown[][] = [];
  cancelled: string[] = [];
  requests: FakeRequest[] = [];
  reply: Reply = { text: "return a + b", finish_reason: "stop" };
  /** The reply to a request, by default `reply` whatever the mode. */
  respond = (_options: FakeRequest["options"]): Reply => this.reply;
  auto = true;
  options: unknown;
  open(...a: unknown[]) { this.calls.push(["open", ...a]); this.documents.set(a[0] as string, {}); }
  editChanges(...a: unknown[]) { this.calls.push(["edit", ...a]); }
  closeDocument(p: string) { this.calls.push(["close", p]); this.documents.delete(p); }
  close() { this.calls.push(["shutdown"]); }
  async connect() {
    return { type: "ready", session_id: "s1", resume_token: "t1", adapter_version: 3, mean_rank: 7.5, documents: {} };
  }
  complete(options: FakeRequest["options"]) {
    this.calls.push(["complete", options]);
    const id = `c${this.requests.length + 1}`;
    let settle!: (reply: Reply) => void;
    const done = new Promise<Reply>((r) => { settle = r; })
      .then((reply) => ({ type: "completion.done", id, adapter_version: 3, completion_id: "x", ...reply }));
    const request: FakeRequest = { id, options, cancelled: false, release: (reply) => settle(reply ?? this.respond(options)) };
    this.requests.push(request);
    if (this.auto) setTimeout(() => request.release(), 5);
    return {
      id, done,
      cancel: () => {
        this.cancelled.push(id);
        request.cancelled = true;
        settle({ text: "", finish_reason: "cancelled" });
      },
    };
  }
  /** The completion requests sent, as their modes. */
  get modes(): Array<string | undefined> {
    return this.requests.map((r) => r.options.mode);
  }
}

/** Provider settings for tests: no debounce unless a test asks for one. */
export const opts = (patch: Partial<Settings> = {}) => () => ({ ...DEFAULTS, maxTokens: 8, debounceMs: 0, ...patch });
export const noToken = () => new CancellationTokenSource().token as never;
/** A policy that lets every document through (privacy has its own tests). */
export const allowAll: Policy = { reason: () => undefined, affectedBy: () => false, reload: () => undefined };
export const tick = (ms = 0) => new Promise((r) => setTimeout(r, ms));
