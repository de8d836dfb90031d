// The HTTP side the extension uses: fine-tuning jobs and session stats. Node 18+ fetch, no vscode import.

export interface Job {
  id: string; status: string; step: number; total_steps: number | null; adapter_name: string;
  fine_tuned_model: string | null; error: { message: string } | null;
}

/** GET /v1/sessions/{id}/stats, the parts the extension shows. */
export interface SessionStats {
  session_id: string; adapter_version: number;
  feedback: { accepted: number; partially_accepted: number; rejected: number; acceptance_rate: number | null };
}

export const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);

export class Http {
  private base: string;

  constructor(server: string, private apiKey?: string) {
    this.base = server.replace(/\/+$/, "");
  }

  private async call<T>(method: string, path: string, body?: unknown, timeoutMs = 30_000): Promise<T> {
    const response = await fetch(this.base + path, {
      method, signal: AbortSignal.timeout(timeoutMs),
      headers: {
        "content-type": "application/json",
        ...(this.apiKey ? { authorization: `Bearer ${this.apiKey}` } : {}),
      },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const json = (await response.json()) as { error?: { message?: string } };
    if (!response.ok) throw new Error(json.error?.message ?? `HTTP ${response.status}`);
    return json as T;
  }

  createJob(adapterName: string, repository: { path: string; id: string; root_name: string }): Promise<Job> {
    return this.call("POST", "/v1/fine_tuning/jobs", { adapter_name: adapterName, repository });
  }

  job(id: string): Promise<Job> {
    return this.call("GET", `/v1/fine_tuning/jobs/${encodeURIComponent(id)}`);
  }

  /** Short timeout: the status menu waits for it. */
  sessionStats(sessionId: string, timeoutMs = 3000): Promise<SessionStats> {
    return this.call("GET", `/v1/sessions/${encodeURIComponent(sessionId)}/stats`, undefined, timeoutMs);
  }

  cancelJob(id: string): Promise<Job> {
    return this.call("POST", `/v1/fine_tuning/jobs/${encodeURIComponent(id)}/cancel`);
  }
}
