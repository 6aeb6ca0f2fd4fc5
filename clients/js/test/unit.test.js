// Unit tests of the client without a server: backoff, URLs, and what it hands over.
// Run: node --test test/   (from clients/js)
import { test } from "node:test";
import assert from "node:assert/strict";
import { Client, backoffDelay, connectUrl } from "../index.js";

test("full-jitter backoff stays under a doubling ceiling, capped", () => {
  assert.equal(backoffDelay(0, 250, 30000, () => 0.999), 249);
  assert.equal(backoffDelay(3, 250, 30000, () => 0.5), 1000);
  assert.equal(backoffDelay(20, 250, 30000, () => 0.5), 15000);
  assert.equal(backoffDelay(5, 250, 30000, () => 0), 0);
});

test("the connect URL asks for envelopes and resumes known positions", () => {
  const positions = new Map([["prices", { offset: 42, epoch: "9f2c01ab" }]]);
  assert.equal(
    connectUrl("ws://h:1/", ["prices", "news"], positions, "t.o.k"),
    "ws://h:1/?envelope=1&since=prices:9f2c01ab:42&topic=news&token=t.o.k",
  );
});

/** A WebSocket stand-in the tests drive by hand. */
class FakeSocket {
  static last = null;
  constructor(url) {
    this.url = url;
    this.sent = [];
    FakeSocket.last = this;
  }
  send(text) {
    this.sent.push(JSON.parse(text));
  }
  close() {}
  deliver(object) {
    this.onmessage({ data: JSON.stringify(object) });
  }
}

test("each publication is handed over once, in order, and positions are kept", () => {
  const client = new Client("ws://h:1/", { WebSocket: FakeSocket });
  const got = [];
  const gaps = [];
  client.on("gap", (g) => gaps.push(g));
  client.subscribe("a", (data, meta) => got.push([data, meta.offset]));
  const socket = FakeSocket.last;
  assert.match(socket.url, /topic=a/);
  for (const offset of [1, 2, 2, 1, 3, 5]) {
    socket.deliver({ topic: "a", offset, epoch: "e", data: { n: offset } });
  }
  socket.deliver({ topic: "other", offset: 9, epoch: "e", data: 1 });
  assert.deepEqual(got.map(([, offset]) => offset), [1, 2, 3, 5]);
  assert.deepEqual(gaps, [{ topic: "a", after: 3, next: 5, epoch: "e" }]);
  assert.deepEqual(client.positions(), { a: { offset: 5, epoch: "e" } });
  client.close();
});

test("a resume that cannot recover is reported, and the position moves on", () => {
  const client = new Client("ws://h:1/", { WebSocket: FakeSocket });
  const recoveries = [];
  client.on("recovery", (r) => recoveries.push(r));
  client.subscribe("a", () => {}, { offset: 3, epoch: "old" });
  const socket = FakeSocket.last;
  assert.match(socket.url, /since=a:old:3/);
  socket.deliver({ ok: true, op: "subscribe", topic: "a", recovered: false, reason: "epoch_changed", offset: 7, epoch: "new" });
  assert.deepEqual(recoveries, [{ topic: "a", recovered: false, reason: "epoch_changed" }]);
  assert.deepEqual(client.positions(), { a: { offset: 7, epoch: "new" } });
  client.close();
});

test("binary payloads come as bytes, and garbage is ignored", () => {
  const client = new Client("ws://h:1/", { WebSocket: FakeSocket });
  const got = [];
  client.subscribe("b", (data) => got.push(data));
  const socket = FakeSocket.last;
  socket.onmessage({ data: "not json" });
  socket.onmessage({ data: "null" });
  socket.onmessage({ data: new ArrayBuffer(2) });
  socket.deliver({ topic: "b", data_base64: "AAH/" });
  assert.deepEqual(got, [new Uint8Array([0, 1, 255])]);
  client.close();
});

test("without any WebSocket class the error says what to do", () => {
  const saved = globalThis.WebSocket;
  globalThis.WebSocket = undefined;
  try {
    assert.throws(() => new Client("ws://h:1/"), /options\.WebSocket/);
  } finally {
    globalThis.WebSocket = saved;
  }
});
