// pusher-js (the Node build) left to reconnect by itself, as the browser page of
// crates/c1m/tests/pusher.rs does in Chromium:
//   node reconnect.mjs PORT KEY REPORT_ADDR
// Subscribes to `news` and keeps every distinct `greet` event; on the first whose `n` is
// "end" it POSTs {got, connects} to http://REPORT_ADDR/ and exits. The test publishes,
// takes the server, worker or node away, and publishes "end" until the report comes.
// Bounded: it gives up after 60 s.
import PusherClient from "pusher-js";
import { clientOptions } from "./steps.mjs";

const [port, key, reportAddr] = process.argv.slice(2);
const got = [];
let connects = 0;
const client = new PusherClient(key, clientOptions(port));
client.connection.bind("connected", () => connects++);
client.subscribe("news").bind("greet", async (data) => {
  if (got.some((g) => g.n === data.n)) return;
  got.push(data);
  if (data.n === "end") {
    const body = JSON.stringify({ got, connects });
    await fetch(`http://${reportAddr}/`, { method: "POST", body }).catch(() => {});
    client.disconnect();
    process.exit(0);
  }
});
setTimeout(() => process.exit(1), 60000);
