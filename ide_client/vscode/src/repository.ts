// Repository identity shared with the Python CLI (ide_client/repo.py): the same
// id for the same folder, so a job started from either side seeds both.

import { createHash } from "crypto";
import * as path from "path";

export function repositoryInfo(root: string): { id: string; root_name: string } {
  const abs = path.resolve(root);
  const name = path.basename(abs);
  const digest = createHash("sha256").update(abs).digest("hex").slice(0, 12);
  return { id: `${name}-${digest}`, root_name: name };
}

export function adapterName(root: string): string {
  const cleaned = path.basename(root).replace(/[^A-Za-z0-9._-]+/g, "-").replace(/^[-.]+|[-.]+$/g, "");
  return cleaned.slice(0, 60) || "repository";
}
