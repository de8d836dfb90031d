// Editor documents -> session edits. VS Code's change events are already
// LSP-style range changes with a document version, which is what the server takes.
// Documents the privacy rules exclude (privacy.ts) are never sent, and one that
// becomes excluded (a pasted private key, a new .dynarankignore line) is closed
// on the server.

import * as vscode from "vscode";
import type { PrivacyFilter } from "./privacy";
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

/** Why a document must not be sent (undefined: it may be). */
export interface Policy {
  reason(doc: vscode.TextDocument): string | undefined;
  /** Whether a change to the file at `fsPath` (an ignore file) calls for reload(). */
  affectedBy(fsPath: string): boolean;
  /** An ignore file changed: judge every document again. */
  reload(): void;
}

/**
 * Which documents may leave the machine, asked on every keystroke by the tracker
 * and the inline provider, so the answer is kept per document version. Without
 * rules (the rules file could not be read) nothing is sent.
 */
export class SendPolicy implements Policy {
  private cache = new WeakMap<vscode.TextDocument, { version: number; reason: string | undefined }>();

  constructor(private filter: PrivacyFilter | undefined) {}

  reason(doc: vscode.TextDocument): string | undefined {
    const cached = this.cache.get(doc);
    if (cached?.version === doc.version) return cached.reason;
    const folder = vscode.workspace.getWorkspaceFolder(doc.uri);
    const reason = !this.filter ? "privacy rules unavailable"
      : folder ? this.filter.reason(doc.uri.fsPath, folder.uri.fsPath, doc.getText()) : "outside the workspace";
    this.cache.set(doc, { version: doc.version, reason });
    return reason;
  }

  affectedBy(fsPath: string): boolean {
    return this.filter?.isIgnoreFile(fsPath) ?? false;
  }

  reload(): void {
    this.filter?.reload();
    this.cache = new WeakMap();
  }
}

export class DocumentTracker implements vscode.Disposable {
  private subscriptions: vscode.Disposable[] = [];
  private skipped = new Map<string, string>(); // path -> reason, so each exclusion is logged once

  constructor(private sink: () => DocumentSink | undefined, readonly policy: Policy,
              private log: (message: string) => void = () => undefined) {
    this.subscriptions.push(
      vscode.workspace.onDidOpenTextDocument((d) => this.opened(d)),
      vscode.workspace.onDidChangeTextDocument((e) => this.changed(e)),
      vscode.workspace.onDidCloseTextDocument((d) => this.closed(d)),
      vscode.workspace.onDidSaveTextDocument((d) => {
        if (this.policy.affectedBy(d.uri.fsPath)) this.recheck();
      }),
    );
  }

  /** Send every document already open (at activation or after a session reset). */
  openAll(): void {
    for (const doc of vscode.workspace.textDocuments) this.opened(doc);
  }

  /** After an ignore file changed: close what is now excluded, open what is now allowed. */
  recheck(): void {
    this.policy.reload();
    for (const doc of vscode.workspace.textDocuments) {
      const path = documentPath(doc);
      if (path === undefined) continue;
      if (this.excluded(doc, path)) this.closed(doc);
      else if (!this.sink()?.documents.has(path)) this.opened(doc);
    }
  }

  opened(doc: vscode.TextDocument): void {
    const path = documentPath(doc);
    const sink = this.sink();
    if (path === undefined || sink === undefined || this.excluded(doc, path)) return;
    const text = doc.getText();
    if (text.length <= MAX_CHARS) sink.open(path, text, doc.version, doc.languageId);
  }

  changed(event: vscode.TextDocumentChangeEvent): void {
    const path = documentPath(event.document);
    const sink = this.sink();
    if (path === undefined || sink === undefined || event.contentChanges.length === 0) return;
    if (this.excluded(event.document, path)) return this.closed(event.document);
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

  private excluded(doc: vscode.TextDocument, path: string): boolean {
    const reason = this.policy.reason(doc);
    if (reason === undefined) {
      this.skipped.delete(path);
      return false;
    }
    if (this.skipped.get(path) !== reason) this.log(`not sending ${path}: ${reason}`);
    this.skipped.set(path, reason);
    return true;
  }

  dispose(): void {
    for (const s of this.subscriptions) s.dispose();
  }
}
