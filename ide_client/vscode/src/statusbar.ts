// The status bar item: adapter version and current mean rank of the session, or
// "off" when completions are disabled. Clicking it opens the menu (menu.ts).

import * as vscode from "vscode";
import { MENU_COMMAND } from "./menu";

export const TOGGLE_COMMAND = "dynarank.toggle";

export interface SessionView {
  state: "connecting" | "ready" | "offline";
  version?: number;
  meanRank?: number;
  loss?: number;
  queue?: number;
  sessionId?: string;
  /** Inline completions on (the `dynarank.enable` setting); undefined counts as on. */
  enabled?: boolean;
}

export function statusText(v: SessionView): string {
  if (v.enabled === false) return "$(circle-slash) dynarank off";
  if (v.state === "connecting") return "$(sync~spin) dynarank";
  if (v.state === "offline") return "$(debug-disconnect) dynarank offline";
  const rank = v.meanRank !== undefined ? ` r\u0304 ${v.meanRank.toFixed(1)}` : "";
  const queue = v.queue ? ` \u23f3${v.queue}` : "";
  return `$(sparkle) dynarank v${v.version ?? 0}${rank}${queue}`;
}

export function statusTooltip(v: SessionView): string {
  const lines = [`dynarank session ${v.sessionId ?? "-"}`, `adapter version ${v.version ?? 0}`];
  if (v.meanRank !== undefined) lines.push(`mean LoRA rank ${v.meanRank.toFixed(2)}`);
  if (v.loss !== undefined) lines.push(`last adaptation loss ${v.loss.toFixed(4)}`);
  if (v.queue !== undefined) lines.push(`queued training examples ${v.queue}`);
  lines.push(v.enabled === false ? "Inline completions off (Ctrl+Alt+D toggles)" : "Ctrl+Alt+D toggles inline completions");
  lines.push("Click for the dynarank menu");
  return lines.join("\n");
}

export class StatusView implements vscode.Disposable {
  readonly item: vscode.StatusBarItem;
  view: SessionView = { state: "connecting" };

  constructor() {
    this.item = vscode.window.createStatusBarItem(vscode.StatusBarAlignment.Right, 100);
    this.item.command = MENU_COMMAND;
    this.render();
    this.item.show();
  }

  update(patch: Partial<SessionView>): void {
    this.view = { ...this.view, ...patch };
    this.render();
  }

  private render(): void {
    this.item.text = statusText(this.view);
    this.item.tooltip = statusTooltip(this.view);
  }

  dispose(): void {
    this.item.dispose();
  }
}
