// c1m-client: a small client for c1m's topics that never loses a message across a
// reconnect. An ES module with no dependencies, for browsers and Node.js (22+, or 20
// with `--experimental-websocket`, or any WebSocket class passed as an option, such as
// the `ws` package's).
//
// What it does for you:
//   - connects with envelopes (`?envelope=1`): every publication comes with its topic,
//     and, for topics with history, its position (offset and epoch);
//   - keeps the last position of each topic, and on every reconnect resumes from it
//     (`?since=TOPIC:EPOCH:OFFSET`): the server sends what was missed, then live ones;
//   - hands each publication to your handler once, in order (a repeat is dropped);
//   - reconnects by itself with full-jitter exponential backoff;
//   - tells you when a resume could not recover (`recovered: false` and the server's
//     reason): then reload that topic from your own source of truth.
//
//   import { Client } from "c1m-client";
//   const client = new Client("wss://push.example.com/", { token });
//   client.subscribe("prices", (data, meta) => render(data, meta.offset));
//   client.on("recovery", ({ topic, recovered, reason }) => { if (!recovered) reload(topic); });

/** Backoff defaults, in milliseconds. */
export const DEFAULT_MIN_DELAY = 250;
export const DEFAULT_MAX_DELAY = 30000;

/**
 * The wait before reconnect attempt `attempt` (0 for the first): "full jitter", a
 * uniformly random time between 0 and min(max, min * 2^attempt), so that a whole
 * population cut off at once comes back spread out rather than in waves.
 */
export function backoffDelay(attempt, min = DEFAULT_MIN_DELAY, max = DEFAULT_MAX_DELAY, random = Math.random) {
  const ceiling = Math.min(max, min * 2 ** Math.min(attempt, 30));
  return Math.floor(random() * ceiling);
}

/**
 * The URL to connect to: `url` with envelopes asked for, each topic, and a `since` for
 * each topic with a known position (and the token, if any).
 */
export function connectUrl(url, topics, positions, token) {
  const target = new URL(url);
  target.searchParams.set("envelope", "1");
  for (const topic of topics) {
    const at = positions.get(topic);
    if (at) target.searchParams.append("since", `${topic}:${at.epoch}:${at.offset}`);
    else target.searchParams.append("topic", topic);
  }
  if (token) target.searchParams.set("token", token);
  // Topic names and epochs are URL-safe (A-Z a-z 0-9 _ - . :): keep `:` readable.
  return target.toString().replaceAll("%3A", ":");
}

export class Client {
  /**
   * @param {string} url  ws:// or wss:// URL of a c1m server (any path).
   * @param {object} [options]
   * @param {string} [options.token]  a JWT, when the server requires one.
   * @param {Function} [options.WebSocket]  the WebSocket class (default: the global one).
   * @param {number} [options.minDelay]  first reconnect ceiling, ms (250).
   * @param {number} [options.maxDelay]  largest reconnect ceiling, ms (30000).
   * @param {Function} [options.random]  a source of [0, 1) numbers (tests pin it).
   */
  constructor(url, options = {}) {
    this.url = url;
    this.token = options.token;
    this.WebSocket = options.WebSocket ?? globalThis.WebSocket;
    if (typeof this.WebSocket !== "function") {
      throw new Error(
        "c1m-client: no WebSocket class here; pass options.WebSocket " +
          "(Node.js 20: run with --experimental-websocket, or use the `ws` package)",
      );
    }
    this.minDelay = options.minDelay ?? DEFAULT_MIN_DELAY;
    this.maxDelay = options.maxDelay ?? DEFAULT_MAX_DELAY;
    this.random = options.random ?? Math.random;
    /** topic -> handler(data, meta) */
    this.handlers = new Map();
    /** topic -> { offset, epoch }: the last publication handed over. */
    this.positionsByTopic = new Map();
    this.listeners = new Map();
    this.socket = null;
    this.attempt = 0;
    this.timer = null;
    this.closed = false;
    this.state = "idle";
  }

  /** Calls `listener(detail)` on "open", "close", "recovery", "gap" and "error". */
  on(event, listener) {
    if (!this.listeners.has(event)) this.listeners.set(event, new Set());
    this.listeners.get(event).add(listener);
    return () => this.listeners.get(event).delete(listener);
  }

  emit(event, detail) {
    for (const listener of this.listeners.get(event) ?? []) listener(detail);
  }

  /**
   * Receives `topic`'s publications: `handler(data, { topic, offset, epoch })`, where
   * `data` is the payload (parsed JSON, a string, or a Uint8Array for binary). Give
   * `since` ({ offset, epoch }) to start from a position you stored. Connects on the
   * first subscribe. Returns a function that unsubscribes.
   */
  subscribe(topic, handler, since) {
    this.handlers.set(topic, handler);
    if (since) this.positionsByTopic.set(topic, { offset: since.offset, epoch: since.epoch });
    if (this.state === "open") this.sendSubscribe(topic);
    else if (this.state === "idle") this.connect();
    return () => this.unsubscribe(topic);
  }

  unsubscribe(topic) {
    this.handlers.delete(topic);
    this.positionsByTopic.delete(topic);
    if (this.state === "open") this.socket.send(JSON.stringify({ op: "unsubscribe", topic }));
  }

  /** The last position of each topic with history: { topic: { offset, epoch } }. */
  positions() {
    return Object.fromEntries([...this.positionsByTopic].map(([t, p]) => [t, { ...p }]));
  }

  /** Closes for good (no reconnect). */
  close() {
    this.closed = true;
    clearTimeout(this.timer);
    this.state = "closed";
    this.socket?.close(1000);
  }

  connect() {
    if (this.closed) return;
    this.state = "connecting";
    const url = connectUrl(this.url, this.handlers.keys(), this.positionsByTopic, this.token);
    const socket = new this.WebSocket(url);
    this.socket = socket;
    socket.binaryType = "arraybuffer";
    socket.onopen = () => {
      this.state = "open";
      this.attempt = 0;
      this.emit("open", { url });
    };
    socket.onmessage = (event) => this.onMessage(event.data);
    socket.onerror = () => {}; // a close always follows; it decides
    socket.onclose = (event) => {
      if (this.socket !== socket) return;
      this.socket = null;
      this.emit("close", { code: event.code, reason: event.reason });
      if (this.closed) return;
      this.state = "waiting";
      const delay = backoffDelay(this.attempt++, this.minDelay, this.maxDelay, this.random);
      this.timer = setTimeout(() => this.connect(), delay);
    };
  }

  sendSubscribe(topic) {
    const command = { op: "subscribe", topic };
    const at = this.positionsByTopic.get(topic);
    if (at) command.since = { offset: at.offset, epoch: at.epoch };
    this.socket.send(JSON.stringify(command));
  }

  onMessage(raw) {
    if (typeof raw !== "string") return; // envelopes are text
    let message;
    try {
      message = JSON.parse(raw);
    } catch {
      return;
    }
    if (message === null || typeof message !== "object") return;
    if ("op" in message) return this.onAnswer(message);
    const { topic, offset, epoch } = message;
    const handler = this.handlers.get(topic);
    if (!handler) return; // a topic we left, or the clock of a topic-less connect
    if (typeof offset === "number") {
      const last = this.positionsByTopic.get(topic);
      if (last && last.epoch === epoch) {
        if (offset <= last.offset) return; // already handed over
        if (offset > last.offset + 1) {
          this.emit("gap", { topic, after: last.offset, next: offset, epoch });
        }
      }
      this.positionsByTopic.set(topic, { offset, epoch });
    }
    const data =
      "data_base64" in message ? base64Bytes(message.data_base64) : message.data;
    handler(data, { topic, offset, epoch });
  }

  onAnswer(answer) {
    if (answer.ok === false) {
      this.emit("error", answer);
      return;
    }
    if (!("recovered" in answer)) return;
    const { topic, recovered, reason } = answer;
    if (!recovered) {
      // The missed publications are gone: continue from where the topic stands now
      // (the application reloads what it shows from its own source of truth).
      if (typeof answer.offset === "number") {
        this.positionsByTopic.set(topic, { offset: answer.offset, epoch: answer.epoch });
      } else {
        this.positionsByTopic.delete(topic);
      }
    }
    this.emit("recovery", { topic, recovered, reason });
  }
}

function base64Bytes(text) {
  const binary = atob(text);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return bytes;
}
