// Inline completions from the session's adapter. Each request waits the debounce
// first, so a burst of keystrokes sends one request. VS Code cancels the token when
// the user types on; the cancel goes to the server so generation stops there too.
// Each suggestion shown carries a command that reports its acceptance (feedback.ts).

import * as vscode from "vscode";
import { ACCEPT_COMMAND, type FeedbackTracker } from "./feedback";
import type { CompleteOptions, CompletionDone } from "./protocol";
import { languageEnabled, type Settings } from "./settings";
import { documentPath } from "./tracker";

export interface Completer {
  readonly connected: boolean;
  documents: Map<string, unknown>;
  complete(options: CompleteOptions, onDelta?: (text: string) => void): {
    done: Promise<CompletionDone>; cancel(): void;
  };
}

/** Resolves after `ms`, or as soon as the token is cancelled. */
function debounce(ms: number, token: vscode.CancellationToken): Promise<void> {
  if (ms <= 0 || token.isCancellationRequested) return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => { clearTimeout(timer); sub.dispose(); resolve(); };
    const timer = setTimeout(done, ms);
    const sub = token.onCancellationRequested(done);
  });
}

export class InlineProvider implements vscode.InlineCompletionItemProvider {
  private latest = 0; // only the newest request may send, even if VS Code did not cancel the older one

  constructor(private completer: () => Completer | undefined, private settings: () => Settings,
              private feedback?: FeedbackTracker, private log?: (message: string) => void) {}

  async provideInlineCompletionItems(
    document: vscode.TextDocument, position: vscode.Position,
    _context: vscode.InlineCompletionContext, token: vscode.CancellationToken,
  ): Promise<vscode.InlineCompletionItem[]> {
    const settings = this.settings();
    if (!settings.enable || !languageEnabled(settings.languages, document.languageId)) return [];
    const request = ++this.latest;
    this.feedback?.dismiss(); // a new request replaces whatever suggestion was showing
    await debounce(settings.debounceMs, token);
    const client = this.completer();
    const path = documentPath(document);
    if (!client?.connected || path === undefined || token.isCancellationRequested || request !== this.latest) return [];
    // The server completes from its mirror of the document, which the tracker keeps current.
    const options: CompleteOptions = client.documents.has(path)
      ? { path, cursor: { line: position.line, character: position.character } }
      : { prefix: document.getText(new vscode.Range(new vscode.Position(0, 0), position)) };
    if (options.prefix === "") {
      // Line 1, column 1: the server completes from the text after the cursor alone.
      options.suffix = document.getText(); // the cursor is at offset 0
      if (!options.suffix) return [];
    }
    const handle = client.complete({ ...options, max_tokens: settings.maxTokens, mode: settings.completionMode });
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
    } catch (err) {
      // A lost connection or a server error: no suggestion; the output channel says why.
      this.log?.(`completion failed: ${(err as Error).message}`);
      return [];
    } finally {
      listener.dispose();
    }
  }
}
