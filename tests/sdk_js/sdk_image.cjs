// Sends an image through the official @lmstudio/sdk (1.5.0), as tests/test_vision.py runs it:
//   node sdk_image.cjs <json args>
// args: {port, llms: [keys], image: path to a picture, question, maxTokens}
// For each model: client.files.prepareImage(image), then a greedy respond() with the handle.
// Prints one JSON line per check ({"check", "ok", ...}) and exits non-zero if any failed.
"use strict";

const fs = require("fs");
const { LMStudioClient, Chat } = require("@lmstudio/sdk");

const args = JSON.parse(process.argv[2]);
const results = [];

function assert(cond, message) {
  if (!cond) throw new Error(message);
}

async function check(name, fn) {
  try {
    results.push({ check: name, ok: true, ...(await fn()) });
  } catch (e) {
    results.push({ check: name, ok: false, error: String(e && e.stack ? e.stack : e) });
  }
}

async function main() {
  const client = new LMStudioClient({ baseUrl: `ws://127.0.0.1:${args.port}` });
  const size = fs.statSync(args.image).size;
  for (const key of args.llms) {
    await check(`${key}: prepareImage and respond`, async () => {
      const handle = await client.files.prepareImage(args.image);
      assert(handle.type === "image", `type ${handle.type}`);
      assert(handle.sizeBytes === size, `sizeBytes ${handle.sizeBytes} vs ${size}`);
      const model = await client.llm.model(key, { verbose: false });
      const info = await model.getModelInfo();
      const chat = Chat.empty();
      chat.append("user", args.question, { images: [handle] });
      const result = await model.respond(chat, { temperature: 0, maxTokens: args.maxTokens });
      return {
        model: key,
        vision: info.vision,
        content: result.content,
        promptTokens: result.stats.promptTokensCount,
      };
    });
  }
}

main()
  .catch((e) => results.push({ check: "main", ok: false, error: String(e && e.stack ? e.stack : e) }))
  .finally(() => {
    for (const r of results) console.log(JSON.stringify(r));
    process.exit(results.every((r) => r.ok) ? 0 : 1);
  });
