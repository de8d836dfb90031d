// A dynarank session over the IDE websocket: hello/resume, document mirror,
// streaming completions with cancel, and reconnect with backoff.
// No vscode import: the extension wraps it, and node's test runner drives it
// against a live server.

import { EventEmitter } from "events";
import WebSocket from "ws";
import * as P from "./protocol";

export interface Backoff { initialMs: number; maxMs: number; factor: number; maxAttempts: number }

export interface ClientOptions {
  server: string;
  apiKey?: string;
  sessionId?: string;
  resumeToken?: string;
  repository?: { id: string; root_name: string };
  reconnect?: boolean;
  backoff?: Partial<Backoff>;
  openTimeoutMs?: number;
}

export class ProtocolError extends Error {
  constructor(public code: string, message: string) {
    super(`${code}: ${message}`);
  }
}

export class ConnectionLost extends Error {}

interface Doc { version: number; text?: string; language?: string }

export interface CompletionHandle {
  id: string;
  /** Resolves with the final message; rejects on an error or a lost connection. */
  done: Promise<P.CompletionDone>;
  cancel(): void;
}

interface Pending { onDelta?: (text: string) => void; resolve: (m: P.CompletionDone) => void; reject: (e: Error) => void }

const DEFAULT_BACKOFF: Backoff = { initialMs: 250, maxMs: 10_000, factor: 2, maxAttempts: Infinity };
// Hello failures that retrying with the same credentials cannot fix.
const FATAL = new Set(["unauthorized", "unsupported_protocol", "invalid_session_id"]);

export class DynarankClient extends EventEmitter {
  ready?: P.Ready;
  sessionId?: string;
  resumeToken?: string;
  lastAdapted?: P.Adapted;
  readonly documents = new Map<string, Doc>();
  private ws?: WebSocket;
  private closing = false;
  private nextId = 1;
  private pending = new Map<string, Pending>();
  private waiters: Array<{ match: (m: P.ServerMessage) => boolean; resolve: (m: P.ServerMessage) => void; reject: (e: Error) => void }> = [];
  private backoff: Backoff;
  private reconnectTimer?: NodeJS.Timeout;

  constructor(private options: ClientOptions) {
    super();
    this.sessionId = options.sessionId;
    this.resumeToken = options.resumeToken;
    this.backoff = { ...DEFAULT_BACKOFF, ...options.backoff };
  }

  get connected(): boolean {
    return this.ws?.readyState === WebSocket.OPEN && this.ready !== undefined;
  }

  // -- connecting ------------------------------------------------------------

  async connect(): Promise<P.Ready> {
    this.closing = false;
    return this.handshake(false);
  }

  close(): void {
    this.closing = true;
    if (this.reconnectTimer) clearTimeout(this.reconnectTimer);
    this.ws?.close();
    this.failPending(new ConnectionLost("client closed"));
  }

  private async handshake(retryFresh: boolean): Promise<P.Ready> {
    let ready: P.Ready;
    try {
      ready = await this.hello(this.sessionId, this.resumeToken);
    } catch (err) {
      if (!(retryFresh && err instanceof ProtocolError && err.code === "invalid_resume_token")) throw err;
      // The server lost the session (new data dir): start a new one rather than stall the editor.
      ready = await this.hello(undefined, undefined);
    }
    this.ready = ready;
    this.sessionId = ready.session_id;
    this.resumeToken = ready.resume_token;
    this.replayDocuments(ready);
    return ready;
  }

  private hello(sessionId?: string, resumeToken?: string): Promise<P.Ready> {
    return new Promise((resolve, reject) => {
      const ws = new WebSocket(P.wsUrl(this.options.server), { handshakeTimeout: this.options.openTimeoutMs ?? 10_000 });
      let settled = false;
      const fail = (err: Error) => {
        if (settled) return;
        settled = true;
        ws.removeAllListeners();
        ws.on("error", () => undefined);
        ws.terminate();
        reject(err);
      };
      ws.once("error", fail);
      ws.once("close", () => fail(new ConnectionLost("closed during hello")));
      ws.once("open", () => {
        ws.send(JSON.stringify(P.hello({
          apiKey: this.options.apiKey, sessionId, resumeToken, repository: this.options.repository,
        })));
      });
      ws.once("message", (data) => {
        const msg = P.parse(data.toString());
        if (msg?.type === "error") return fail(new ProtocolError(msg.code, msg.message));
        if (msg?.type !== "ready") return fail(new ProtocolError("unexpected_message", `expected ready, got ${data}`));
        settled = true;
        ws.removeAllListeners();
        this.ws = ws;
        ws.on("message", (frame) => this.dispatch(frame.toString()));
        ws.on("close", () => this.onClose(ws));
        ws.on("error", () => undefined); // "close" follows and handles it
        resolve(msg);
      });
    });
  }

  private replayDocuments(ready: P.Ready): void {
    // A restarted server forgets open documents: re-open what it no longer has.
    for (const [path, doc] of this.documents) {
      const serverVersion = ready.documents[path];
      if (serverVersion === undefined && doc.text !== undefined) {
        this.rawSend(P.open(path, doc.text, doc.version, doc.language));
      } else if (serverVersion !== undefined && serverVersion < doc.version && doc.text !== undefined) {
        this.rawSend(P.editText(path, doc.version, doc.text));
      } else if (serverVersion !== undefined && serverVersion > doc.version) {
        doc.version = serverVersion;
      }
    }
  }

  private onClose(ws: WebSocket): void {
    if (ws !== this.ws) return;
    this.ready = undefined;
    this.failPending(new ConnectionLost("connection to the server was lost"));
    if (this.closing) return;
    this.emit("disconnected");
    if (this.options.reconnect !== false) this.scheduleReconnect(1, this.backoff.initialMs);
  }

  private scheduleReconnect(attempt: number, delayMs: number): void {
    if (this.closing || attempt > this.backoff.maxAttempts) {
      if (!this.closing) this.emit("fatal", new ConnectionLost(`gave up after ${attempt - 1} attempts`));
      return;
    }
    const jittered = delayMs * (0.8 + Math.random() * 0.4); // spread clients of one restarted server
    this.reconnectTimer = setTimeout(async () => {
      try {
        const ready = await this.handshake(true);
        this.emit("reconnected", ready, attempt);
      } catch (err) {
        if (err instanceof ProtocolError && FATAL.has(err.code)) {
          this.emit("fatal", err);
          return;
        }
        this.scheduleReconnect(attempt + 1, Math.min(this.backoff.maxMs, delayMs * this.backoff.factor));
      }
    }, jittered);
  }

  private failPending(err: Error): void {
    for (const p of this.pending.values()) p.reject(err);
    this.pending.clear();
    for (const w of this.waiters) w.reject(err);
    this.waiters = [];
  }

  // -- incoming --------------------------------------------------------------

  private dispatch(raw: string): void {
    const msg = P.parse(raw);
    if (msg === null) return;
    if (msg.type === "completion.delta" || msg.type === "completion.done") {
      const p = this.pending.get(msg.id);
      if (!p) return;
      if (msg.type === "completion.delta") p.onDelta?.(msg.text);
      else {
        this.pending.delete(msg.id);
        p.resolve(msg);
      }
      return;
    }
    if (msg.type === "error" && typeof msg.ref === "string" && this.pending.has(msg.ref)) {
      const p = this.pending.get(msg.ref)!;
      this.pending.delete(msg.ref);
      p.reject(new ProtocolError(msg.code, msg.message));
      return;
    }
    if (msg.type === "error" && msg.code === "unknown_completion" && !this.waiters.some((w) => w.match(msg))) return; // cancel crossed the end
    if (msg.type === "adapted") this.lastAdapted = msg;
    const matched = this.waiters.filter((w) => w.match(msg));
    this.waiters = this.waiters.filter((w) => !matched.includes(w));
    for (const w of matched) w.resolve(msg);
    // Replies to our own requests (pong, ack, status with id) are not events.
    const reply = msg.type === "pong" || msg.type === "ack" || (msg.type === "status" && msg.id !== undefined);
    if (!reply) this.emit(msg.type === "error" ? "server-error" : msg.type, msg);
  }

  // -- outgoing --------------------------------------------------------------

  private rawSend(msg: object): boolean {
    if (this.ws?.readyState !== WebSocket.OPEN) return false;
    this.ws.send(JSON.stringify(msg));
    return true;
  }

  private send(msg: object): void {
    if (!this.connected || !this.rawSend(msg)) throw new ConnectionLost("not connected to the server");
  }

  // Document messages update the mirror first; when offline the resume handshake replays them.
  open(path: string, text: string, version: number, language?: string): void {
    this.documents.set(path, { version, text, language });
    if (this.connected) this.rawSend(P.open(path, text, version, language));
  }

  /** LSP-style range changes; newText (the document after them) lets a reconnect re-open it. */
  editChanges(path: string, version: number, changes: P.RangeChange[], newText?: string): void {
    const doc = this.mirror(path, version, newText);
    if (!this.connected) return;
    // The server refuses more changes than it applies per message (too_many_changes): send the text.
    if (changes.length > P.MAX_EDIT_CHANGES && newText !== undefined) this.rawSend(P.editText(path, doc.version, newText));
    else this.rawSend(P.editChanges(path, doc.version, changes));
  }

  editText(path: string, version: number, text: string): void {
    const doc = this.mirror(path, version, text);
    if (this.connected) this.rawSend(P.editText(path, doc.version, text));
  }

  private mirror(path: string, version: number, text?: string): Doc {
    const doc = this.documents.get(path);
    if (!doc) throw new Error(`${path} is not open`);
    doc.version = version;
    doc.text = text;
    return doc;
  }

  closeDocument(path: string): void {
    this.documents.delete(path);
    if (this.connected) this.rawSend(P.close(path));
  }

  complete(options: P.CompleteOptions, onDelta?: (text: string) => void): CompletionHandle {
    const id = `c${this.nextId++}`;
    const done = new Promise<P.CompletionDone>((resolve, reject) => {
      this.pending.set(id, { onDelta, resolve, reject });
    });
    try {
      this.send(P.complete(id, options));
    } catch (err) {
      this.pending.get(id)?.reject(err as Error);
      this.pending.delete(id);
    }
    return {
      id, done,
      cancel: () => {
        if (this.pending.has(id)) this.rawSend(P.cancel(id));
      },
    };
  }

  private request<T extends P.ServerMessage>(msg: object, match: (m: P.ServerMessage) => boolean, timeoutMs: number): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiters = this.waiters.filter((w) => w.resolve !== done);
        reject(new Error(`no reply within ${timeoutMs} ms`));
      }, timeoutMs);
      const done = (m: P.ServerMessage) => {
        clearTimeout(timer);
        resolve(m as T);
      };
      this.waiters.push({ match, resolve: done, reject: (e) => { clearTimeout(timer); reject(e); } });
      try {
        this.send(msg);
      } catch (err) {
        clearTimeout(timer);
        this.waiters = this.waiters.filter((w) => w.resolve !== done);
        reject(err);
      }
    });
  }

  status(timeoutMs = 30_000): Promise<P.Status> {
    // The reply echoes our id (pushed statuses have none); a server from before status ids
    // is recognised by the documents only its replies carry.
    const id = `s${this.nextId++}`;
    return this.request<P.Status>(P.status(id), (m) => (m.type === "status" && (m.id === id ||
      (m.id === undefined && m.documents !== undefined))) || (m.type === "error" && m.ref === id), timeoutMs)
      .then((m) => { if ((m as P.ServerMessage).type === "error") throw this.protocolError(m); return m; });
  }

  /** Report what became of a completion; rejects with ProtocolError if the server refuses it. */
  feedback(completionId: string, event: P.FeedbackEvent, acceptedText?: string, timeoutMs = 30_000): Promise<P.Ack> {
    const id = `f${this.nextId++}`;
    return this.request<P.Ack>(P.feedback(completionId, event, acceptedText, id),
      (m) => (m.type === "ack" || m.type === "error") && (m.type === "ack" ? m.id : m.ref) === id, timeoutMs)
      .then((m) => { if ((m as P.ServerMessage).type === "error") throw this.protocolError(m); return m; });
  }

  private protocolError(m: unknown): ProtocolError {
    const e = m as P.ErrorMessage;
    return new ProtocolError(e.code, e.message);
  }

  async ping(timeoutMs = 10_000): Promise<number> {
    const id = `p${this.nextId++}`;
    const t0 = Date.now();
    await this.request(P.ping(id), (m) => m.type === "pong" && m.id === id, timeoutMs);
    return Date.now() - t0;
  }
}
