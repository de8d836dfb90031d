// Messages of the dynarank IDE websocket, protocol 1 (server/app/ws/ is the reference).
// Plain TypeScript: no vscode import, so node's test runner can load it.

export const PROTOCOL = 1;

export interface Position { line: number; character: number }
export interface Range { start: Position; end: Position }
export interface RangeChange { range: Range; text: string }

export interface Ready {
  type: "ready"; protocol: number; session_id: string; resume_token: string;
  adapter_version: number; ranks: Record<string, number>; mean_rank: number;
  model: string; documents: Record<string, number>; origin: string | null;
}
export interface Adapted { type: "adapted"; version: number; loss: number; ranks: Record<string, number>; mean_rank: number }
export interface Status {
  type: "status"; version: number; queue_depth: number; dropped: number; documents?: Record<string, number>;
  id?: string | number; // only on the reply to a status request that carried an id
}
export interface CompletionDelta { type: "completion.delta"; id: string; text: string }
export interface CompletionDone {
  type: "completion.done"; id: string; text: string; adapter_version: number;
  finish_reason: "stop" | "length" | "cancelled" | string; completion_id: string; model?: string;
  confidence?: { mean_logprob: number; first_token_prob: number } | null;
  hidden?: boolean;
}
/** Reply to open/edit/close/feedback messages that carried an id. */
export interface Ack {
  type: "ack"; ref: string; id: string | number; path?: string; version?: number;
  completion_id?: string; event?: string; adapter_version?: number;
}
export interface ErrorMessage { type: "error"; code: string; message: string; ref?: string | number }
export interface Pong { type: "pong"; id?: string | number }

export type ServerMessage = Ready | Adapted | Status | CompletionDelta | CompletionDone | Ack | ErrorMessage | Pong;

const KNOWN = new Set(["ready", "adapted", "status", "completion.delta", "completion.done", "ack", "error", "pong"]);

/** Decode one frame; null for anything that is not a known server message (ignored, not fatal). */
export function parse(raw: string): ServerMessage | null {
  let value: unknown;
  try {
    value = JSON.parse(raw);
  } catch {
    return null;
  }
  if (typeof value !== "object" || value === null) return null;
  const type = (value as { type?: unknown }).type;
  return typeof type === "string" && KNOWN.has(type) ? (value as ServerMessage) : null;
}

// -- outgoing ------------------------------------------------------------------

export interface HelloOptions {
  apiKey?: string; sessionId?: string; resumeToken?: string;
  repository?: { id: string; root_name: string }; clientName?: string; clientVersion?: string;
}

function compact<T extends object>(msg: T): T {
  return Object.fromEntries(Object.entries(msg).filter(([, v]) => v !== undefined && v !== null)) as T;
}

export function hello(o: HelloOptions = {}) {
  return compact({
    type: "hello", protocol: PROTOCOL, api_key: o.apiKey, session_id: o.sessionId, resume_token: o.resumeToken,
    repository: o.repository, client: { name: o.clientName ?? "dynarank-vscode", version: o.clientVersion ?? "0.1.0" },
  });
}

export function open(path: string, text: string, version: number, language?: string) {
  return compact({ type: "open", path, text, version, language });
}

export function editText(path: string, version: number, text: string) {
  return { type: "edit", path, version, text };
}

/** The server's default --max-edit-changes: more changes in one edit are refused. */
export const MAX_EDIT_CHANGES = 256;

export function editChanges(path: string, version: number, changes: RangeChange[]) {
  return { type: "edit", path, version, changes };
}

export function close(path: string) {
  return { type: "close", path };
}

export interface CompleteOptions {
  prefix?: string; suffix?: string; path?: string; cursor?: Position;
  max_tokens?: number; temperature?: number; top_p?: number; stop?: string | string[]; seed?: number;
  /** "block" (the server's default), "line", or "raw" (no healing or shaping: deltas token by token). */
  mode?: "block" | "line" | "raw";
}

export function complete(id: string, o: CompleteOptions) {
  return compact({ type: "complete", id, ...o });
}

export function cancel(id: string) {
  return { type: "cancel", id };
}

export function status(id?: string) {
  return compact({ type: "status", id });
}

export type FeedbackEvent = "shown" | "accepted" | "partially_accepted" | "rejected";

export function feedback(completionId: string, event: FeedbackEvent, acceptedText?: string, id?: string) {
  return compact({ type: "feedback", completion_id: completionId, event, accepted_text: acceptedText, id });
}

export function ping(id?: string) {
  return compact({ type: "ping", id });
}

/** The websocket URL for a server URL as users type it (http://host:port). */
export function wsUrl(server: string): string {
  const url = new URL(server.includes("://") ? server : `http://${server}`);
  if (url.protocol === "http:") url.protocol = "ws:";
  if (url.protocol === "https:") url.protocol = "wss:";
  const path = url.pathname.replace(/\/+$/, "");
  url.pathname = path.endsWith("/v1/ws") ? path : `${path.replace(/\/v1$/, "")}/v1/ws`;
  url.search = "";
  return url.toString();
}
