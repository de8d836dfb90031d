// Inline completions from the session's adapter. VS Code cancels the token when
// the user types on; the cancel goes to the server so generation stops there too.

import * as vscode from "vscode";
import type { CompleteOptions, CompletionDone } from "./protocol";
import { documentPath } from "./tracker";

export interface Completer {
  readonly connected: boolean;
  documents: Map<string, unknown>;
  complete(options: CompleteOptions, onDelta?: (text: string) => void): {
    done: Promise<CompletionDone>; cancel(): void;
  };
}

export class InlineProvider implements vscode.InlineCompletionItemProvider {
  constructor(private completer: () => Completer | undefined, private maxTokens: () => number) {}

  async provideInlineCompletionItems(
    document: vscode.TextDocument, position: vscode.Position,
    _context: vscode.InlineCompletionContext, token: vscode.CancellationToken,
  ): Promise<vscode.InlineCompletionItem[]> {
    const client = this.completer();
    const path = documentPath(document);
    if (!client?.connected || path === undefined || token.isCancellationRequested) return [];
    // The server completes from its mirror of the document, which the tracker keeps current.
    const options: CompleteOptions = client.documents.has(path)
      ? { path, cursor: { line: position.line, character: position.character } }
      : { prefix: document.getText(new vscode.Range(new vscode.Position(0, 0), position)) };
    if (options.prefix === "") return [];
    const handle = client.complete({ ...options, max_tokens: this.maxTokens() });
    const listener = token.onCancellationRequested(() => handle.cancel());
    try {
      const done = await handle.done;
      if (token.isCancellationRequested || done.finish_reason === "cancelled" || !done.text.trim()) return [];
      return [new vscode.InlineCompletionItem(done.text, new vscode.Range(position, position))];
    } catch {
      return []; // a lost connection or a server error: no suggestion, the status bar tells why
    } finally {
      listener.dispose();
    }
  }
}
