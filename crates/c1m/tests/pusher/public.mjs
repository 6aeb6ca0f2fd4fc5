// Real pusher-js (the Node build) and the real `pusher` server SDK against c1m:
//   node public.mjs PORT APP_ID KEY SECRET [API_PORT]
// (API_PORT: where the SDK sends events, another node of a cluster; PORT by default.
// The servers run with the default --max-message-size, 1 MiB.)
// Prints one JSON line per step; crates/c1m/tests/pusher.rs asserts on them. Bounded:
// every wait gives up after 10 s.
import PusherClient from "pusher-js";
import PusherServer from "pusher";
import { clientOptions, run, say, within } from "./steps.mjs";

const [port, appId, key, secret, apiPort = port] = process.argv.slice(2);

const options = clientOptions(port);
const oversized = (1 << 20) + 1;
const server = new PusherServer({
  appId,
  key,
  secret,
  host: "127.0.0.1",
  port: apiPort,
  useTLS: false,
});

async function main() {
  const client = new PusherClient(key, options);
  const socketId = await within(10000, "connected", new Promise((resolve) => {
    client.connection.bind("connected", () => resolve(client.connection.socket_id));
  }));
  say("connected", { socket_id: socketId });

  const news = client.subscribe("news");
  const sports = client.subscribe("sports");
  await within(10000, "subscribed", Promise.all([news, sports].map((channel) =>
    new Promise((resolve, reject) => {
      channel.bind("pusher:subscription_succeeded", resolve);
      channel.bind("pusher:subscription_error", (e) => reject(new Error(JSON.stringify(e))));
    }))));
  say("subscribed");

  // `event` once on each of news and sports: [{channel, data}], by channel.
  const fromBoth = (event) => within(10000, event, new Promise((resolve) => {
    const got = [];
    const take = (channel) => (data) => {
      got.push({ channel, data });
      if (got.length === 2) resolve(got.sort((a, b) => a.channel.localeCompare(b.channel)));
    };
    news.bind(event, take("news"));
    sports.bind(event, take("sports"));
  }));

  // One event to two channels through the SDK's signed HTTP API.
  const greeted = fromBoth("greet");
  const response = await server.trigger(["news", "sports"], "greet", { hello: "world" });
  say("triggered", { status: response.status, body: await response.text() });
  say("received", { got: await greeted });

  // A batch: one event per channel, in one signed request.
  const tallied = fromBoth("tally");
  const batchResponse = await server.triggerBatch([
    { channel: "news", name: "tally", data: { n: 1 } },
    { channel: "sports", name: "tally", data: { n: 2 } },
  ]);
  say("batch", { status: batchResponse.status, got: await tallied });

  // Private channels: the app's auth endpoint is played by the SDK's own signer.
  const authorized = new PusherClient(key, {
    ...options,
    channelAuthorization: {
      customHandler: ({ socketId, channelName }, callback) =>
        callback(null, server.authorizeChannel(socketId, channelName)),
    },
  });
  await within(10000, "authorized client connected", new Promise((resolve) => {
    authorized.connection.bind("connected", resolve);
  }));
  const subscribed = (channel) => within(10000, `subscribe ${channel.name}`, new Promise((resolve) => {
    channel.bind("pusher:subscription_error", (e) => resolve({ error: e }));
    channel.bind("pusher:subscription_succeeded", () => resolve({ succeeded: true }));
  }));
  const vault = authorized.subscribe("private-vault");
  say("private_signed", await subscribed(vault));
  const gotPrivate = within(10000, "private event", new Promise((resolve) => vault.bind("alert", resolve)));
  await server.trigger("private-vault", "alert", { level: 3 });
  say("private_event", { data: await gotPrivate });
  // An event sent with the first client's socket_id (Laravel's toOthers()) reaches the
  // others on the channel, not that client.
  const bystander = authorized.subscribe("news");
  await subscribed(bystander);
  let echoed = 0;
  news.bind("solo", () => echoed++);
  const heard = within(10000, "solo", new Promise((resolve) => bystander.bind("solo", resolve)));
  await server.trigger("news", "solo", { x: 1 }, { socket_id: socketId });
  const soloData = await heard;
  await new Promise((r) => setTimeout(r, 500));
  say("excluded", { other_got: soloData, sender_got: echoed });

  // A signature made for another socket is refused by the server.
  const thief = new PusherClient(key, {
    ...options,
    channelAuthorization: {
      customHandler: ({ channelName }, callback) =>
        callback(null, server.authorizeChannel("1.1", channelName)),
    },
  });
  say("private_forged", await subscribed(thief.subscribe("private-vault")));
  thief.disconnect();
  authorized.disconnect();

  // A wrong secret is refused by the server (the SDK rejects with the answer).
  const forged = new PusherServer({ appId, key, secret: "wrong", host: "127.0.0.1", port: apiPort, useTLS: false });
  try {
    await forged.trigger("news", "greet", { no: 1 });
    say("forged", { status: 200 });
  } catch (e) {
    say("forged", { status: e.status, body: e.body });
  }

  // A request signed 700 s ago (past the 600 s Pusher allows) is refused: the SDK signs
  // with the time Date.now gives it.
  const realNow = Date.now;
  Date.now = () => realNow() - 700_000;
  try {
    await server.trigger("news", "late", { n: 1 });
    say("stale", { status: 200 });
  } catch (e) {
    say("stale", { status: e.status, body: e.body });
  } finally {
    Date.now = realNow;
  }

  // An event larger than the server's --max-message-size is refused with 413.
  try {
    await server.trigger("news", "huge", "x".repeat(oversized));
    say("oversized", { status: 200 });
  } catch (e) {
    say("oversized", { status: e.status, body: e.body });
  }

  // End-to-end encrypted channels: the SDK seals the event with a key derived from a
  // master key the server never sees; pusher-js opens it with the shared secret its
  // auth endpoint gave it. The server checks the signature as for a private channel and
  // passes the ciphertext through untouched.
  const sealer = new PusherServer({
    appId, key, secret, host: "127.0.0.1", port: apiPort, useTLS: false,
    encryptionMasterKeyBase64: Buffer.alloc(32, 7).toString("base64"),
  });
  const sealed = new PusherClient(key, {
    ...options,
    channelAuthorization: {
      customHandler: ({ socketId, channelName }, callback) =>
        callback(null, sealer.authorizeChannel(socketId, channelName)),
    },
  });
  const wire = [];
  sealed.connection.bind("message", (m) => {
    if (m.event === "secret") wire.push(m.data);
  });
  const secrets = sealed.subscribe("private-encrypted-secrets");
  say("encrypted_signed", await subscribed(secrets));
  const opened = within(10000, "encrypted event", new Promise((resolve) => secrets.bind("secret", resolve)));
  await sealer.trigger("private-encrypted-secrets", "secret", { pin: 1234 });
  say("encrypted_event", { data: await opened, wire });
  sealed.disconnect();

  // An unknown key: the connection fails with error 4001 and does not retry.
  const stranger = new PusherClient("no-such-key", options);
  const error = await within(10000, "unknown key", new Promise((resolve) => {
    stranger.connection.bind("error", (e) => resolve(e));
  }));
  say("unknown_key", { code: error?.data?.code ?? error?.error?.data?.code ?? null, state: stranger.connection.state });
  stranger.disconnect();
  client.disconnect();
  say("done");
}

run(main);
