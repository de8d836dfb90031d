// Which files must never leave the machine. The rules (secret file names and
// content, private directories, ignore files, size limit) come from
// code_signals/privacy_rules.json, the same file the Python side reads; the
// build copies it next to the compiled code (scripts/copy-privacy-rules.js).
// Binaries (a NUL character) are never sent either.
// No vscode import: node's test runner loads it.

import { lstatSync, readFileSync, statSync } from "fs";
import * as path from "path";
import ignore, { type Ignore } from "ignore";

export const RULES_FILE = "privacy_rules.json";

export interface PrivacyRules {
  /** Globs (* ? [..] [!..]) for secret file names, matched case-insensitively against the base name. */
  secretNames: string[];
  /** Content that marks a file as a secret (private keys, token shapes), with what each one is. */
  secretContent: Array<{ re: RegExp; reason: string }>;
  /** A long, random-looking value assigned to a name containing one of `names` (any case). */
  secretAssignment?: { names: string[]; minLength: number; minEntropy: number };
  /** Directory names never entered (.git, .ssh, ...), matched case-insensitively. */
  privateDirs: string[];
  /** Gitignore-style files whose patterns exclude files, in every folder from the repository root down. */
  ignoreFiles: string[];
  maxFileBytes: number;
}

/** The rules shipped with the extension (out/privacy_rules.json, copied there by the build). */
export function loadRules(file = path.join(__dirname, "..", RULES_FILE)): PrivacyRules {
  return parseRules(JSON.parse(readFileSync(file, "utf8")));
}

function stringList(value: unknown, field: string): string[] {
  if (!Array.isArray(value) || !value.every((s) => typeof s === "string")) throw new Error(`${RULES_FILE}: ${field} must be a list of strings`);
  return value;
}

export function parseRules(json: unknown): PrivacyRules {
  const raw = (json ?? {}) as Record<string, unknown>;
  const strings = (field: string) => stringList(raw[field] ?? [], field);
  const max = raw.max_file_bytes;
  if (typeof max !== "number" || !(max > 0)) throw new Error(`${RULES_FILE}: max_file_bytes must be a positive number`);
  const reasons = strings("secret_content_reasons");
  const assignment = raw.secret_assignment as Record<string, unknown> | undefined;
  return {
    secretNames: strings("secret_names"),
    secretContent: strings("secret_content").map((p, i) => ({ re: pythonRegex(p), reason: reasons[i] ?? "secret content" })),
    secretAssignment: assignment && {
      names: stringList(assignment.names, "secret_assignment.names"),
      minLength: Number(assignment.min_length ?? 16),
      minEntropy: Number(assignment.min_entropy ?? 3),
    },
    privateDirs: strings("private_dirs"),
    ignoreFiles: strings("ignore_files"),
    maxFileBytes: max,
  };
}

/** A pattern of the Python/JavaScript common subset; a leading (?i) becomes the `i` flag. */
export function pythonRegex(pattern: string): RegExp {
  const insensitive = pattern.startsWith("(?i)");
  return new RegExp(insensitive ? pattern.slice(4) : pattern, insensitive ? "i" : "");
}

const escapeRegex = (s: string) => s.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");

/**
 * One pattern per secret-looking name, as code_signals/privacy.py builds them:
 * the name, the rest of the identifier (group 1), an assignment, then the value,
 * quoted (group 2) or alone up to the end of the line (group 3): an unquoted
 * value followed by more code is an expression, not a literal.
 * Without the `u` flag, `i` folds ASCII letters only, like Python's lower-cased bytes.
 */
function assignmentRegex(name: string, minLength: number): RegExp {
  const value = `([a-z0-9+/=_~-]{${minLength},})`;
  return new RegExp(`${escapeRegex(name.toLowerCase())}([a-z0-9_.-]*)["']?[ \t]*(?::=|=>|=|:)[ \t]*`
    + `(?:["']${value}["']|${value}[ \t]*\r?$)`, "gim");
}

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

/**
 * Generated secrets scatter digits among letters; identifiers and slugs
 * (MBart50Tokenizer, user_profile_12) have at most one run of digits per part
 * (split at _ and -). UUIDs are ids, not secrets.
 */
function randomLooking(value: string, minLength: number, minEntropy: number): boolean {
  const mixed = value.split(/[_-]/).some((part) => (part.match(/[0-9]+/g) ?? []).length >= 2
    && (part.match(/[A-Za-z]/g) ?? []).length >= 2);
  return value.length >= minLength && mixed && !UUID.test(value) && entropy(value) >= minEntropy;
}

/** Shannon entropy in bits per character. */
export function entropy(text: string): number {
  const counts = new Map<string, number>();
  for (const c of text) counts.set(c, (counts.get(c) ?? 0) + 1);
  const n = [...text].length;
  let bits = 0;
  for (const k of counts.values()) bits -= (k / n) * Math.log2(k / n);
  return bits;
}

/** Python's fnmatch glob as a RegExp: * and ? match any character, [..] and [!..] are classes. */
export function globRegex(glob: string, caseInsensitive = false): RegExp {
  let out = "";
  for (let i = 0; i < glob.length; i++) {
    const c = glob[i];
    if (c === "*") out += ".*";
    else if (c === "?") out += ".";
    else if (c === "[" && glob.indexOf("]", i + 2) > i) {
      const end = glob.indexOf("]", i + 2);
      let cls = glob.slice(i + 1, end).replace(/\\/g, "\\\\");
      if (cls.startsWith("!")) cls = "^" + cls.slice(1);
      else if (cls.startsWith("^")) cls = "\\" + cls;
      out += `[${cls}]`;
      i = end;
    } else out += c.replace(/[.+^${}()|\\/[\]]/g, "\\$&");
  }
  return new RegExp(`^${out}$`, caseInsensitive ? "i" : "");
}

/** Ignore files, read once and again when their mtime changes. */
class IgnoreFiles {
  private cache = new Map<string, { mtimeMs: number; matcher: Ignore }>();

  /** The matcher of one ignore file, or undefined when there is none. */
  matcher(file: string): Ignore | undefined {
    let mtimeMs: number;
    try {
      mtimeMs = statSync(file).mtimeMs;
    } catch {
      this.cache.delete(file);
      return undefined;
    }
    const cached = this.cache.get(file);
    if (cached?.mtimeMs === mtimeMs) return cached.matcher;
    let text: string;
    try {
      text = readFileSync(file, "utf8");
    } catch {
      text = "*"; // unreadable: exclude its whole folder rather than guess (as code_signals/privacy.py does)
    }
    const matcher = ignore().add(text);
    this.cache.set(file, { mtimeMs, matcher });
    return matcher;
  }

  clear(): void {
    this.cache.clear();
  }
}

/** The nearest folder at or above `dir` holding .git (ignore files above the workspace apply too), else `dir`. */
function repositoryRoot(dir: string): string {
  for (let d = path.resolve(dir); ; d = path.dirname(d)) {
    try {
      statSync(path.join(d, ".git"));
      return d;
    } catch {
      if (path.dirname(d) === d) return path.resolve(dir);
    }
  }
}

function isSymlink(file: string): boolean {
  try {
    return lstatSync(file).isSymbolicLink();
  } catch {
    return false; // not on disk (yet): its text is judged as it is
  }
}

export class PrivacyFilter {
  private names: Array<{ glob: string; re: RegExp }>;
  private privateDirs: Set<string>;
  private assignments: Array<{ re: RegExp; keyword: string }>;
  private ignores = new IgnoreFiles();
  private roots = new Map<string, string>();

  constructor(private rules: PrivacyRules) {
    this.names = rules.secretNames.map((glob) => ({ glob, re: globRegex(glob, true) }));
    this.privateDirs = new Set(rules.privateDirs.map((d) => d.toLowerCase()));
    const a = rules.secretAssignment;
    this.assignments = a ? a.names.map((keyword) => ({ re: assignmentRegex(keyword, a.minLength), keyword })) : [];
  }

  /** Why the file at `file` (with content `text`) must not be sent, or undefined when it may be. */
  reason(file: string, workspaceFolder: string, text: string): string | undefined {
    const base = path.basename(file);
    const name = this.names.find((n) => n.re.test(base));
    if (name) return `secret file name (${name.glob})`;
    const excludedBy = this.excludedBy(file, workspaceFolder);
    if (excludedBy) return excludedBy;
    if (isSymlink(file)) return "symlink (it may point anywhere)";
    if (Buffer.byteLength(text, "utf8") > this.rules.maxFileBytes) return `larger than ${this.rules.maxFileBytes} bytes`;
    if (text.includes("\u0000")) return "binary";
    const secret = this.rules.secretContent.find((s) => s.re.test(text));
    if (secret) return `secret content: ${secret.reason}`;
    const assigned = this.secretAssignment(text);
    if (assigned) return `secret assigned to ${assigned}`;
    return undefined;
  }

  /** Whether `file` is one of the ignore files, whose change calls for reload(). */
  isIgnoreFile(file: string): boolean {
    return this.rules.ignoreFiles.includes(path.basename(file));
  }

  /** Forget the ignore files read so far (one was saved). */
  reload(): void {
    this.ignores.clear();
    this.roots.clear();
  }

  /** The name a long, random-looking value is assigned to, for the first such assignment. */
  private secretAssignment(text: string): string | undefined {
    const rule = this.rules.secretAssignment;
    if (!rule) return undefined;
    for (const { re, keyword } of this.assignments) {
      for (const m of text.matchAll(re)) {
        if (!randomLooking(m[2] ?? m[3], rule.minLength, rule.minEntropy)) continue;
        let start = m.index!;
        while (start > 0 && /[A-Za-z0-9_.-]/.test(text[start - 1])) start--; // the whole identifier
        return text.slice(start, m.index! + keyword.length + m[1].length);
      }
    }
    return undefined;
  }

  /** A private directory or an ignore file (checked in every folder from the repository root down) that excludes `file`. */
  private excludedBy(file: string, workspaceFolder: string): string | undefined {
    let root = this.roots.get(workspaceFolder);
    if (root === undefined) this.roots.set(workspaceFolder, (root = repositoryRoot(workspaceFolder)));
    const rel = path.relative(root, file);
    if (!rel || rel === ".." || rel.startsWith(`..${path.sep}`) || path.isAbsolute(rel)) return undefined;
    const parts = rel.split(path.sep);
    const dir = parts.slice(0, -1).find((d) => this.privateDirs.has(d.toLowerCase()));
    if (dir) return `inside ${dir}/`;
    // Stricter than git: a deeper file cannot re-include what a higher one excludes.
    for (let depth = 0; depth < parts.length; depth++) {
      const under = parts.slice(0, depth);
      // Each ignore file's patterns are relative to its folder; `ignores` also tests the parent folders.
      const rest = parts.slice(depth).join("/");
      for (const name of this.rules.ignoreFiles) {
        if (this.ignores.matcher(path.join(root, ...under, name))?.ignores(rest)) {
          return `excluded by ${path.posix.join(...under, name)}`;
        }
      }
    }
    return undefined;
  }
}
