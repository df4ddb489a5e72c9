// The official TypeScript SDK against the gateway: create, stream, count_tokens, an error.
// Usage: node client.js BASE_URL KEY   (prints one JSON object with what it saw)
const Anthropic = require("@anthropic-ai/sdk").default;

async function main() {
  const [baseURL, apiKey] = process.argv.slice(2);
  const client = new Anthropic({ baseURL, apiKey, maxRetries: 0 });
  const messages = [{ role: "user", content: "Hello" }];
  const created = await client.messages.create({ model: "claude-opus-4-8", max_tokens: 16, messages });
  const texts = [];
  const stream = client.messages.stream({ model: "claude-opus-4-8", max_tokens: 16, messages });
  stream.on("text", (text) => texts.push(text));
  const final = await stream.finalMessage();
  const counted = await client.messages.countTokens({ model: "claude-opus-4-8", messages });
  let error = null;
  try {
    await client.messages.create({ model: "claude-foo", max_tokens: 1, messages });
  } catch (e) {
    error = { status: e.status, type: e.error && e.error.error && e.error.error.type };
  }
  console.log(JSON.stringify({
    text: created.content[0].text, streamed: texts, output_tokens: final.usage.output_tokens,
    input_tokens: counted.input_tokens, error,
  }));
}

main().catch((e) => { console.error(e); process.exit(1); });
