// The `dynarank.*` settings the extension reads on every use, so changes apply
// without a reload. Defaults match package.json's contributes.configuration.

import * as vscode from "vscode";

export type CompletionMode = "block" | "line";

export interface Settings {
  enable: boolean;
  /** languageId -> enabled; "*" is the fallback for languages not listed. */
  languages: Record<string, boolean>;
  debounceMs: number;
  maxTokens: number;
  completionMode: CompletionMode;
}

export const DEFAULTS: Settings = {
  enable: true,
  languages: { "*": true, plaintext: false, markdown: false },
  debounceMs: 150,
  maxTokens: 48,
  completionMode: "block",
};

export function readSettings(): Settings {
  const c = vscode.workspace.getConfiguration("dynarank");
  const num = (key: string, fallback: number) => {
    const v = c.get<number>(key);
    return typeof v === "number" && Number.isFinite(v) ? v : fallback;
  };
  return {
    enable: c.get<boolean>("enable") ?? DEFAULTS.enable,
    languages: c.get<Record<string, boolean>>("languages") ?? DEFAULTS.languages,
    debounceMs: Math.max(0, num("debounceMs", DEFAULTS.debounceMs)),
    maxTokens: Math.max(1, num("maxTokens", DEFAULTS.maxTokens)),
    completionMode: c.get<string>("completionMode") === "line" ? "line" : "block",
  };
}

export function languageEnabled(languages: Record<string, boolean>, languageId: string): boolean {
  return languages[languageId] ?? languages["*"] ?? true;
}
