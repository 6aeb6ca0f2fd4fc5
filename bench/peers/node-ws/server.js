// Seed-style push server on Node.js `ws`: one process, framework defaults. Upgrades on
// any path, sends the time in ms to every client every INTERVAL_MS, answers pings (ws
// does that by itself). Usage: node server.js PORT INTERVAL_MS
'use strict';
const { WebSocketServer } = require('ws');

const port = Number(process.argv[2]);
const interval = Number(process.argv[3] || 1000);
if (!Number.isInteger(port) || port <= 0 || !(interval > 0)) {
  console.error('usage: node server.js PORT INTERVAL_MS');
  process.exit(2);
}
const wss = new WebSocketServer({ host: '127.0.0.1', port });
wss.on('listening', () => console.log(`listening on 127.0.0.1:${port}`));
wss.on('connection', (ws) => ws.on('error', () => {}));
setInterval(() => {
  const now = String(Date.now());
  for (const client of wss.clients) {
    if (client.readyState === 1) client.send(now);
  }
}, interval);
for (const signal of ['SIGINT', 'SIGTERM']) process.on(signal, () => process.exit(0));
