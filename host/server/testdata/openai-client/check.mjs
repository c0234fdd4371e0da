// Drives orch-host serve with the official OpenAI Node client.
//
//   ORCH_BASE_URL=http://127.0.0.1:8080/v1 ORCH_MODELS=gpt2,llama,gpt-oss [ORCH_API_KEY=k] node check.mjs
//
// For every model: /v1/models lists it; chat and text completions, streamed
// and not, come back in the shapes the client parses (usage with
// stream_options.include_usage, n choices, stop strings, greedy determinism);
// errors arrive as the client's typed errors (404 unknown model, 400 naming the
// parameter). gpt-oss models (name containing "gpt-oss") also get
// reasoning_effort and a forced tool call. Exits 1 on the first failure.
import OpenAI from "openai";
import assert from "node:assert/strict";

const baseURL = process.env.ORCH_BASE_URL ?? "http://127.0.0.1:8080/v1";
const models = (process.env.ORCH_MODELS ?? "").split(",").filter(Boolean);
const client = new OpenAI({ baseURL, apiKey: process.env.ORCH_API_KEY ?? "none", maxRetries: 0, timeout: 60_000 });

let passed = 0;
async function check(name, fn) {
  try {
    await fn();
    passed++;
    console.log(`ok   ${name}`);
  } catch (e) {
    console.error(`FAIL ${name}: ${e?.stack ?? e}`);
    process.exit(1);
  }
}

function checkUsage(u, what) {
  assert.ok(u, `${what}: usage missing`);
  assert.ok(u.prompt_tokens > 0, `${what}: prompt_tokens`);
  assert.ok(u.completion_tokens > 0, `${what}: completion_tokens`);
  assert.equal(u.total_tokens, u.prompt_tokens + u.completion_tokens);
}

const listed = (await client.models.list()).data.map((m) => m.id);
for (const model of models) {
  const harmony = model.includes("gpt-oss");
  const messages = [
    { role: "system", content: "You are terse." },
    { role: "user", content: "Say hello." },
  ];

  await check(`${model}: listed in /v1/models`, async () => {
    assert.ok(listed.includes(model), `${model} not in ${listed}`);
  });

  await check(`${model}: chat, non-streamed`, async () => {
    const r = await client.chat.completions.create({ model, messages, max_tokens: 8, temperature: 0 });
    assert.equal(r.object, "chat.completion");
    assert.equal(r.model, model);
    assert.equal(r.choices.length, 1);
    assert.equal(r.choices[0].message.role, "assistant");
    assert.ok(["stop", "length", "tool_calls"].includes(r.choices[0].finish_reason), r.choices[0].finish_reason);
    checkUsage(r.usage, "chat");
  });

  await check(`${model}: chat, streamed with usage`, async () => {
    const stream = await client.chat.completions.create({
      model, messages, max_tokens: 8, stream: true, stream_options: { include_usage: true },
    });
    let chunks = 0, finish = null, usage = null, sawRole = false;
    for await (const c of stream) {
      chunks++;
      assert.equal(c.object, "chat.completion.chunk");
      if (c.usage) usage = c.usage;
      for (const ch of c.choices) {
        if (ch.delta?.role === "assistant") sawRole = true;
        if (ch.finish_reason) finish = ch.finish_reason;
      }
    }
    assert.ok(chunks >= 3, `only ${chunks} chunks`);
    assert.ok(sawRole, "no assistant role delta");
    assert.ok(finish, "no finish_reason");
    checkUsage(usage, "stream");
  });

  await check(`${model}: greedy chat is deterministic, n=2`, async () => {
    const a = await client.chat.completions.create({ model, messages, max_tokens: 6, temperature: 0, n: 2 });
    const b = await client.chat.completions.create({ model, messages, max_tokens: 6, temperature: 0 });
    assert.equal(a.choices.length, 2);
    assert.equal(a.choices[0].message.content, b.choices[0].message.content);
    assert.equal(a.choices[1].message.content, b.choices[0].message.content);
  });

  await check(`${model}: completions, non-streamed and streamed`, async () => {
    const r = await client.completions.create({ model, prompt: "Once upon a time", max_tokens: 6, temperature: 0 });
    assert.equal(r.object, "text_completion");
    assert.equal(r.choices.length, 1);
    checkUsage(r.usage, "completion");
    const stream = await client.completions.create({
      model, prompt: "Once upon a time", max_tokens: 6, temperature: 0, stream: true, stream_options: { include_usage: true },
    });
    let text = "", usage = null;
    for await (const c of stream) {
      if (c.usage) usage = c.usage;
      for (const ch of c.choices) text += ch.text ?? "";
    }
    assert.equal(text, r.choices[0].text, "streamed and non-streamed greedy text differ");
    checkUsage(usage, "completion stream");
  });

  await check(`${model}: stop strings do not leak`, async () => {
    const r = await client.completions.create({ model, prompt: "Once upon a time", max_tokens: 12, temperature: 0 });
    const full = r.choices[0].text;
    if (full.length < 4) return; // nothing to cut
    const stop = full.slice(2, 4);
    const s = await client.completions.create({ model, prompt: "Once upon a time", max_tokens: 12, temperature: 0, stop: [stop] });
    assert.equal(s.choices[0].text, full.slice(0, full.indexOf(stop)));
    assert.equal(s.choices[0].finish_reason, "stop");
  });

  await check(`${model}: logprobs`, async () => {
    const r = await client.chat.completions.create({ model, messages, max_tokens: 3, logprobs: true, top_logprobs: 2 });
    const lp = r.choices[0].logprobs?.content;
    assert.ok(Array.isArray(lp) && lp.length > 0, "no logprobs");
    assert.equal(lp[0].top_logprobs.length, 2);
  });

  await check(`${model}: errors are typed`, async () => {
    await assert.rejects(client.chat.completions.create({ model: "no-such-model", messages }), (e) => e instanceof OpenAI.NotFoundError);
    await assert.rejects(client.chat.completions.create({ model, messages, temperature: 5 }),
      (e) => e instanceof OpenAI.BadRequestError && e.param === "temperature");
  });

  if (harmony) {
    await check(`${model}: reasoning_effort and forced tool call`, async () => {
      const r = await client.chat.completions.create({
        model, messages, max_tokens: 16, reasoning_effort: "high", temperature: 0,
        tools: [{ type: "function", function: { name: "get_weather", description: "Weather for a city",
          parameters: { type: "object", properties: { city: { type: "string" } }, required: ["city"] } } }],
        tool_choice: { type: "function", function: { name: "get_weather" } },
      });
      const m = r.choices[0].message;
      for (const tc of m.tool_calls ?? []) {
        assert.equal(tc.type, "function");
        assert.equal(tc.function.name, "get_weather");
        assert.equal(typeof tc.function.arguments, "string");
      }
    });
  } else {
    await check(`${model}: reasoning_effort is refused`, async () => {
      await assert.rejects(client.chat.completions.create({ model, messages, reasoning_effort: "low" }),
        (e) => e instanceof OpenAI.BadRequestError && e.param === "reasoning_effort");
    });
  }
}
console.log(`all ${passed} checks passed against ${baseURL} (${models.join(", ")})`);
