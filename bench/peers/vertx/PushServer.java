// Seed-style push server on Vert.x (io.vertx:vertx-core from Maven Central): one process,
// framework defaults (an event loop per core x 2). Upgrades on any path, sends the time in
// ms to every client every INTERVAL_MS, answers pings (Vert.x does).
// Usage: java -cp 'vertx jars:.' PushServer PORT INTERVAL_MS
import io.vertx.core.Vertx;
import io.vertx.core.http.ServerWebSocket;
import java.util.Set;
import java.util.concurrent.ConcurrentHashMap;

public final class PushServer {
    static final Set<ServerWebSocket> CLIENTS = ConcurrentHashMap.newKeySet();

    public static void main(String[] args) {
        int port = Integer.parseInt(args[0]);
        long interval = args.length > 1 ? Long.parseLong(args[1]) : 1000;
        Vertx vertx = Vertx.vertx();
        vertx.createHttpServer()
                .webSocketHandler(ws -> {
                    CLIENTS.add(ws);
                    ws.closeHandler(v -> CLIENTS.remove(ws));
                    ws.exceptionHandler(e -> {});
                })
                .listen(port, "127.0.0.1")
                .onSuccess(s -> System.out.println("listening on 127.0.0.1:" + port))
                .onFailure(e -> {
                    e.printStackTrace();
                    System.exit(1);
                });
        vertx.setPeriodic(interval, id -> {
            String now = Long.toString(System.currentTimeMillis());
            for (ServerWebSocket ws : CLIENTS) {
                if (!ws.isClosed()) {
                    ws.writeTextMessage(now);
                }
            }
        });
    }
}
