// One messages.create with the SDK's default retries (2), timed: a refusal the gateway marks
// 'x-should-retry: false' must come back at once, not after the SDK slept on 'retry-after'.
// Usage: node no_retry.js BASE_URL KEY   (prints one JSON object with what it saw)
const Anthropic = require("@anthropic-ai/sdk").default;

async function main() {
  const [baseURL, apiKey] = process.argv.slice(2);
  const client = new Anthropic({ baseURL, apiKey, maxRetries: 2 });
  const started = Date.now();
  try {
    await client.messages.create({
      model: "claude-opus-4-8", max_tokens: 1, messages: [{ role: "user", content: "Hi" }] });
    console.log(JSON.stringify({ status: 200 }));
  } catch (e) {
    console.log(JSON.stringify({
      status: e.status, type: e.error && e.error.error && e.error.error.type,
      should_retry: e.headers && e.headers.get("x-should-retry"),
      seconds: (Date.now() - started) / 1000,
    }));
  }
}

main().catch((e) => { console.error(e); process.exit(1); });
