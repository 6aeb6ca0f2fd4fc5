// Interop driver for c1m's integration tests (crates/c1m/tests/js_client.rs): subscribes
// to TOPIC with the client, prints "ready" once the first connection is open, and when
// a publication whose data is "end" arrives, prints one JSON line of what it saw (every
// offset handed over, the recovery answers, how many times it connected) and exits.
//
//   node --experimental-websocket interop/resume.mjs ws://127.0.0.1:PORT/ TOPIC
import { Client } from "../index.js";

const [url, topic] = process.argv.slice(2);
const client = new Client(url, { minDelay: 100, maxDelay: 1000 });
const seen = [];
const recoveries = [];
const gaps = [];
let opens = 0;
client.on("open", () => {
  if (opens++ === 0) console.log("ready");
});
client.on("recovery", (r) => recoveries.push(r));
client.on("gap", (g) => gaps.push(g));
client.subscribe(topic, (data, meta) => {
  seen.push(meta.offset);
  if (data === "end") {
    console.log(JSON.stringify({ seen, recoveries, gaps, opens }));
    client.close();
    process.exit(0);
  }
});
setTimeout(() => {
  console.error("no end within 60 s", JSON.stringify({ seen, recoveries, opens }));
  process.exit(1);
}, 60000);
