// What the interop scripts share: one JSON line per step (crates/c1m/tests/pusher.rs
// reads them), bounded waits, and an exit status that says whether the script got
// through.

/** Prints one step as a JSON line. */
export const say = (step, fields = {}) => console.log(JSON.stringify({ step, ...fields }));

/** `promise`, or a rejection after `ms` naming `what`. */
export const within = (ms, what, promise) =>
  Promise.race([
    promise,
    new Promise((_, reject) => setTimeout(() => reject(new Error(`timeout: ${what}`)), ms)),
  ]);

/** Runs `main`, then exits 0, or says why it failed and exits 1. */
export function run(main) {
  main().then(
    () => process.exit(0),
    (e) => {
      say("failed", { error: String((e && e.stack) || e) });
      process.exit(1);
    },
  );
}

/** pusher-js options for a c1m server on 127.0.0.1:`port` (plain ws, no stats). */
export const clientOptions = (port) => ({
  cluster: "mt1", // required by pusher-js; wsHost decides where it connects
  wsHost: "127.0.0.1",
  wsPort: Number(port),
  forceTLS: false,
  enabledTransports: ["ws"],
  disableStats: true,
});
