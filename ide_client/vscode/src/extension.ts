// Extension entry: one session per window, shared by the inline provider, the
// document tracker and the status bar. Session credentials live in
// workspaceState (per server URL); the API key comes from the environment
// variable `dynarank.apiKeyEnvVar` names, else from context.secrets. Connection
// events and errors go to the "dynarank" output channel.

import * as vscode from "vscode";
import { DynarankClient } from "./client";
import { Http, TERMINAL } from "./http";
import { dashboardUrl, MENU_COMMAND, type MenuAction, type MenuItem, menuItems, type MenuStats } from "./menu";
import { loadRules, PrivacyFilter } from "./privacy";
import { ACCEPT_COMMAND, FeedbackTracker } from "./feedback";
import { InlineProvider } from "./inline";
import type { Adapted, Ready, Status } from "./protocol";
import { adapterName, repositoryInfo } from "./repository";
import { readSettings } from "./settings";
import { StatusView, TOGGLE_COMMAND } from "./statusbar";
import { DocumentTracker, SendPolicy } from "./tracker";

const SECRET_KEY = "dynarank.apiKey";

export type ClientFactory = (options: ConstructorParameters<typeof DynarankClient>[0]) => DynarankClient;

interface Saved { sessionId?: string; resumeToken?: string }

export class Extension implements vscode.Disposable {
  client?: DynarankClient;
  readonly status = new StatusView();
  readonly output = vscode.window.createOutputChannel("dynarank");
  readonly tracker: DocumentTracker;
  private disposables: vscode.Disposable[] = [];

  constructor(private context: vscode.ExtensionContext, private makeClient: ClientFactory) {
    this.tracker = new DocumentTracker(() => this.client, new SendPolicy(this.privacyFilter()), (m) => this.log(m));
  }

  /** The shipped privacy rules; without them no document is sent (the policy fails closed). */
  private privacyFilter(): PrivacyFilter | undefined {
    try {
      return new PrivacyFilter(loadRules());
    } catch (err) {
      this.log(`privacy rules unreadable, no documents will be sent: ${(err as Error).message}`);
      return undefined;
    }
  }

  log(message: string): void {
    this.output.appendLine(`[${new Date().toISOString()}] ${message}`);
  }

  get serverUrl(): string {
    return vscode.workspace.getConfiguration("dynarank").get<string>("serverUrl") ?? "http://127.0.0.1:8000";
  }

  private stateKey(): string {
    return `dynarank.session:${this.serverUrl}`;
  }

  /** The variable named by `dynarank.apiKeyEnvVar` when it is set and not empty, else the key stored by "Set API key". */
  async apiKey(): Promise<{ key?: string; source: string }> {
    const name = vscode.workspace.getConfiguration("dynarank").get<string>("apiKeyEnvVar")?.trim();
    if (name && process.env[name]) return { key: process.env[name], source: `$${name}` };
    const stored = await this.context.secrets.get(SECRET_KEY);
    if (stored) return { key: stored, source: name ? `secret storage ($${name} is not set)` : "secret storage" };
    return { source: name ? `none ($${name} is not set)` : "none" };
  }

  private root(): string | undefined {
    return vscode.workspace.workspaceFolders?.[0]?.uri.fsPath;
  }

  async start(fresh = false): Promise<void> {
    this.client?.close();
    this.status.update({ state: "connecting", version: undefined, meanRank: undefined, loss: undefined, enabled: readSettings().enable });
    this.log(`connecting to ${this.serverUrl}${fresh ? " (fresh session)" : ""}`);
    const saved: Saved = fresh ? {} : this.context.workspaceState.get<Saved>(this.stateKey()) ?? {};
    const root = this.root();
    const apiKey = await this.apiKey();
    this.log(`API key: ${apiKey.source}`);
    const client = this.makeClient({
      server: this.serverUrl, apiKey: apiKey.key,
      sessionId: saved.sessionId, resumeToken: saved.resumeToken,
      repository: root ? repositoryInfo(root) : undefined,
    });
    this.client = client;
    const onReady = (ready: Ready) => {
      void this.context.workspaceState.update(this.stateKey(), { sessionId: ready.session_id, resumeToken: ready.resume_token });
      this.status.update({ state: "ready", sessionId: ready.session_id, version: ready.adapter_version, meanRank: ready.mean_rank });
    };
    client.on("reconnected", (ready: Ready, attempt: number) => {
      this.log(`reconnected (attempt ${attempt}), session ${ready.session_id}, adapter v${ready.adapter_version}`);
      onReady(ready);
    });
    client.on("adapted", (a: Adapted) => this.status.update({ version: a.version, meanRank: a.mean_rank, loss: a.loss }));
    client.on("status", (s: Status) => this.status.update({ version: s.version, queue: s.queue_depth }));
    client.on("disconnected", () => {
      this.log("disconnected; reconnecting");
      this.status.update({ state: "offline" });
    });
    client.on("server-error", (e: { code: string; message: string; ref?: string }) =>
      this.log(`server error ${e.code}${e.ref ? ` (${e.ref})` : ""}: ${e.message}`));
    client.on("fatal", (err: Error) => {
      this.log(`connection failed for good: ${err.message}`);
      this.status.update({ state: "offline" });
      void vscode.window.showErrorMessage(`dynarank: ${err.message}`);
    });
    try {
      const ready = await client.connect();
      this.log(`connected, session ${ready.session_id}, adapter v${ready.adapter_version}`);
      onReady(ready);
      this.tracker.openAll();
    } catch (err) {
      this.log(`cannot reach ${this.serverUrl}: ${(err as Error).message}`);
      this.status.update({ state: "offline" });
      void vscode.window.showWarningMessage(`dynarank: cannot reach ${this.serverUrl}: ${(err as Error).message}`);
    }
  }

  register(): void {
    // Feedback is best effort: a refused or unsent event must never disturb typing.
    const feedback = new FeedbackTracker((id, event) => { this.client?.feedback(id, event).catch(() => undefined); });
    const provider = new InlineProvider(() => this.client, readSettings, this.tracker.policy, { feedback, log: (m) => this.log(m) });
    this.disposables.push(
      { dispose: () => feedback.dispose() },
      { dispose: () => provider.followUp.cancel() },
      vscode.languages.registerInlineCompletionItemProvider({ pattern: "**" }, provider),
      vscode.workspace.onDidChangeTextDocument((e) => provider.followUp.cancelFor(e.document)),
      vscode.commands.registerCommand(ACCEPT_COMMAND, (completionId: string) => feedback.accepted(completionId)),
      vscode.window.onDidChangeActiveTextEditor(() => feedback.dismiss()),
      vscode.commands.registerCommand("dynarank.resetSession", () => this.start(true)),
      vscode.commands.registerCommand("dynarank.fineTuneRepository", () => this.fineTune()),
      vscode.commands.registerCommand("dynarank.setApiKey", () => this.setApiKey()),
      vscode.commands.registerCommand(TOGGLE_COMMAND, () => this.toggle()),
      vscode.commands.registerCommand(MENU_COMMAND, () => this.showMenu()),
      vscode.workspace.onDidChangeConfiguration((e) => {
        if (e.affectsConfiguration("dynarank.serverUrl") || e.affectsConfiguration("dynarank.apiKeyEnvVar")) void this.start();
        if (e.affectsConfiguration("dynarank.enable")) this.status.update({ enabled: readSettings().enable });
      }),
    );
  }

  /** Flips `dynarank.enable` in the user settings; the status bar follows the setting. */
  async toggle(): Promise<boolean> {
    const enable = !readSettings().enable;
    const config = vscode.workspace.getConfiguration("dynarank");
    // A workspace value would override the user setting, so change it where it is set.
    const target = config.inspect("enable")?.workspaceValue !== undefined
      ? vscode.ConfigurationTarget.Workspace : vscode.ConfigurationTarget.Global;
    await config.update("enable", enable, target);
    this.status.update({ enabled: enable });
    this.log(`inline completions ${enable ? "enabled" : "disabled"}`);
    return enable;
  }

  /** The status-bar menu; returns the action chosen, after running it. */
  async showMenu(): Promise<MenuAction | undefined> {
    const picked = await vscode.window.showQuickPick<MenuItem>(this.menuStats().then(menuItems),
      { title: "dynarank", placeHolder: "Session numbers and actions" });
    switch (picked?.action) {
      case "toggle": await this.toggle(); break;
      case "reset": await this.start(true); break;
      case "fineTune": await this.fineTune(); break;
      case "dashboard": await vscode.env.openExternal(vscode.Uri.parse(dashboardUrl(this.serverUrl, (await this.apiKey()).key))); break;
    }
    return picked?.action;
  }

  /** What the status bar knows, plus the acceptance rate, which only the HTTP stats route has. */
  async menuStats(): Promise<MenuStats> {
    const stats: MenuStats = { ...this.status.view, serverUrl: this.serverUrl };
    if (stats.state !== "ready" || !stats.sessionId) return stats;
    try {
      const remote = await new Http(this.serverUrl, (await this.apiKey()).key).sessionStats(stats.sessionId);
      const f = remote.feedback;
      return { ...stats, version: remote.adapter_version, acceptanceRate: f.acceptance_rate,
               decided: f.accepted + f.partially_accepted + f.rejected };
    } catch (err) {
      this.log(`session stats: ${(err as Error).message}`);
      return { ...stats, statsError: (err as Error).message };
    }
  }

  async setApiKey(): Promise<void> {
    const key = await vscode.window.showInputBox({ prompt: "dynarank API key", password: true, ignoreFocusOut: true });
    if (key === undefined) return;
    await this.context.secrets.store(SECRET_KEY, key);
    await this.start();
  }

  async fineTune(): Promise<string | undefined> {
    const root = this.root();
    if (!root) {
      void vscode.window.showErrorMessage("dynarank: open a folder to fine-tune on it");
      return undefined;
    }
    const http = new Http(this.serverUrl, (await this.apiKey()).key);
    return vscode.window.withProgress(
      { location: vscode.ProgressLocation.Notification, title: "dynarank fine-tuning", cancellable: true },
      async (progress, token) => {
        let job = await http.createJob(adapterName(root), { path: root, ...repositoryInfo(root) });
        token.onCancellationRequested(() => void http.cancelJob(job.id));
        let reported = 0;
        while (!TERMINAL.has(job.status)) {
          await new Promise((r) => setTimeout(r, 500));
          job = await http.job(job.id);
          const pct = job.total_steps ? (100 * job.step) / job.total_steps : 0;
          progress.report({ message: `${job.status} ${job.step}/${job.total_steps ?? "?"}`, increment: pct - reported });
          reported = pct;
        }
        if (job.status === "succeeded") {
          void vscode.window.showInformationMessage(`dynarank: ${job.fine_tuned_model} is ready; new sessions here start from it`);
        } else {
          this.log(`fine-tuning ${job.id} ${job.status}: ${job.error?.message ?? ""}`);
          void vscode.window.showErrorMessage(`dynarank: fine-tuning ${job.status}: ${job.error?.message ?? ""}`);
        }
        return job.status;
      },
    );
  }

  dispose(): void {
    this.client?.close();
    this.tracker.dispose();
    this.status.dispose();
    this.output.dispose();
    for (const d of this.disposables) d.dispose();
  }
}

let active: Extension | undefined;

export async function activate(context: vscode.ExtensionContext, makeClient: ClientFactory = (o) => new DynarankClient(o)) {
  active = new Extension(context, makeClient);
  context.subscriptions.push(active);
  active.register();
  await active.start();
  return active;
}

export function deactivate(): void {
  active?.dispose();
  active = undefined;
}
