// A small stand-in for the `vscode` module: only the surface the extension touches.
// Importing this file installs it, so later `require("vscode")` calls get the fake.

import Module from "module";

type Listener<T> = (e: T) => void;

export class Emitter<T> {
  listeners: Listener<T>[] = [];
  event = (fn: Listener<T>) => {
    this.listeners.push(fn);
    return { dispose: () => { this.listeners = this.listeners.filter((l) => l !== fn); } };
  };
  fire(e: T) {
    for (const l of [...this.listeners]) l(e);
  }
}

export class Position {
  constructor(public line: number, public character: number) {}
}

export class Range {
  constructor(public start: Position, public end: Position) {}
}

export class InlineCompletionItem {
  command?: { title: string; command: string; arguments?: unknown[] };
  constructor(public insertText: string, public range?: Range) {}
}

export class CancellationTokenSource {
  private emitter = new Emitter<void>();
  token = { isCancellationRequested: false, onCancellationRequested: this.emitter.event };
  cancel() {
    this.token.isCancellationRequested = true;
    this.emitter.fire();
  }
}

export class FakeDocument {
  version = 1;
  constructor(public uri: { scheme: string; fsPath: string; path: string }, public text: string, public languageId = "python") {}
  getText(range?: Range): string {
    if (!range) return this.text;
    const lines = this.text.split("\n");
    const offset = (p: Position) => lines.slice(0, p.line).reduce((n, l) => n + l.length + 1, 0) + p.character;
    return this.text.slice(offset(range.start), offset(range.end));
  }
}

export const DEFAULT_ROOT = "/home/user/fake-repo";
/** The workspace folder; a test may point it at a real temporary directory. */
export let workspaceRoot = DEFAULT_ROOT;
export function setWorkspaceRoot(dir: string): void {
  workspaceRoot = dir;
  vscode.workspace.workspaceFolders = [{ uri: { fsPath: dir } }];
}
export const fileUri = (rel: string, scheme = "file") =>
  ({ scheme, fsPath: `${workspaceRoot}/${rel}`, path: `${workspaceRoot}/${rel}` });

export class Uri {
  private constructor(private value: string) {}
  static parse(value: string) { return new Uri(value); }
  toString() { return this.value; }
}

export const events = {
  open: new Emitter<FakeDocument>(),
  change: new Emitter<{ document: FakeDocument; contentChanges: unknown[] }>(),
  close: new Emitter<FakeDocument>(),
  save: new Emitter<FakeDocument>(),
  config: new Emitter<{ affectsConfiguration(s: string): boolean }>(),
  activeEditor: new Emitter<unknown>(),
};

export const registered = { commands: new Map<string, (...a: unknown[]) => unknown>(), providers: [] as unknown[] };
export const messages: string[] = [];
export const settings: Record<string, unknown> = { serverUrl: "http://127.0.0.1:1", maxTokens: 8 };
export const statusItems: Array<{ text: string; tooltip: string; command?: string; shown: boolean; disposed: boolean }> = [];
/** Lines appended to output channels, by channel name. */
export const output = new Map<string, string[]>();
/** Commands run through vscode.commands.executeCommand, and URLs opened externally. */
export const executed: string[] = [];
export const opened: string[] = [];

export interface PickItem { label: string; description?: string; detail?: string; kind?: number }
/** Each showQuickPick call: its items and options; `pick` chooses the answer (none by default). */
export const quickPick = {
  shown: [] as Array<{ items: PickItem[]; options: unknown }>,
  pick: (_items: PickItem[]): PickItem | undefined => undefined,
};

export const vscode = {
  Position, Range, InlineCompletionItem, CancellationTokenSource, Uri,
  QuickPickItemKind: { Separator: -1, Default: 0 },
  StatusBarAlignment: { Left: 1, Right: 2 },
  ProgressLocation: { Notification: 15 },
  ConfigurationTarget: { Global: 1, Workspace: 2, WorkspaceFolder: 3 },
  window: {
    createOutputChannel: (name: string) => {
      const lines: string[] = [];
      output.set(name, lines);
      return { name, appendLine: (l: string) => lines.push(l), show: () => undefined, dispose: () => undefined };
    },
    createStatusBarItem: () => {
      const item = { text: "", tooltip: "", command: undefined as string | undefined, shown: false, disposed: false,
        show() { item.shown = true; }, dispose() { item.disposed = true; } };
      statusItems.push(item);
      return item;
    },
    showErrorMessage: async (m: string) => { messages.push(`error: ${m}`); },
    showWarningMessage: async (m: string) => { messages.push(`warning: ${m}`); },
    showInformationMessage: async (m: string) => { messages.push(`info: ${m}`); },
    showInputBox: async () => undefined,
    showQuickPick: async (items: PickItem[] | Promise<PickItem[]>, options: unknown) => {
      const list = await items;
      quickPick.shown.push({ items: list, options });
      return quickPick.pick(list);
    },
    /** Set by tests: { document, selection: { active: Position, isEmpty: boolean } }. */
    activeTextEditor: undefined as unknown,
    onDidChangeActiveTextEditor: events.activeEditor.event,
    withProgress: async (_o: unknown, task: (p: unknown, t: unknown) => Promise<unknown>) =>
      task({ report: () => undefined }, new CancellationTokenSource().token),
  },
  env: {
    openExternal: async (uri: Uri) => { opened.push(uri.toString()); return true; },
  },
  workspace: {
    workspaceFolders: [{ uri: { fsPath: DEFAULT_ROOT } }],
    textDocuments: [] as FakeDocument[],
    getWorkspaceFolder: (uri: { fsPath: string }) =>
      uri.fsPath.startsWith(workspaceRoot + "/") ? { uri: { fsPath: workspaceRoot } } : undefined,
    asRelativePath: (uri: { fsPath: string }) => uri.fsPath.slice(workspaceRoot.length + 1),
    getConfiguration: () => ({
      get: (k: string) => settings[k],
      inspect: (k: string) => ({ key: `dynarank.${k}`, globalValue: settings[k] }),
      update: async (k: string, v: unknown) => {
        settings[k] = v;
        events.config.fire({ affectsConfiguration: (s: string) => s === "dynarank" || s === `dynarank.${k}` });
      },
    }),
    onDidOpenTextDocument: events.open.event,
    onDidChangeTextDocument: events.change.event,
    onDidCloseTextDocument: events.close.event,
    onDidSaveTextDocument: events.save.event,
    onDidChangeConfiguration: events.config.event,
  },
  languages: {
    registerInlineCompletionItemProvider: (_s: unknown, p: unknown) => {
      registered.providers.push(p);
      return { dispose: () => undefined };
    },
  },
  commands: {
    registerCommand: (name: string, fn: (...a: unknown[]) => unknown) => {
      registered.commands.set(name, fn);
      return { dispose: () => registered.commands.delete(name) };
    },
    executeCommand: async (name: string, ...args: unknown[]) => {
      executed.push(name);
      return registered.commands.get(name)?.(...args);
    },
  },
};

export function fakeContext() {
  const state = new Map<string, unknown>();
  const secrets = new Map<string, string>();
  return {
    subscriptions: [] as { dispose(): void }[],
    workspaceState: { get: (k: string) => state.get(k), update: async (k: string, v: unknown) => { state.set(k, v); } },
    secrets: { get: async (k: string) => secrets.get(k), store: async (k: string, v: string) => { secrets.set(k, v); } },
    state, secretStore: secrets,
  };
}

const mod = Module as unknown as { _load: (request: string, ...rest: unknown[]) => unknown };
const original = mod._load;
mod._load = function (request: string, ...rest: unknown[]) {
  return request === "vscode" ? vscode : original.call(this, request, ...rest);
};
