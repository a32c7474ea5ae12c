// Drives mlxserve with the official @lmstudio/sdk (1.5.0), as tests/test_sdk_js.py runs it:
//   node sdk_check.cjs <json args>
// args: {port, llms: [keys], embedder: key, clientIdentifier?, clientPasskey?,
//        expectAuthFailure?, quick? (only list the models)}
// Prints one JSON line per check ({"check", "ok", ...}) and exits non-zero if any failed.
"use strict";

const WebSocket = require("ws");
const { LMStudioClient, Chat, rawFunctionTool } = require("@lmstudio/sdk");

const args = JSON.parse(process.argv[2]);
const results = [];

// The 1.5 SDK has no toolChoice option (2.0 sends llm.prediction.toolChoice). A random-weight
// model never calls a tool by itself, so this adds the 2.0 field to predictions that offer
// tools, and the server's grammar then forces the call.
const send = WebSocket.prototype.send;
WebSocket.prototype.send = function (data, ...rest) {
  try {
    const frame = JSON.parse(data);
    const p = frame.creationParameter;
    if (frame.type === "channelCreate" && frame.endpoint === "predict" && p) {
      const fields = p.predictionConfigStack.layers.flatMap((l) => l.config.fields);
      const tools = fields.find((f) => f.key === "llm.prediction.tools");
      if (tools && tools.value.type === "toolArray" && process.env.FORCE_TOOL_CALLS) {
        p.predictionConfigStack.layers.push({
          layerName: "apiOverride",
          config: { fields: [{ key: "llm.prediction.toolChoice", value: { type: "generic", mode: "required" } }] },
        });
        data = JSON.stringify(frame);
      }
    }
  } catch (e) {
    // not JSON: leave it alone
  }
  return send.call(this, data, ...rest);
};

function withTimeout(promise, ms, what) {
  let timer;
  return Promise.race([
    promise,
    new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`${what}: no answer in ${ms} ms`)), ms);
    }),
  ]).finally(() => clearTimeout(timer));
}

async function check(name, fn) {
  try {
    const detail = await withTimeout(fn(), 60000, name);
    results.push({ check: name, ok: true, ...(detail || {}) });
  } catch (e) {
    results.push({ check: name, ok: false, error: String(e && e.stack ? e.stack : e) });
  }
}

function assert(cond, message) {
  if (!cond) throw new Error(message);
}

async function llmChecks(client, key) {
  const tag = key.split("/").pop();
  let model;
  await check(`${tag}: llm.model (get or load)`, async () => {
    const progress = [];
    model = await client.llm.model(key, { onProgress: (p) => progress.push(p), verbose: false });
    const info = await model.getModelInfo();
    assert(info.modelKey === key, `modelKey ${info.modelKey}`);
    return { identifier: model.identifier, progress };
  });
  if (!model) return;
  await check(`${tag}: respond streamed`, async () => {
    const prediction = model.respond([{ role: "user", content: "Hello" }], {
      temperature: 0,
      maxTokens: 6,
      topKSampling: 40,
      topPSampling: 0.9,
      minPSampling: 0.05,
      repeatPenalty: 1.1,
      stopStrings: ["\n\n\n"],
    });
    const parts = [];
    for await (const fragment of prediction) parts.push(fragment.content);
    const result = await prediction.result();
    assert(parts.join("") === result.content, "fragments do not join to the content");
    assert(result.stats.predictedTokensCount === 6, `predicted ${result.stats.predictedTokensCount}`);
    assert(result.stats.stopReason === "maxPredictedTokensReached", result.stats.stopReason);
    assert(typeof result.stats.timeToFirstTokenSec === "number", "no timeToFirstTokenSec");
    assert(result.modelInfo.identifier === model.identifier, "modelInfo");
    return { fragments: parts.length, stats: result.stats };
  });
  await check(`${tag}: respond whole, greedy twice gives the same text`, async () => {
    const chat = Chat.from([{ role: "system", content: "Be brief." }, { role: "user", content: "Hi" }]);
    const a = await model.respond(chat, { temperature: 0, maxTokens: 5 });
    const b = await model.respond(chat, { temperature: 0, maxTokens: 5 });
    assert(a.content === b.content, "greedy outputs differ");
    return { content: a.content };
  });
  await check(`${tag}: complete (raw text, no chat template)`, async () => {
    const result = await model.complete("Once upon a time", { temperature: 0, maxTokens: 5 });
    const count = await model.countTokens("Once upon a time");
    assert(result.stats.predictedTokensCount === 5, `predicted ${result.stats.predictedTokensCount}`);
    assert(result.stats.promptTokensCount <= count + 1, `prompt ${result.stats.promptTokensCount}`);
    return { content: result.content };
  });
  await check(`${tag}: cancel gives userStopped`, async () => {
    const prediction = model.respond("Tell me a long story", { temperature: 0.8, maxTokens: 2000 });
    let n = 0;
    for await (const _fragment of prediction) {
      if (++n === 2) prediction.cancel();
    }
    const result = await prediction.result();
    assert(result.stats.stopReason === "userStopped", result.stats.stopReason);
    return { fragments: n };
  });
  await check(`${tag}: structured output`, async () => {
    const schema = {
      type: "object",
      properties: { name: { type: "string", maxLength: 8 }, age: { type: "integer" } },
      required: ["name", "age"],
      additionalProperties: false,
    };
    const result = await model.respond("Make a person", {
      temperature: 0,
      maxTokens: 60,
      structured: { type: "json", jsonSchema: schema },
    });
    const parsed = JSON.parse(result.content);
    assert(typeof parsed.name === "string" && Number.isInteger(parsed.age), result.content);
    return { content: result.content };
  });
  await check(`${tag}: act with a forced tool call`, async () => {
    const calls = [];
    const add = rawFunctionTool({
      name: "add",
      description: "Add two integers",
      parametersJsonSchema: {
        type: "object",
        properties: { a: { type: "integer", minimum: 0, maximum: 99 }, b: { type: "integer", minimum: 0, maximum: 99 } },
        required: ["a", "b"],
      },
      implementation: (params) => {
        calls.push(params);
        return String(params.a + params.b);
      },
    });
    const messages = [];
    process.env.FORCE_TOOL_CALLS = "1";
    try {
      await model.act("What is 1 + 2?", [add], {
        temperature: 0,
        maxTokens: 40,
        maxPredictionRounds: 2,
        onMessage: (m) => messages.push(m),
      });
    } finally {
      delete process.env.FORCE_TOOL_CALLS;
    }
    assert(calls.length >= 1, "the tool was not called");
    assert(Number.isInteger(calls[0].a) && Number.isInteger(calls[0].b), JSON.stringify(calls[0]));
    return { calls, messages: messages.length };
  });
  await check(`${tag}: tokenize, countTokens, applyPromptTemplate, getLoadConfig`, async () => {
    const tokens = await model.tokenize("hello world");
    const count = await model.countTokens("hello world");
    assert(tokens.length === count, `${tokens.length} != ${count}`);
    const formatted = await model.applyPromptTemplate(Chat.from([{ role: "user", content: "ping" }]));
    assert(formatted.includes("ping"), formatted);
    const ctx = await model.getContextLength();
    assert(Number.isInteger(ctx) && ctx > 0, `context ${ctx}`);
    return { tokens, ctx };
  });
}

async function main() {
  const client = new LMStudioClient({
    baseUrl: `ws://127.0.0.1:${args.port}`,
    ...(args.clientIdentifier ? { clientIdentifier: args.clientIdentifier, clientPasskey: args.clientPasskey } : {}),
  });
  if (args.expectAuthFailure) {
    await check("auth refused", async () => {
      let error;
      try {
        await client.system.listDownloadedModels();
      } catch (e) {
        error = String(e);
      }
      assert(error && /authenticate/i.test(error), `expected an authentication error, got ${error}`);
      return { error };
    });
    return;
  }
  await check("system.listDownloadedModels", async () => {
    const models = await client.system.listDownloadedModels();
    for (const key of [...args.llms, args.embedder]) {
      assert(models.some((m) => m.modelKey === key), `missing ${key}`);
    }
    return { count: models.length };
  });
  if (args.quick) return;
  for (const key of args.llms) await llmChecks(client, key);
  await check("llm.load twice: key and key:2, listLoaded, unload", async () => {
    const key = args.llms[0];
    const a = await client.llm.load(key, { config: { contextLength: 512 }, identifier: "sdk-js-a", ttl: 300 });
    const b = await client.llm.load(key, { config: { contextLength: 512 } });
    const c = await client.llm.load(key, { config: { contextLength: 512 } });
    const loaded = (await client.llm.listLoaded()).map((m) => m.identifier);
    assert(a.identifier === "sdk-js-a", a.identifier);
    assert(c.identifier === `${b.identifier.split(":")[0]}:${Number(b.identifier.split(":")[1] || 1) + 1}`, `${b.identifier} then ${c.identifier}`);
    assert(loaded.includes("sdk-js-a") && loaded.includes(c.identifier), JSON.stringify(loaded));
    assert((await a.getContextLength()) === 512, "contextLength");
    let duplicate;
    try {
      await client.llm.load(key, { identifier: "sdk-js-a" });
    } catch (e) {
      duplicate = String(e);
    }
    assert(duplicate && /already exists/.test(duplicate), `duplicate identifier: ${duplicate}`);
    await a.unload();
    await b.unload();
    await c.unload();
    const after = (await client.llm.listLoaded()).map((m) => m.identifier);
    assert(!after.includes("sdk-js-a") && !after.includes(c.identifier), JSON.stringify(after));
    return { identifiers: [a.identifier, b.identifier, c.identifier] };
  });
  await check("embedding.model: embed, tokenize, countTokens", async () => {
    const model = await client.embedding.model(args.embedder);
    const { embedding } = await model.embed("hello world");
    const tokens = await model.tokenize("hello world");
    const count = await model.countTokens("hello world");
    assert(embedding.length > 0 && embedding.every((x) => typeof x === "number"), "embedding");
    assert(tokens.length === count + 2, `${tokens.length} vs ${count}`);
    return { dimensions: embedding.length };
  });
  await check("unknown model gives an error", async () => {
    let error;
    try {
      await client.llm.model("no-such/model");
    } catch (e) {
      error = String(e);
    }
    assert(error, "no error");
    return { error: error.slice(0, 200) };
  });
}

main()
  .catch((e) => results.push({ check: "main", ok: false, error: String(e && e.stack ? e.stack : e) }))
  .finally(() => {
    for (const r of results) console.log(JSON.stringify(r));
    process.exit(results.every((r) => r.ok) ? 0 : 1);
  });
