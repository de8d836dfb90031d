// Which inline suggestions the user took. VS Code has no "dismissed" event, so:
// a suggestion counts as shown when the provider returns it, accepted when its
// item command runs (VS Code runs it right after inserting the text), and
// rejected when it is replaced by the next request or the editor changes
// without that command having run. The rejection waits a short grace period
// because VS Code may ask for the next suggestion before running the command.
// No vscode import: node's test runner loads it.

import type { FeedbackEvent } from "./protocol";

export const ACCEPT_COMMAND = "dynarank.completionAccepted";

export class FeedbackTracker {
  private current: string | undefined;
  private dismissing = new Map<string, ReturnType<typeof setTimeout>>();

  constructor(private send: (completionId: string, event: FeedbackEvent) => void, private graceMs = 750) {}

  shown(completionId: string): void {
    this.dismiss();
    this.current = completionId;
    this.send(completionId, "shown");
  }

  accepted(completionId: string): void {
    const timer = this.dismissing.get(completionId);
    if (timer !== undefined) clearTimeout(timer);
    this.dismissing.delete(completionId);
    if (this.current === completionId) this.current = undefined;
    this.send(completionId, "accepted");
  }

  /** The shown suggestion (if any) was replaced or abandoned: rejected unless accepted within the grace period. */
  dismiss(): void {
    const id = this.current;
    if (id === undefined) return;
    this.current = undefined;
    this.dismissing.set(id, setTimeout(() => {
      this.dismissing.delete(id);
      this.send(id, "rejected");
    }, this.graceMs));
  }

  /** The shown suggestion was superseded by its own longer version: no outcome to report for it. */
  withdraw(): void {
    this.current = undefined;
  }

  dispose(): void {
    for (const timer of this.dismissing.values()) clearTimeout(timer);
    this.dismissing.clear();
  }
}
