#!/usr/bin/env python3
"""Publishes ROUNDS Pusher events, INTERVAL seconds apart, to CHANNEL through a Pusher
server's signed HTTP API (POST /apps/ID/events, signed as the `pusher` SDKs sign), each
event's data the time in ms as a string (what `c1m bench` reads as the stamp).

    publish.py HOST:PORT APP_ID KEY SECRET CHANNEL ROUNDS INTERVAL_S [START_AFTER_S]

Standard library only, so any Pusher-compatible server can be measured the same way.
Prints one line per event: its stamp and the HTTP status."""
import hashlib, hmac, json, sys, time, urllib.request

def trigger(addr, app_id, key, secret, channel, data):
    body = json.dumps({"name": "tick", "channels": [channel], "data": data}).encode()
    path = f"/apps/{app_id}/events"
    params = {
        "auth_key": key,
        "auth_timestamp": str(int(time.time())),
        "auth_version": "1.0",
        "body_md5": hashlib.md5(body).hexdigest(),
    }
    query = "&".join(f"{k}={params[k]}" for k in sorted(params))
    signature = hmac.new(secret.encode(), f"POST\n{path}\n{query}".encode(), hashlib.sha256).hexdigest()
    request = urllib.request.Request(
        f"http://{addr}{path}?{query}&auth_signature={signature}", data=body,
        headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=10) as answer:
        return answer.status

def main():
    addr, app_id, key, secret, channel = sys.argv[1:6]
    rounds, interval = int(sys.argv[6]), float(sys.argv[7])
    time.sleep(float(sys.argv[8]) if len(sys.argv) > 8 else 0)
    for _ in range(rounds):
        stamp = str(int(time.time() * 1000))
        print(stamp, trigger(addr, app_id, key, secret, channel, stamp), flush=True)
        time.sleep(interval)

if __name__ == "__main__":
    main()
