// Seed-style push server on Undertow (io.undertow:undertow-core from Maven Central): one
// process, framework defaults. Upgrades on any path, sends the time in ms to every client
// every INTERVAL_MS, answers pings (Undertow does).
// Usage: java -cp 'undertow jars:.' PushServer PORT INTERVAL_MS
import io.undertow.Handlers;
import io.undertow.Undertow;
import io.undertow.websockets.core.AbstractReceiveListener;
import io.undertow.websockets.core.WebSocketChannel;
import io.undertow.websockets.core.WebSockets;
import java.util.Set;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.Executors;
import java.util.concurrent.TimeUnit;

public final class PushServer {
    static final Set<WebSocketChannel> CLIENTS = ConcurrentHashMap.newKeySet();

    public static void main(String[] args) {
        int port = Integer.parseInt(args[0]);
        long interval = args.length > 1 ? Long.parseLong(args[1]) : 1000;
        Undertow server = Undertow.builder()
                .addHttpListener(port, "127.0.0.1")
                .setHandler(Handlers.websocket((exchange, channel) -> {
                    CLIENTS.add(channel);
                    channel.addCloseTask(closed -> CLIENTS.remove(closed));
                    channel.getReceiveSetter().set(new AbstractReceiveListener() {});
                    channel.resumeReceives();
                }))
                .build();
        server.start();
        System.out.println("listening on 127.0.0.1:" + port);
        Executors.newSingleThreadScheduledExecutor().scheduleAtFixedRate(() -> {
            String now = Long.toString(System.currentTimeMillis());
            for (WebSocketChannel channel : CLIENTS) {
                if (channel.isOpen()) {
                    WebSockets.sendText(now, channel, null);
                }
            }
        }, interval, interval, TimeUnit.MILLISECONDS);
    }
}
