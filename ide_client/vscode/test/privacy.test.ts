// Privacy: a temporary repository with secrets, ignored and excluded files;
// the tracker's sink sees only the ordinary files, under the shipped rules.

import "./fake-vscode";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdirSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import * as path from "node:path";
import { after, before, test } from "node:test";
import { DEFAULT_ROOT, FakeDocument, Position, events, fileUri, setWorkspaceRoot, vscode } from "./fake-vscode";
import { InlineProvider } from "../src/inline";
import { entropy, globRegex, loadRules, parseRules, PrivacyFilter, pythonRegex } from "../src/privacy";
import { DocumentTracker, SendPolicy } from "../src/tracker";
import { FakeClient, noToken, opts } from "./fake-client";
import { PYTHON, REPO_ROOT } from "./live-server";

const REPO_RULES = path.resolve(__dirname, "../../../../code_signals/privacy_rules.json");
// Put together at run time, so this file holds no key-shaped text (the rules, and push protection, would flag it).
const KEY = "-----BEGIN OPENSSH " + "PRIVATE KEY-----\n" + "b3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH " + "PRIVATE KEY-----\n";
const GITHUB_TOKEN = `ghp_${"a1B2c3D4e5".repeat(3)}abcdef`;

const ORDINARY: Record<string, string> = {
  "main.py": "def main():\n    return 1\n",
  "src/util.py": "import os\n",
  "src/env_tools.py": "ENV = 'dev'\n", // a name near a secret one, but not one
  "README.md": "# demo\n",
};
const EXCLUDED: Record<string, string> = {
  ".env": "API_KEY=abc\n",
  ".env.local": "X=1\n",
  "certs/server.pem": "certificate\n",
  "deploy/id_rsa": "key\n",
  "deploy/ID_ED25519": "key\n", // names are matched case-insensitively
  "build/gen.py": "x = 1\n", // .gitignore: build/
  "debug.log": "log\n", // .gitignore: *.log
  "src/generated_api.py": "y = 2\n", // src/.gitignore
  "notes/private.py": "z = 3\n", // .dynarankignore
  "config.py": `SSH = """${KEY}"""\n`,
  "ci.py": `TOKEN = "${GITHUB_TOKEN}"\n`,
  "settings.py": `db_password = ` + `"Xk9fQ2mZ7pL4wR8tY3vB"\n`, // high-entropy value assigned to a secret-looking name
  "big.py": "#".repeat(600 * 1024),
  "blob.dat": "a\u0000b",
  ".ssh/config.py": "Host x\n", // a private directory
};

// Texts on which code_signals/privacy.py and the extension must agree (samples/N.py).
const SAMPLES = [
  `db_password = ` + `"Xk9fQ2mZ7pL4wR8tY3vB"\n`, // split after the operator: this file must not trip the rules
  "API_KEY: 'user_profile_settings_2'\n", // an identifier
  "token = abcdefghijklmnop1\n", // one run of digits
  "MY_SECRET_TOKEN=" + "AbCdEf1234567890XyZ\n",
  "password = 'aaaaaaaaaaaaaaaa1'\n", // little entropy
  "self.token = make_token_2024(x1y2z3w4v5u6t7s8)\n", // an expression, not a literal
  "PRIVATE_KEY := " + "ZmFrZS1rZXktZGF0YS0xMjM0NTY3OA==\n",
  "Secret: " + "Q1w2E3r4T5y6U7i8O9p0\n",
  "session_token = '9f8e7d6c-5b4a-3c2d-1e0f-a1b2c3d4e5f6'\n", // a UUID
  `const key = "${GITHUB_TOKEN}";\n`,
  "def tokenize(text):\n    return text.split()\n",
];

let root: string;
const rules = () => loadRules();
const filter = () => new PrivacyFilter(rules());

before(() => {
  root = mkdtempSync(path.join(tmpdir(), "dynarank-privacy-"));
  mkdirSync(path.join(root, ".git"));
  const files: Record<string, string> = {
    ...ORDINARY, ...EXCLUDED,
    ".gitignore": "build/\n*.log\n",
    "src/.gitignore": "generated_*.py\n",
    ".dynarankignore": "notes/\n",
    ...Object.fromEntries(SAMPLES.map((text, i) => [`samples/${i}.py`, text])),
  };
  for (const [rel, text] of Object.entries(files)) {
    mkdirSync(path.dirname(path.join(root, rel)), { recursive: true });
    writeFileSync(path.join(root, rel), text);
  }
  symlinkSync(path.join(root, ".env"), path.join(root, "linked.py"));
  setWorkspaceRoot(root);
});

after(() => {
  setWorkspaceRoot(DEFAULT_ROOT);
  rmSync(root, { recursive: true, force: true });
});

const doc = (rel: string) => new FakeDocument(fileUri(rel), readFileSync(path.join(root, rel), "utf8"));

test("the build ships the repository's rules file unchanged", () => {
  const shipped = readFileSync(path.resolve(__dirname, "../privacy_rules.json"), "utf8");
  assert.equal(shipped, readFileSync(REPO_RULES, "utf8"));
  assert.ok(rules().secretNames.includes("*.pem") && rules().maxFileBytes > 0);
});

test("the extension and code_signals/privacy.py refuse the same files", () => {
  const rels = [...Object.keys(ORDINARY), ...Object.keys(EXCLUDED), "linked.py", ...SAMPLES.map((_, i) => `samples/${i}.py`)];
  const script = "import json, sys\nfrom code_signals.privacy import PrivacyFilter\n"
    + "f = PrivacyFilter(sys.argv[1])\nprint(json.dumps([f.reason(r) for r in json.load(sys.stdin)]))";
  const python: Array<string | null> = JSON.parse(execFileSync(PYTHON, ["-c", script, root], { cwd: REPO_ROOT, input: JSON.stringify(rels) }).toString());
  const js = filter();
  const differ = rels.filter((rel, i) => (python[i] === null) !== (js.reason(path.join(root, rel), root, readFileSync(path.join(root, rel), "utf8")) === undefined));
  assert.deepEqual(differ, [], `python says ${JSON.stringify(Object.fromEntries(rels.map((r, i) => [r, python[i]])), null, 1)}`);
  assert.ok(python.filter((r) => r !== null).length >= Object.keys(EXCLUDED).length + 5, "the samples hold secrets too");
});

test("the tracker's sink never sees excluded files; ordinary files arrive", () => {
  const client = new FakeClient();
  const logged: string[] = [];
  const tracker = new DocumentTracker(() => client as never, new SendPolicy(filter()), (m) => logged.push(m));
  try {
    for (const rel of [...Object.keys(EXCLUDED), ...Object.keys(ORDINARY), "linked.py"]) events.open.fire(doc(rel));
    assert.deepEqual([...client.documents.keys()].sort(), Object.keys(ORDINARY).sort());
    for (const rel of [...Object.keys(EXCLUDED), "linked.py"]) {
      assert.ok(logged.some((l) => l.startsWith(`not sending ${rel}:`)), `${rel} is logged as not sent:\n${logged.join("\n")}`);
    }
    assert.ok(!logged.some((l) => l.includes(GITHUB_TOKEN) || l.includes("Xk9fQ2")), "the log never holds the secret");
  } finally {
    tracker.dispose();
  }
});

test("a document that becomes secret is closed; an ignore file saved rechecks open documents", () => {
  const client = new FakeClient();
  const tracker = new DocumentTracker(() => client as never, new SendPolicy(filter()));
  const util = doc("src/util.py");
  const main = doc("main.py");
  vscode.workspace.textDocuments = [util, main];
  try {
    tracker.openAll();
    assert.deepEqual([...client.documents.keys()].sort(), ["main.py", "src/util.py"]);
    // A private key pasted into main.py: closed on the server, the edit itself never sent.
    main.text += KEY;
    main.version = 2;
    events.change.fire({ document: main, contentChanges: [{ range: new vscode.Range(new Position(2, 0), new Position(2, 0)), text: KEY }] });
    assert.deepEqual(client.calls.at(-1), ["close", "main.py"]);
    assert.ok(!client.calls.some((c) => c[0] === "edit"));
    // src/util.py added to .dynarankignore and saved: closed too.
    writeFileSync(path.join(root, ".dynarankignore"), "notes/\nsrc/util.py\n");
    events.save.fire(new FakeDocument(fileUri(".dynarankignore"), "", "ignore"));
    assert.ok(!client.documents.has("src/util.py"));
    // ...and allowed again once the line goes.
    writeFileSync(path.join(root, ".dynarankignore"), "notes/\n");
    events.save.fire(new FakeDocument(fileUri(".dynarankignore"), "", "ignore"));
    assert.ok(client.documents.has("src/util.py"));
  } finally {
    vscode.workspace.textDocuments = [];
    tracker.dispose();
  }
});

test("no completion request for an excluded document, not even its prefix", async () => {
  const client = new FakeClient();
  const provider = new InlineProvider(() => client as never, opts({ completionMode: "line" }), new SendPolicy(filter()));
  const at = new Position(0, 3);
  assert.deepEqual(await provider.provideInlineCompletionItems(doc(".env") as never, at as never, {} as never, noToken()), []);
  assert.deepEqual(await provider.provideInlineCompletionItems(doc("ci.py") as never, at as never, {} as never, noToken()), []);
  assert.equal(client.requests.length, 0);
  assert.equal((await provider.provideInlineCompletionItems(doc("main.py") as never, at as never, {} as never, noToken())).length, 1);
});

test("without readable rules nothing is sent", () => {
  const client = new FakeClient();
  const tracker = new DocumentTracker(() => client as never, new SendPolicy(undefined));
  events.open.fire(doc("main.py"));
  assert.equal(client.documents.size, 0);
  tracker.dispose();
  assert.throws(() => parseRules({ secret_names: [] }), /max_file_bytes/);
  assert.throws(() => parseRules({ max_file_bytes: 10, secret_names: "*.pem" }), /secret_names/);
});

test("globs and regexes follow Python's fnmatch and re", () => {
  assert.ok(globRegex("id_rsa.*").test("id_rsa.pub") && !globRegex("id_rsa.*").test("id_rsa"));
  assert.ok(globRegex("*.env", true).test("PROD.ENV") && !globRegex("*.env").test("PROD.ENV"));
  assert.ok(globRegex("[!a]x").test("bx") && !globRegex("[!a]x").test("ax"));
  assert.ok(globRegex("file?.txt").test("file1.txt") && !globRegex("file?.txt").test("file.txt"));
  assert.ok(globRegex("a+b(c).json").test("a+b(c).json"));
  assert.ok(globRegex("x[1").test("x[1"), "an unclosed [ is literal");
  assert.equal(pythonRegex("(?i)secret").flags, "i");
  assert.ok(pythonRegex("(?i)secret").test("SECRET"));
  assert.ok(Math.abs(entropy("abcd") - 2) < 1e-9);
  assert.equal(entropy("aaaa"), 0);
  // Secret assignments as code_signals/privacy.py judges them: random-looking values only.
  const judge = (text: string) => filter().reason(path.join(root, "x.py"), root, text);
  assert.equal(judge(`MY_SECRET_TOKEN=` + `"Ab1Cd2Ef3Gh4Ij5Kl6"`), "secret assigned to MY_SECRET_TOKEN");
  assert.equal(judge("token = abcdefghijklmnop1"), undefined, "one run of digits: a name, not a secret");
  assert.equal(judge("Secret: Q1w2E3r4T5y6U7i8O9p0"), "secret assigned to Secret");
  assert.equal(judge("API_KEY: 'user_profile_settings_2'"), undefined, "an identifier, not a secret");
  assert.equal(judge("password = 'aaaaaaaaaaaaaaaa1'"), undefined, "too little entropy");
  assert.equal(judge("AWS = '" + "AKIA" + "IOSFODNN7EXAMPLE'"), "secret content: AWS access key");
  // Every pattern of the shipped file compiles in JavaScript.
  for (const { re } of rules().secretContent) assert.ok(re instanceof RegExp);
});
