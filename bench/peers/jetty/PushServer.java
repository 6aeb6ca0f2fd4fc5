// Seed-style push server on Jetty 9.4 (Debian's libjetty9-java, libjetty9-extra-java):
// one process, framework defaults. Upgrades on any path, sends the time in ms to every
// client every INTERVAL_MS, answers pings (Jetty does).
// Usage: java -cp 'jetty jars:.' PushServer PORT INTERVAL_MS
import java.util.Set;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.Executors;
import java.util.concurrent.TimeUnit;
import org.eclipse.jetty.server.Server;
import org.eclipse.jetty.server.ServerConnector;
import org.eclipse.jetty.servlet.ServletContextHandler;
import org.eclipse.jetty.servlet.ServletHolder;
import org.eclipse.jetty.websocket.api.Session;
import org.eclipse.jetty.websocket.api.annotations.OnWebSocketClose;
import org.eclipse.jetty.websocket.api.annotations.OnWebSocketConnect;
import org.eclipse.jetty.websocket.api.annotations.WebSocket;
import org.eclipse.jetty.websocket.servlet.WebSocketServlet;
import org.eclipse.jetty.websocket.servlet.WebSocketServletFactory;

public final class PushServer {
    static final Set<Session> CLIENTS = ConcurrentHashMap.newKeySet();

    @WebSocket
    public static final class PushSocket {
        @OnWebSocketConnect
        public void onConnect(Session session) {
            CLIENTS.add(session);
        }

        @OnWebSocketClose
        public void onClose(Session session, int code, String reason) {
            CLIENTS.remove(session);
        }
    }

    public static final class PushServlet extends WebSocketServlet {
        @Override
        public void configure(WebSocketServletFactory factory) {
            factory.register(PushSocket.class);
        }
    }

    public static void main(String[] args) throws Exception {
        int port = Integer.parseInt(args[0]);
        long interval = args.length > 1 ? Long.parseLong(args[1]) : 1000;
        Server server = new Server();
        ServerConnector connector = new ServerConnector(server);
        connector.setHost("127.0.0.1");
        connector.setPort(port);
        server.addConnector(connector);
        ServletContextHandler context = new ServletContextHandler();
        context.addServlet(new ServletHolder(new PushServlet()), "/*");
        server.setHandler(context);
        server.start();
        System.out.println("listening on 127.0.0.1:" + port);
        Executors.newSingleThreadScheduledExecutor().scheduleAtFixedRate(() -> {
            String now = Long.toString(System.currentTimeMillis());
            for (Session session : CLIENTS) {
                if (session.isOpen()) {
                    session.getRemote().sendStringByFuture(now);
                }
            }
        }, interval, interval, TimeUnit.MILLISECONDS);
        server.join();
    }
}
