// User sign-in (pusher-js `signin()`, signed by the `pusher` SDK's `authenticateUser`),
// `sendToUser` and `terminateUserConnections` against c1m:
//   node users.mjs PORT APP_ID KEY SECRET [API_PORT]
// Carol and a bystander connect to PORT; the SDK talks to API_PORT (another node of a
// cluster; PORT by default). One JSON line per step; every wait is bounded.
import PusherClient from "pusher-js";
import PusherServer from "pusher";
import { clientOptions, run, say, within } from "./steps.mjs";

const [port, appId, key, secret, apiPort = port] = process.argv.slice(2);
const server = new PusherServer({ appId, key, secret, host: "127.0.0.1", port: apiPort, useTLS: false });

function client(sign) {
  return new PusherClient(key, {
    ...clientOptions(port),
    userAuthentication: { customHandler: ({ socketId }, callback) => callback(null, sign(socketId)) },
  });
}
const connected = (pusher) => within(10000, "connected", new Promise((resolve) => {
  pusher.connection.bind("connected", resolve);
}));
const pause = (ms) => new Promise((r) => setTimeout(r, ms));

async function main() {
  const carol = client((socketId) => server.authenticateUser(socketId, { id: "carol", user_info: { name: "Carol" } }));
  await connected(carol);
  carol.signin();
  await within(10000, "signed in", carol.user.signinDonePromise);
  say("signed_in", { user: carol.user.user_data });

  // sendToUser reaches Carol through her user channel; ask until her subscription is in.
  const note = within(10000, "note", new Promise((resolve) => carol.user.bind("note", resolve)));
  let got = null;
  note.then((data) => { got = data; });
  for (let i = 0; i < 50 && got === null; i++) {
    await server.sendToUser("carol", "note", { text: "hi" });
    await pause(200);
  }
  say("sent_to_user", { got: await note });

  // A sign-in signed for other user data is refused; the connection stays.
  const mallory = client((socketId) => {
    const signed = server.authenticateUser(socketId, { id: "mallory" });
    return { auth: signed.auth, user_data: JSON.stringify({ id: "carol" }) };
  });
  await connected(mallory);
  const refused = within(10000, "signin refused", new Promise((resolve) => {
    mallory.connection.bind("error", (e) => resolve(e?.data ?? e?.error?.data ?? e));
  }));
  mallory.signin();
  say("forged_signin", { error: await refused, state: mallory.connection.state });

  // terminate_connections: Carol's connection closes with 4009; Mallory's stays.
  const closed = within(10000, "terminated", new Promise((resolve) => {
    carol.connection.bind("error", (e) => resolve(e?.data ?? e?.error?.data ?? e));
  }));
  const response = await server.terminateUserConnections("carol");
  const error = await closed;
  await pause(500);
  say("terminated", {
    status: response.status,
    error,
    carol: carol.connection.state,
    mallory: mallory.connection.state,
  });
  carol.disconnect();
  mallory.disconnect();
  say("done");
}

run(main);
