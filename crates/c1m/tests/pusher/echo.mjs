// Real Laravel Echo (its Pusher connector, over pusher-js) and the `pusher` server SDK
// against c1m:   node echo.mjs PORT APP_ID KEY SECRET [API_PORT]
// (the SDK calls the server on API_PORT, another node of a cluster; PORT by default)
// Prints one JSON line per step; crates/c1m/tests/pusher.rs asserts on them. Bounded:
// every wait gives up after 10 s.
import Echo from "laravel-echo";
import PusherClient from "pusher-js";
import PusherServer from "pusher";
import { clientOptions, run, say, within } from "./steps.mjs";

const [port, appId, key, secret, apiPort = port] = process.argv.slice(2);

const server = new PusherServer({ appId, key, secret, host: "127.0.0.1", port: apiPort, useTLS: false });
const echo = new Echo({
  broadcaster: "pusher",
  Pusher: PusherClient,
  key,
  ...clientOptions(port),
  // The app's /broadcasting/auth endpoint, played by the SDK's own signer.
  authorizer: (channel) => ({
    authorize: (socketId, callback) => callback(null, server.authorizeChannel(socketId, channel.name)),
  }),
});

async function main() {
  await within(10000, "connected", new Promise((resolve) => {
    echo.connector.pusher.connection.bind("connected", resolve);
  }));
  say("connected", { socket_id: echo.socketId() });

  // A public channel and a Laravel-named event (Echo prefixes App\Events\).
  const shipped = within(10000, "OrderShipped", new Promise((resolve) => {
    echo.channel("orders").listen("OrderShipped", resolve);
  }));
  // A private channel (Echo adds private-), an event named as is (the leading dot).
  const paid = within(10000, "invoice.paid", new Promise((resolve) => {
    echo.private("invoices.7").listen(".invoice.paid", resolve);
  }));
  // Echo subscribes on its own schedule: send until both arrive (bounded by `within`).
  let done = false;
  const both = Promise.all([shipped, paid]).finally(() => { done = true; });
  (async () => {
    while (!done) {
      await server.trigger("orders", "App\\Events\\OrderShipped", { id: 1 });
      await server.trigger("private-invoices.7", "invoice.paid", { amount: 12 });
      await new Promise((r) => setTimeout(r, 200));
    }
  })().catch((e) => say("failed", { error: String(e) }));
  const [order, invoice] = await both;
  say("received", { order, invoice });
  echo.disconnect();
  say("done");
}

run(main);
