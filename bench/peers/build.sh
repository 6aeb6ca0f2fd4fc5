#!/usr/bin/env bash
# Installs what the peer servers of bench/compare need (Debian packages, npm) and builds
# them into $OUT (default bench/out/peers). Idempotent: reruns rebuild, installs only
# what is missing. Needs root for apt-get.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-$here/../out/peers}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

need=()
command -v gcc >/dev/null || need+=(gcc)
[ -f /usr/include/openssl/sha.h ] || need+=(libssl-dev)
command -v node >/dev/null || need+=(nodejs)
command -v npm >/dev/null || need+=(npm)
command -v go >/dev/null || need+=(golang-go)
[ -d /usr/share/gocode/src/github.com/gorilla/websocket ] || need+=(golang-github-gorilla-websocket-dev)
command -v javac >/dev/null || need+=(default-jdk-headless)
[ -f /usr/share/java/netty-all.jar ] || need+=(libnetty-java)
[ -f /usr/share/java/jetty9-server.jar ] || need+=(libjetty9-java)
[ -f /usr/share/java/jetty9-websocket-servlet.jar ] || need+=(libjetty9-extra-java)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi

echo "baselines: raw TCP and minimal WebSocket (gcc, libcrypto)"
gcc -O2 -Wall -o "$OUT/baseline-server" "$here/baseline/server.c" -lcrypto

echo "Node.js ws (npm)"
mkdir -p "$OUT/node-ws"
cp "$here/node-ws/server.js" "$here/node-ws/package.json" "$OUT/node-ws/"
(cd "$OUT/node-ws" && npm install --no-audit --no-fund --loglevel=error >/dev/null)

echo "Go gorilla/websocket (Debian's GOPATH sources)"
GOPATH=/usr/share/gocode GO111MODULE=off GOCACHE="$OUT/go-cache" GOFLAGS= \
  go build -o "$OUT/go-gorilla" "$here/go-gorilla/main.go"

echo "Netty 4.1 (Debian's libnetty-java)"
mkdir -p "$OUT/netty"
# The module jars (Debian's netty-all.jar is only a manifest pointing at them).
netty_cp=$(printf '/usr/share/java/netty-%s.jar:' buffer codec codec-http common handler resolver transport)
javac -nowarn -d "$OUT/netty" -cp "$netty_cp" "$here/netty/PushServer.java"
echo "$netty_cp$OUT/netty" >"$OUT/netty/classpath"

echo "Jetty 9.4 (Debian's libjetty9-java, libjetty9-extra-java)"
mkdir -p "$OUT/jetty"
# The unversioned jar names (Debian links them to the installed version).
jetty_cp=$(ls /usr/share/java/jetty9-*.jar | grep -v -- '-[0-9][0-9.]*\.v[0-9]*\.jar$' | tr '\n' ':')
jetty_cp="${jetty_cp}/usr/share/java/servlet-api.jar"
javac -nowarn -d "$OUT/jetty" -cp "$jetty_cp" "$here/jetty/PushServer.java"
echo "$jetty_cp:$OUT/jetty" >"$OUT/jetty/classpath"

echo "built into $OUT"
