// Inline completions from the session's adapter. Each request waits the debounce
// first, so a burst of keystrokes sends one request. VS Code cancels the token when
// the user types on; the cancel goes to the server so generation stops there too.
// In `block` mode the first line is asked for alone and shown at once, and the
// whole block follows in the background (followup.ts).
// Each suggestion shown carries a command that reports its acceptance (feedback.ts).

import * as vscode from "vscode";
import { ACCEPT_COMMAND, type FeedbackTracker } from "./feedback";
import { FollowUp, type Spot } from "./followup";
import type { CompleteOptions, CompletionDone } from "./protocol";
import { languageEnabled, type Settings } from "./settings";
import { documentPath, type Policy } from "./tracker";

export const TRIGGER_COMMAND = "editor.action.inlineSuggest.trigger";

export interface Completer {
  readonly connected: boolean;
  documents: Map<string, unknown>;
  complete(options: CompleteOptions, onDelta?: (text: string) => void): {
    done: Promise<CompletionDone>; cancel(): void;
  };
}

export interface ProviderOptions {
  feedback?: FeedbackTracker;
  log?: (message: string) => void;
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

/** Whether the active editor still shows `spot`'s document version with the cursor at the spot. */
function cursorStillAt(spot: Spot): boolean {
  const editor = vscode.window.activeTextEditor;
  if (!editor || editor.document !== spot.document || editor.document.version !== spot.version) return false;
  const at = editor.selection.active;
  return editor.selection.isEmpty && at.line === spot.line && at.character === spot.character;
}

export class InlineProvider implements vscode.InlineCompletionItemProvider {
  private latest = 0; // only the newest request may send, even if VS Code did not cancel the older one
  readonly followUp = new FollowUp(cursorStillAt, () => void vscode.commands.executeCommand(TRIGGER_COMMAND));

  constructor(private completer: () => Completer | undefined, private settings: () => Settings,
              private policy: Policy, private options: ProviderOptions = {}) {}

  async provideInlineCompletionItems(
    document: vscode.TextDocument, position: vscode.Position,
    _context: vscode.InlineCompletionContext, token: vscode.CancellationToken,
  ): Promise<vscode.InlineCompletionItem[]> {
    const settings = this.settings();
    if (!settings.enable || !languageEnabled(settings.languages, document.languageId)) return [];
    const spot: Spot = { document, version: document.version, line: position.line, character: position.character };
    const block = this.followUp.take(spot);
    if (block) {
      // The re-trigger for the full block: it replaces its own first line, which was not rejected.
      this.options.feedback?.withdraw();
      return [this.item(block, position)];
    }
    this.followUp.cancel(); // a keystroke ends the background request
    const request = ++this.latest;
    this.options.feedback?.dismiss(); // a new request replaces whatever suggestion was showing
    await debounce(settings.debounceMs, token);
    const client = this.completer();
    const path = documentPath(document);
    if (!client?.connected || path === undefined || token.isCancellationRequested || request !== this.latest) return [];
    if (this.policy.reason(document) !== undefined) return []; // not even a prefix of an excluded file leaves
    // The server completes from its mirror of the document, which the tracker keeps current.
    const options: CompleteOptions = client.documents.has(path)
      ? { path, cursor: { line: position.line, character: position.character } }
      : { prefix: document.getText(new vscode.Range(new vscode.Position(0, 0), position)) };
    if (options.prefix === "") {
      // Line 1, column 1: the server completes from the text after the cursor alone.
      options.suffix = document.getText(); // the cursor is at offset 0
      if (!options.suffix) return [];
    }
    const twoStep = settings.completionMode === "block";
    const ask = { ...options, max_tokens: settings.maxTokens };
    const done = await this.complete(client, { ...ask, mode: twoStep ? "line" : settings.completionMode }, token);
    if (!done) return [];
    if (twoStep && request === this.latest) this.followUp.start(spot, client.complete({ ...ask, mode: "block" }), done.text);
    return [this.item(done, position)];
  }

  /** One completion; undefined when cancelled, hidden by the session's gate, empty, or failed. */
  private async complete(client: Completer, options: CompleteOptions, token: vscode.CancellationToken) {
    const handle = client.complete(options);
    const listener = token.onCancellationRequested(() => handle.cancel());
    try {
      const done = await handle.done;
      // hidden: the session's confidence gate judged it not worth the user's attention.
      if (token.isCancellationRequested || done.finish_reason === "cancelled" || done.hidden || !done.text.trim()) {
        return undefined;
      }
      return done;
    } catch (err) {
      // A lost connection or a server error: no suggestion; the output channel says why.
      this.options.log?.(`completion failed: ${(err as Error).message}`);
      return undefined;
    } finally {
      listener.dispose();
    }
  }

  private item(done: CompletionDone, position: vscode.Position): vscode.InlineCompletionItem {
    const item = new vscode.InlineCompletionItem(done.text, new vscode.Range(position, position));
    const feedback = this.options.feedback;
    if (feedback && done.completion_id) {
      item.command = { title: "dynarank: suggestion accepted", command: ACCEPT_COMMAND, arguments: [done.completion_id] };
      feedback.shown(done.completion_id);
    }
    return item;
  }
}
