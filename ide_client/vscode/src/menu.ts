// The status-bar menu: the session's numbers (adapter version, mean rank,
// training queue, acceptance rate) and the actions. menuItems is a pure
// function of the stats, so tests can check the content without a server.

import * as vscode from "vscode";
import type { SessionView } from "./statusbar";

export const MENU_COMMAND = "dynarank.showMenu";

export type MenuAction = "toggle" | "reset" | "fineTune" | "dashboard";

export interface MenuStats extends SessionView {
  serverUrl: string;
  /** From GET /v1/sessions/{id}/stats: null until a suggestion was accepted or rejected. */
  acceptanceRate?: number | null;
  /** Accepted, partially accepted and rejected suggestions together. */
  decided?: number;
  /** Why the acceptance rate could not be fetched. */
  statsError?: string;
}

export interface MenuItem extends vscode.QuickPickItem {
  action?: MenuAction;
}

/** The dashboard page; with an API key it goes in the fragment, which the browser never sends. */
export function dashboardUrl(serverUrl: string, apiKey?: string): string {
  const base = `${serverUrl.replace(/\/+$/, "")}/dashboard`;
  return apiKey ? `${base}#key=${encodeURIComponent(apiKey)}` : base;
}

function acceptance(s: MenuStats): MenuItem {
  const label = "$(pass) Acceptance rate";
  if (s.statsError !== undefined) return { label: `${label} unavailable`, description: s.statsError };
  if (s.acceptanceRate === undefined) return { label: `${label} -` };
  if (s.acceptanceRate === null) return { label: `${label} -`, description: "no suggestion accepted or rejected yet" };
  const of = s.decided !== undefined ? `of ${s.decided} accepted or rejected` : undefined;
  return { label: `${label} ${Math.round(100 * s.acceptanceRate)}%`, description: of };
}

export function menuItems(s: MenuStats): MenuItem[] {
  const items: MenuItem[] = [];
  if (s.state !== "ready") {
    items.push({ label: s.state === "offline" ? "$(debug-disconnect) Offline" : "$(sync~spin) Connecting", description: s.serverUrl });
  }
  items.push(
    { label: `$(versions) Adapter version ${s.version ?? "-"}`, description: s.sessionId ? `session ${s.sessionId}` : undefined },
    { label: `$(symbol-ruler) Mean LoRA rank ${s.meanRank !== undefined ? s.meanRank.toFixed(2) : "-"}` },
    { label: `$(inbox) Queue depth ${s.queue ?? 0}`, description: "edits waiting to train the adapter" },
    acceptance(s),
    { label: "", kind: vscode.QuickPickItemKind.Separator },
    s.enabled === false
      ? { label: "$(check) Enable inline completions", description: "Ctrl+Alt+D", action: "toggle" }
      : { label: "$(circle-slash) Disable inline completions", description: "Ctrl+Alt+D", action: "toggle" },
    { label: "$(debug-restart) Reset session", description: "start a fresh adapter", action: "reset" },
    { label: "$(repo) Fine-tune on this repository", action: "fineTune" },
    { label: "$(link-external) Open dashboard", description: dashboardUrl(s.serverUrl), action: "dashboard" },
  );
  return items;
}
