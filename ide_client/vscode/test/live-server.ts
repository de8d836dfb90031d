// Start a real `dynarank serve` on a tiny random model for the live tests.

import { ChildProcess, execFileSync, spawn } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import * as path from "node:path";

export const REPO_ROOT = path.resolve(__dirname, "../../../..");
export const PYTHON = process.env.DYNARANK_PYTHON ?? "python3";

// Same recipe as the Python tests: the tiny Llama of tests/conftest.py with SmolLM2's tokenizer.
const MAKE_TINY = `
import sys
from transformers import AutoTokenizer
from server.models import ensure_model
from tests.conftest import build_tiny_model
tok = AutoTokenizer.from_pretrained(ensure_model("smollm2-135m", progress=False))
build_tiny_model("llama", len(tok)).save_pretrained(sys.argv[1])
tok.save_pretrained(sys.argv[1])
`;

export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.once("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const port = (srv.address() as { port: number }).port;
      srv.close(() => resolve(port));
    });
  });
}

export class LiveServer {
  proc?: ChildProcess;
  output = "";
  private dir = mkdtempSync(path.join(tmpdir(), "dynarank-node-"));
  constructor(public port: number) {}

  get url(): string {
    return `http://127.0.0.1:${this.port}`;
  }

  static async start(): Promise<LiveServer> {
    const server = new LiveServer(await freePort());
    execFileSync(PYTHON, ["-c", MAKE_TINY, path.join(server.dir, "tiny")], { cwd: REPO_ROOT, stdio: "ignore" });
    server.proc = spawn(PYTHON, ["-m", "server", "serve", "--model", path.join(server.dir, "tiny"),
      "--port", String(server.port), "--data-dir", path.join(server.dir, "data")], { cwd: REPO_ROOT });
    server.proc.stdout!.on("data", (d) => (server.output += d));
    server.proc.stderr!.on("data", (d) => (server.output += d));
    const deadline = Date.now() + 180_000;
    while (Date.now() < deadline) {
      if (server.proc.exitCode !== null) throw new Error(`server exited:\n${server.output.slice(-3000)}`);
      try {
        if ((await fetch(`${server.url}/health`)).ok) return server;
      } catch {
        // not listening yet
      }
      await new Promise((r) => setTimeout(r, 500));
    }
    throw new Error(`server did not start:\n${server.output.slice(-3000)}`);
  }

  async stop(): Promise<void> {
    if (this.proc && this.proc.exitCode === null) {
      const exited = new Promise((r) => this.proc!.once("exit", r));
      this.proc.kill("SIGTERM");
      await Promise.race([exited, new Promise((r) => setTimeout(r, 30_000))]);
    }
    rmSync(this.dir, { recursive: true, force: true });
  }
}
