// pusher-js against a server at one of its limits.
//   node limits.mjs quota PORT_A PORT_B KEY      (the app's max_connections is 2)
//   node limits.mjs capacity PORT_A PORT_B KEY   (the server's --max-connections is 2)
// Two clients connect (the first on PORT_A, the second on PORT_B: two nodes of a
// cluster, or the same server twice), then a third on PORT_A is refused: with 4004
// (over quota) pusher-js gives up; with 4100 (over capacity) it retries by itself
// and gets in once a place is free. One JSON line per step; every wait is bounded.
import PusherClient from "pusher-js";
import { clientOptions, run, say, within } from "./steps.mjs";

const [mode, portA, portB, key] = process.argv.slice(2);
const pause = (ms) => new Promise((r) => setTimeout(r, ms));

function client(port) {
  const pusher = new PusherClient(key, clientOptions(port));
  pusher.errors = [];
  pusher.connection.bind("error", (e) => {
    const code = e?.data?.code ?? e?.error?.data?.code;
    if (code) pusher.errors.push(code);
  });
  return pusher;
}
const state = (pusher, wanted, ms) =>
  within(ms, `state ${wanted}`, new Promise((resolve) => {
    if (pusher.connection.state === wanted) return resolve();
    pusher.connection.bind("state_change", ({ current }) => current === wanted && resolve());
  }));

async function main() {
  const a = client(portA);
  await state(a, "connected", 10000);
  const b = client(portB);
  await state(b, "connected", 10000);
  // The other node's count comes with its report, at most a second old.
  await pause(2500);
  const c = client(portA);
  await within(10000, "a refusal", (async () => { while (c.errors.length === 0) await pause(20); })());
  say("refused", { code: c.errors[0], state: c.connection.state });
  if (mode === "quota") {
    // Refused for good: pusher-js does not try again by itself.
    await pause(2500);
    say("gave_up", { state: c.connection.state, errors: c.errors });
    a.disconnect();
    await pause(2500);
    c.connect();
    await state(c, "connected", 10000);
    say("room_again", { socket_id: c.connection.socket_id });
  } else {
    // Over capacity: pusher-js backs off and retries; once a place is free it gets in.
    a.disconnect();
    await state(c, "connected", 15000);
    say("came_back", { errors: c.errors, socket_id: c.connection.socket_id });
  }
  for (const pusher of [a, b, c]) pusher.disconnect();
  say("done");
}

run(main);
