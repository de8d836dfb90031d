// The HTTP side the extension uses: fine-tuning jobs. Node 18+ fetch, no vscode import.

export interface Job {
  id: string; status: string; step: number; total_steps: number | null; adapter_name: string;
  fine_tuned_model: string | null; error: { message: string } | null;
}

export const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);

export class Http {
  private base: string;

  constructor(server: string, private apiKey?: string) {
    this.base = server.replace(/\/+$/, "");
  }

  private async call<T>(method: string, path: string, body?: unknown): Promise<T> {
    const response = await fetch(this.base + path, {
      method,
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

  cancelJob(id: string): Promise<Job> {
    return this.call("POST", `/v1/fine_tuning/jobs/${encodeURIComponent(id)}/cancel`);
  }
}
