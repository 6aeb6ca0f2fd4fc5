// Real pusher-js on presence channels, and client events, against c1m:
//   node presence.mjs PORT APP_ID KEY SECRET [OTHER_PORT]
// Alice connects to PORT; Bob (with two sockets, as with two tabs) to OTHER_PORT (another
// node of a cluster; PORT by default). The app's auth endpoint is played by the `pusher`
// SDK's `authorizeChannel` with each user's channel data. The server runs with
// --pusher-client-events. Prints one JSON line per step; crates/c1m/tests/pusher.rs
// asserts on them. Bounded: every wait gives up after 10 s.
import PusherClient from "pusher-js";
import PusherServer from "pusher";
import { clientOptions, run, say, within } from "./steps.mjs";

const [port, appId, key, secret, otherPort = port] = process.argv.slice(2);
const server = new PusherServer({ appId, key, secret, host: "127.0.0.1", port, useTLS: false });
const ROOM = "presence-room";

/** A pusher-js client on `wsPort` signed in as `user` (or with `sign` as its auth). */
function client(wsPort, user, sign) {
  return new PusherClient(key, {
    ...clientOptions(wsPort),
    channelAuthorization: {
      customHandler: ({ socketId, channelName }, callback) =>
        callback(null, sign ? sign(socketId, channelName) : server.authorizeChannel(socketId, channelName, user)),
    },
  });
}

/** Subscribes and resolves with the channel once the server answers (or its error). */
function join(pusher, name) {
  const channel = pusher.subscribe(name);
  return within(10000, `join ${name}`, new Promise((resolve) => {
    channel.bind("pusher:subscription_succeeded", (members) => resolve({ channel, members }));
    channel.bind("pusher:subscription_error", (error) => resolve({ channel, error }));
  }));
}

/** The members pusher-js holds, as [{id, info}] sorted by id. */
function roster(members) {
  const list = [];
  members.each((m) => list.push({ id: m.id, info: m.info }));
  return list.sort((a, b) => a.id.localeCompare(b.id));
}

const next = (channel, event) =>
  within(10000, event, new Promise((resolve) => channel.bind(event, (data, meta) => resolve({ data, meta }))));
const pause = (ms) => new Promise((r) => setTimeout(r, ms));

async function main() {
  const alice = client(port, { user_id: "alice", user_info: { name: "Alice" } });
  const a = await join(alice, ROOM);
  say("alice_joined", { members: roster(a.members), me: a.members.me, count: a.members.count });

  // Bob's first socket: Alice is told; Bob sees both.
  const added = next(a.channel, "pusher:member_added");
  const bob1 = client(otherPort, { user_id: "bob", user_info: { name: "Bob" } });
  const b1 = await join(bob1, ROOM);
  say("bob_joined", { members: roster(b1.members), count: b1.members.count });
  say("alice_saw_bob", { member: (await added).data });

  // Bob's second socket: still one Bob, and Alice hears nothing.
  let extraAdds = 0;
  a.channel.bind("pusher:member_added", () => extraAdds++);
  const bob2 = client(otherPort, { user_id: "bob", user_info: { name: "Bob" } });
  const b2 = await join(bob2, ROOM);
  await pause(500);
  say("bob_again", { count: b2.members.count, alice_extra_adds: extraAdds });

  // The read API through the SDK's signed GETs: counts from other workers and nodes
  // arrive with their reports (within a second or two), so ask until they add up.
  const read = async (path, params) => (await server.get({ path, params })).json();
  let channel;
  for (let i = 0; i < 50; i++) {
    channel = await read(`/channels/${ROOM}`, { info: "user_count,subscription_count" });
    if (channel.subscription_count === 3) break;
    await pause(100);
  }
  const listed = await read("/channels", { filter_by_prefix: "presence-", info: "user_count" });
  const users = await read(`/channels/${ROOM}/users`);
  let refusal;
  try {
    await read("/channels/lobby/users");
  } catch (e) {
    refusal = e.status;
  }
  say("read_api", { channel, listed, users, refusal });

  // A client event: both of Bob's sockets get it with Alice's user id; Alice does not.
  let echoed = 0;
  a.channel.bind("client-typing", () => echoed++);
  const heard = Promise.all([next(b1.channel, "client-typing"), next(b2.channel, "client-typing")]);
  a.channel.trigger("client-typing", { typing: true });
  const [h1, h2] = await heard;
  await pause(300);
  say("client_event", { data: h1.data, user_id: h1.meta?.user_id, both: h2.data.typing === true, sender_got: echoed });

  // Over the rate limit (10 a second): the rest are refused with error 4301.
  const refused = within(10000, "rate limit error", new Promise((resolve) => {
    alice.connection.bind("error", (e) => resolve(e?.data ?? e?.error?.data ?? e));
  }));
  let delivered = 0;
  b1.channel.bind("client-burst", () => delivered++);
  for (let i = 0; i < 15; i++) a.channel.trigger("client-burst", { i });
  const error = await refused;
  await pause(1000);
  say("rate_limited", { code: error?.code, message: error?.message, delivered });

  // A client event on a public channel is refused (pusher-js sends it as asked).
  const publicRefusal = within(10000, "public client event", new Promise((resolve) => {
    bob1.connection.bind("error", (e) => resolve(e?.data ?? e?.error?.data ?? e));
  }));
  const lobby = await join(bob1, "lobby");
  lobby.channel.trigger("client-shout", { x: 1 });
  say("public_client_event", await publicRefusal);

  // A signature over other channel data (a user claiming to be someone else): refused.
  const mallory = client(port, null, (socketId, channelName) => {
    const signed = server.authorizeChannel(socketId, channelName, { user_id: "mallory" });
    return { auth: signed.auth, channel_data: JSON.stringify({ user_id: "alice" }) };
  });
  const m = await join(mallory, ROOM);
  say("forged_member", { error: m.error });
  mallory.disconnect();

  // Bob's first socket leaves: Bob is still there. His last: Alice is told he left.
  let removes = 0;
  a.channel.bind("pusher:member_removed", () => removes++);
  bob1.disconnect();
  await pause(700);
  const removedEarly = removes;
  const removed = next(a.channel, "pusher:member_removed");
  bob2.unsubscribe(ROOM);
  const gone = (await removed).data;
  say("bob_left", { after_first_socket: removedEarly, member: gone, count: a.members.count });
  bob2.disconnect();
  alice.disconnect();
  say("done");
}

run(main);
