// c1m's Pusher webhooks, received by a Node HTTP server and checked with the `pusher`
// SDK's own webhook validator (`pusher.webhook(request).isValid()`):
//   node webhooks.mjs PORT APP_ID KEY SECRET OTHER_PORT HOOK_PORT
// The server runs with --pusher-client-events --pusher-webhook http://127.0.0.1:HOOK_PORT/.
// Alice (on PORT) and Bob (on OTHER_PORT, another node of a cluster or the same server)
// join a presence channel, Alice sends a client event, both leave. Prints the events
// received (each valid, each once), one JSON line per step; every wait is bounded.
import http from "node:http";
import PusherClient from "pusher-js";
import PusherServer from "pusher";
import { clientOptions, run, say, within } from "./steps.mjs";

const [port, appId, key, secret, otherPort, hookPort] = process.argv.slice(2);
const server = new PusherServer({ appId, key, secret, host: "127.0.0.1", port, useTLS: false });
const ROOM = "presence-hooks";

const received = [];
let invalid = 0;
const hooks = http.createServer((req, res) => {
  const chunks = [];
  req.on("data", (c) => chunks.push(c));
  req.on("end", () => {
    const webhook = server.webhook({ headers: req.headers, rawBody: Buffer.concat(chunks).toString() });
    if (webhook.isValid()) {
      received.push(...webhook.getEvents());
    } else {
      invalid++;
    }
    res.writeHead(200);
    res.end();
  });
});

function client(wsPort, user) {
  return new PusherClient(key, {
    ...clientOptions(wsPort),
    channelAuthorization: {
      customHandler: ({ socketId, channelName }, callback) =>
        callback(null, server.authorizeChannel(socketId, channelName, { user_id: user })),
    },
  });
}

const joined = (pusher) => {
  const channel = pusher.subscribe(ROOM);
  return within(10000, "join", new Promise((resolve, reject) => {
    channel.bind("pusher:subscription_succeeded", () => resolve(channel));
    channel.bind("pusher:subscription_error", (e) => reject(new Error(JSON.stringify(e))));
  }));
};
const pause = (ms) => new Promise((r) => setTimeout(r, ms));
const until = (what, test) => within(15000, what, (async () => {
  while (!test()) await pause(50);
})());

async function main() {
  await new Promise((resolve) => hooks.listen(Number(hookPort), "127.0.0.1", resolve));
  const alice = client(port, "alice");
  const room = await joined(alice);
  await until("occupied", () => received.some((e) => e.name === "member_added"));
  const bob = client(otherPort, "bob");
  await joined(bob);
  await until("bob added", () => received.filter((e) => e.name === "member_added").length === 2);
  room.trigger("client-ping", { n: 1 });
  await until("client event", () => received.some((e) => e.name === "client_event"));
  bob.disconnect();
  await until("bob removed", () => received.some((e) => e.name === "member_removed"));
  alice.unsubscribe(ROOM);
  await until("vacated", () => received.some((e) => e.name === "channel_vacated"));
  // Anything sent twice would arrive by now.
  await pause(1500);
  say("webhooks", { events: received, invalid });
  alice.disconnect();
  hooks.close();
  say("done");
}

run(main);
