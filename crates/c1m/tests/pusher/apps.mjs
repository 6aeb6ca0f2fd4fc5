// Two Pusher apps on one c1m server: each app's clients, events, presence members,
// read API and webhooks are its own, whatever the channel names.
//   node apps.mjs PORT ID1 KEY1 SECRET1 ID2 KEY2 SECRET2 HOOK_PORT
// App 2 has client events and a webhook to 127.0.0.1:HOOK_PORT; app 1 has neither.
// One JSON line per step; every wait is bounded.
import http from "node:http";
import PusherClient from "pusher-js";
import PusherServer from "pusher";
import { clientOptions, run, say, within } from "./steps.mjs";

const [port, id1, key1, secret1, id2, key2, secret2, hookPort] = process.argv.slice(2);
const sdk = (appId, key, secret) =>
  new PusherServer({ appId, key, secret, host: "127.0.0.1", port, useTLS: false });
const [one, two] = [sdk(id1, key1, secret1), sdk(id2, key2, secret2)];

const hooks = [];
const receiver = http.createServer((req, res) => {
  const chunks = [];
  req.on("data", (c) => chunks.push(c));
  req.on("end", () => {
    const rawBody = Buffer.concat(chunks).toString();
    hooks.push({
      valid_for_two: two.webhook({ headers: req.headers, rawBody }).isValid(),
      valid_for_one: one.webhook({ headers: req.headers, rawBody }).isValid(),
      events: JSON.parse(rawBody).events,
    });
    res.writeHead(200);
    res.end();
  });
});

function client(key, server, user) {
  return new PusherClient(key, {
    ...clientOptions(port),
    channelAuthorization: {
      customHandler: ({ socketId, channelName }, callback) =>
        callback(null, server.authorizeChannel(socketId, channelName, { user_id: user })),
    },
  });
}
const joined = (channel) => within(10000, `join ${channel.name}`, new Promise((resolve, reject) => {
  channel.bind("pusher:subscription_succeeded", resolve);
  channel.bind("pusher:subscription_error", (e) => reject(new Error(JSON.stringify(e))));
}));
const pause = (ms) => new Promise((r) => setTimeout(r, ms));

async function main() {
  await new Promise((resolve) => receiver.listen(Number(hookPort), "127.0.0.1", resolve));
  const a = client(key1, one, "ann");
  const b = client(key2, two, "bea");
  // The same channel names in both apps.
  const [aNews, bNews] = [a.subscribe("news"), b.subscribe("news")];
  const [aRoom, bRoom] = [a.subscribe("presence-room"), b.subscribe("presence-room")];
  const [, , aMembers, bMembers] = await Promise.all([aNews, bNews, aRoom, bRoom].map(joined));
  say("members", { one: aMembers.count, two: bMembers.count });

  const got = { a: [], b: [] };
  aNews.bind("hello", (d) => got.a.push(d.from));
  bNews.bind("hello", (d) => got.b.push(d.from));
  await one.trigger("news", "hello", { from: "one" });
  await two.trigger("news", "hello", { from: "two" });
  await within(10000, "events", (async () => { while (got.a.length + got.b.length < 2) await pause(50); })());
  await pause(300);
  say("events", got);

  // Workers report their counts every second: ask until both apps list both channels.
  const channels = async (server) => (await server.get({ path: "/channels", params: {} })).json();
  let read;
  for (let i = 0; i < 50; i++) {
    read = { one: await channels(one), two: await channels(two) };
    if (Object.keys(read.one.channels).length + Object.keys(read.two.channels).length >= 4) break;
    await pause(100);
  }
  say("read", read);

  // Client events: on for app 2, off for app 1.
  const aErr = within(10000, "app 1 refuses", new Promise((resolve) => {
    a.connection.bind("error", (e) => resolve(e?.data ?? e?.error?.data ?? e));
  }));
  aRoom.trigger("client-x", {});
  say("client_events", { one: await aErr, two_sent: bRoom.trigger("client-x", { ok: 1 }) });

  await within(10000, "webhooks", (async () => {
    while (!hooks.some((h) => h.events.some((e) => e.name === "client_event"))) await pause(50);
  })());
  say("webhooks", { hooks });
  // Bea leaves: app 2's channel has no members left, and its webhook says so.
  b.disconnect();
  const users = async () => (await two.get({ path: "/channels/presence-room/users" })).json();
  let left;
  for (let i = 0; i < 50; i++) {
    left = await users();
    if (left.users.length === 0 && hooks.some((h) => h.events.some((e) => e.name === "member_removed"))) break;
    await pause(100);
  }
  say("left", { users: left.users, removed: hooks.some((h) => h.events.some((e) => e.name === "member_removed" && e.user_id === "bea")) });
  a.disconnect();
  receiver.close();
  say("done");
}

run(main);
