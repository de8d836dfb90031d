// Inline completions from the session's adapter. VS Code cancels the token when
// the user types on; the cancel goes to the server so generation stops there too.
// Each suggestion shown carries a command that reports its acceptance (feedback.ts).

import * as vscode from "vscode";
import { ACCEPT_COMMAND, type FeedbackTracker } from "./feedback";
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
  constructor(private completer: () => Completer | undefined, private maxTokens: () => number,
              private feedback?: FeedbackTracker) {}

  async provideInlineCompletionItems(
    document: vscode.TextDocument, position: vscode.Position,
    _context: vscode.InlineCompletionContext, token: vscode.CancellationToken,
  ): Promise<vscode.InlineCompletionItem[]> {
    const client = this.completer();
    const path = documentPath(document);
    this.feedback?.dismiss(); // a new request replaces whatever suggestion was showing
    if (!client?.connected || path === undefined || token.isCancellationRequested) return [];
    // The server completes from its mirror of the document, which the tracker keeps current.
    const options: CompleteOptions = client.documents.has(path)
      ? { path, cursor: { line: position.line, character: position.character } }
      : { prefix: document.getText(new vscode.Range(new vscode.Position(0, 0), position)) };
    if (options.prefix === "") {
      // Line 1, column 1: the server completes from the text after the cursor alone.
      options.suffix = document.getText(); // the cursor is at offset 0
      if (!options.suffix) return [];
    }
    const handle = client.complete({ ...options, max_tokens: this.maxTokens() });
    const listener = token.onCancellationRequested(() => handle.cancel());
    try {
      const done = await handle.done;
      // hidden: the session's confidence gate judged it not worth the user's attention.
      if (token.isCancellationRequested || done.finish_reason === "cancelled" || done.hidden || !done.text.trim()) {
        return [];
      }
      const item = new vscode.InlineCompletionItem(done.text, new vscode.Range(position, position));
      if (this.feedback && done.completion_id) {
        item.command = { title: "dynarank: suggestion accepted", command: ACCEPT_COMMAND, arguments: [done.completion_id] };
        this.feedback.shown(done.completion_id);
      }
      return [item];
    } catch {
      return []; // a lost connection or a server error: no suggestion, the status bar tells why
    } finally {
      listener.dispose();
    }
  }
}
