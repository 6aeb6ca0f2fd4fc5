// Seed-style push server on Grizzly (org.glassfish.grizzly:grizzly-websockets from Maven
// Central): one process, framework defaults. Upgrades on any path, sends the time in ms to
// every client every INTERVAL_MS, answers pings (Grizzly does).
// Usage: java -cp 'grizzly jars:.' PushServer PORT INTERVAL_MS
import java.util.Set;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.Executors;
import java.util.concurrent.TimeUnit;
import org.glassfish.grizzly.http.server.HttpServer;
import org.glassfish.grizzly.http.server.NetworkListener;
import org.glassfish.grizzly.websockets.DataFrame;
import org.glassfish.grizzly.websockets.WebSocket;
import org.glassfish.grizzly.websockets.WebSocketAddOn;
import org.glassfish.grizzly.websockets.WebSocketApplication;
import org.glassfish.grizzly.websockets.WebSocketEngine;

public final class PushServer {
    static final Set<WebSocket> CLIENTS = ConcurrentHashMap.newKeySet();

    public static void main(String[] args) throws Exception {
        int port = Integer.parseInt(args[0]);
        long interval = args.length > 1 ? Long.parseLong(args[1]) : 1000;
        HttpServer server = HttpServer.createSimpleServer(null, "127.0.0.1", port);
        WebSocketAddOn addOn = new WebSocketAddOn();
        for (NetworkListener listener : server.getListeners()) {
            listener.registerAddOn(addOn);
        }
        WebSocketEngine.getEngine().register("", "/*", new WebSocketApplication() {
            @Override
            public void onConnect(WebSocket socket) {
                CLIENTS.add(socket);
            }

            @Override
            public void onClose(WebSocket socket, DataFrame frame) {
                CLIENTS.remove(socket);
            }
        });
        server.start();
        System.out.println("listening on 127.0.0.1:" + port);
        Executors.newSingleThreadScheduledExecutor().scheduleAtFixedRate(() -> {
            String now = Long.toString(System.currentTimeMillis());
            for (WebSocket socket : CLIENTS) {
                if (socket.isConnected()) {
                    socket.send(now);
                }
            }
        }, interval, interval, TimeUnit.MILLISECONDS);
        Thread.currentThread().join();
    }
}
