// Real Laravel Echo on a presence channel (`join` with here / joining / leaving) and
// client events (`whisper` / `listenForWhisper`), against c1m:
//   node echo_presence.mjs PORT APP_ID KEY SECRET [OTHER_PORT]
// Ann connects to PORT, Ben to OTHER_PORT (another node of a cluster; PORT by default).
// The app's /broadcasting/auth endpoint is played by the `pusher` SDK's
// `authorizeChannel` with each user's data, as Laravel's broadcaster does. The server
// runs with --pusher-client-events. One JSON line per step; every wait is bounded.
import Echo from "laravel-echo";
import PusherClient from "pusher-js";
import PusherServer from "pusher";
import { clientOptions, run, say, within } from "./steps.mjs";

const [port, appId, key, secret, otherPort = port] = process.argv.slice(2);
const server = new PusherServer({ appId, key, secret, host: "127.0.0.1", port, useTLS: false });

/** An Echo app on `wsPort` whose signed-in user is `user` ({id, name}). */
function echoFor(wsPort, user) {
  return new Echo({
    broadcaster: "pusher",
    Pusher: PusherClient,
    key,
    ...clientOptions(wsPort),
    authorizer: (channel) => ({
      authorize: (socketId, callback) =>
        callback(null, server.authorizeChannel(socketId, channel.name, { user_id: user.id, user_info: user })),
    }),
  });
}

const once = (what, register) => within(10000, what, new Promise(register));
const names = (users) => users.map((u) => u.name).sort();

async function main() {
  const ann = echoFor(port, { id: 1, name: "Ann" });
  const annRoom = ann.join("chat.1");
  const annHere = await once("ann here", (resolve) => annRoom.here(resolve));
  say("ann_here", { names: names(annHere) });

  const joined = once("ben joining", (resolve) => annRoom.joining(resolve));
  const ben = echoFor(otherPort, { id: 2, name: "Ben" });
  const benRoom = ben.join("chat.1");
  const benHere = await once("ben here", (resolve) => benRoom.here(resolve));
  say("ben_here", { names: names(benHere) });
  say("ann_saw_joining", { user: await joined });

  // Whisper: Ben types, Ann hears it (Echo sends client-typing on presence-chat.1).
  const whispered = once("whisper", (resolve) => annRoom.listenForWhisper("typing", resolve));
  benRoom.whisper("typing", { name: "Ben" });
  say("whisper", { got: await whispered });

  const left = once("ben leaving", (resolve) => annRoom.leaving(resolve));
  ben.leave("chat.1");
  say("ann_saw_leaving", { user: await left });
  ben.disconnect();
  ann.disconnect();
  say("done");
}

run(main);
