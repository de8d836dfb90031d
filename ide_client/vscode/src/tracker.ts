// Editor documents -> session edits. VS Code's change events are already
// LSP-style range changes with a document version, which is what the server takes.

import * as vscode from "vscode";
import type { RangeChange } from "./protocol";

/** The part of DynarankClient the tracker needs (a fake in tests). */
export interface DocumentSink {
  documents: Map<string, unknown>;
  open(path: string, text: string, version: number, language?: string): void;
  editChanges(path: string, version: number, changes: RangeChange[], newText?: string): void;
  closeDocument(path: string): void;
}

const MAX_CHARS = 512 * 1024; // the server's message limit is 1 MiB; big generated files are not worth it

/** Path the server sees: relative to the workspace folder, or undefined for documents we do not send. */
export function documentPath(doc: vscode.TextDocument): string | undefined {
  if (doc.uri.scheme !== "file") return undefined; // output panes, git diffs, settings editors
  if (!vscode.workspace.getWorkspaceFolder(doc.uri)) return undefined;
  return vscode.workspace.asRelativePath(doc.uri, false);
}

export function toRangeChanges(changes: readonly vscode.TextDocumentContentChangeEvent[]): RangeChange[] {
  return changes.map((c) => ({
    range: {
      start: { line: c.range.start.line, character: c.range.start.character },
      end: { line: c.range.end.line, character: c.range.end.character },
    },
    text: c.text,
  }));
}

export class DocumentTracker implements vscode.Disposable {
  private subscriptions: vscode.Disposable[] = [];

  constructor(private sink: () => DocumentSink | undefined) {
    this.subscriptions.push(
      vscode.workspace.onDidOpenTextDocument((d) => this.opened(d)),
      vscode.workspace.onDidChangeTextDocument((e) => this.changed(e)),
      vscode.workspace.onDidCloseTextDocument((d) => this.closed(d)),
    );
  }

  /** Send every document already open (at activation or after a session reset). */
  openAll(): void {
    for (const doc of vscode.workspace.textDocuments) this.opened(doc);
  }

  opened(doc: vscode.TextDocument): void {
    const path = documentPath(doc);
    const sink = this.sink();
    if (path === undefined || sink === undefined) return;
    const text = doc.getText();
    if (text.length <= MAX_CHARS) sink.open(path, text, doc.version, doc.languageId);
  }

  changed(event: vscode.TextDocumentChangeEvent): void {
    const path = documentPath(event.document);
    const sink = this.sink();
    if (path === undefined || sink === undefined || event.contentChanges.length === 0) return;
    if (!sink.documents.has(path)) return this.opened(event.document);
    const text = event.document.getText();
    if (text.length > MAX_CHARS) return this.closed(event.document);
    sink.editChanges(path, event.document.version, toRangeChanges(event.contentChanges), text);
  }

  closed(doc: vscode.TextDocument): void {
    const path = documentPath(doc);
    const sink = this.sink();
    if (path !== undefined && sink?.documents.has(path)) sink.closeDocument(path);
  }

  dispose(): void {
    for (const s of this.subscriptions) s.dispose();
  }
}
