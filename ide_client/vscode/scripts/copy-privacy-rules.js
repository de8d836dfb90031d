// Copies the privacy rules the Python side reads (code_signals/privacy_rules.json)
// next to the compiled code, so the packaged extension applies the same rules.
// Run by `npm run build`; a missing or broken file fails the build: never ship without rules.

const fs = require("fs");
const path = require("path");

const source = path.resolve(__dirname, "../../../code_signals/privacy_rules.json");
const target = path.resolve(__dirname, "../out/privacy_rules.json");

JSON.parse(fs.readFileSync(source, "utf8"));
fs.mkdirSync(path.dirname(target), { recursive: true });
fs.copyFileSync(source, target);
