// The full block, fetched in the background after its first line is shown.
// Inline completions cannot stream, so the provider answers with a quick
// `line` completion and starts a `block` one here; when it arrives and the user
// is still where it was asked for, it is kept and the suggestion re-triggered,
// and the provider's next call at that spot takes it.
// No vscode import: node's test runner loads it.

import type { CompletionDone } from "./protocol";

/** Where a completion was asked for: the document (by identity), its version, the cursor. */
export interface Spot { document: object; version: number; line: number; character: number }

export const sameSpot = (a: Spot, b: Spot) =>
  a.document === b.document && a.version === b.version && a.line === b.line && a.character === b.character;

export class FollowUp {
  private pending?: { spot: Spot; cancel(): void };
  private ready?: { spot: Spot; done: CompletionDone };

  /**
   * @param stillAt whether the user is still at the spot (same document version, same cursor)
   * @param retrigger asks the editor for the inline suggestion again
   */
  constructor(private stillAt: (spot: Spot) => boolean, private retrigger: () => void) {}

  /** Wait for `handle` in the background; `shown` is the text already on screen. */
  start(spot: Spot, handle: { done: Promise<CompletionDone>; cancel(): void }, shown: string): void {
    this.cancel();
    const pending = { spot, cancel: () => handle.cancel() };
    this.pending = pending;
    handle.done.then((done) => {
      if (this.pending !== pending) return; // cancelled or replaced meanwhile
      this.pending = undefined;
      const more = done.finish_reason !== "cancelled" && !done.hidden && done.text.trimEnd() !== shown.trimEnd();
      if (!more || !done.text.trim() || !this.stillAt(spot)) return;
      this.ready = { spot, done };
      this.retrigger();
    }, () => {
      if (this.pending === pending) this.pending = undefined; // a failed follow-up just leaves the first line
    });
  }

  /** The block waiting for `spot`, once; anything kept for another spot is dropped. */
  take(spot: Spot): CompletionDone | undefined {
    const ready = this.ready;
    this.ready = undefined;
    return ready && sameSpot(ready.spot, spot) ? ready.done : undefined;
  }

  /** Stop the background request (the user typed on); the server stops generating too. */
  cancel(): void {
    this.pending?.cancel();
    this.pending = undefined;
  }

  /** `document` changed: whatever was asked for it is out of date. */
  cancelFor(document: object): void {
    if (this.pending?.spot.document === document) this.cancel();
  }

  /** Whether a background request is in flight (for tests and logs). */
  get busy(): boolean {
    return this.pending !== undefined;
  }
}
