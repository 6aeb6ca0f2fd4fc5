// Seed-style push server on Netty 4.1 (Debian's libnetty-java): one process, framework
// defaults (NIO transport). Upgrades on any path, sends the time in ms to every client
// every INTERVAL_MS, answers pings (WebSocketServerProtocolHandler does).
// Usage: java -cp netty-all.jar:. PushServer PORT INTERVAL_MS
import io.netty.bootstrap.ServerBootstrap;
import io.netty.channel.ChannelHandlerContext;
import io.netty.channel.ChannelInitializer;
import io.netty.channel.EventLoopGroup;
import io.netty.channel.SimpleChannelInboundHandler;
import io.netty.channel.group.ChannelGroup;
import io.netty.channel.group.DefaultChannelGroup;
import io.netty.channel.nio.NioEventLoopGroup;
import io.netty.channel.socket.SocketChannel;
import io.netty.channel.socket.nio.NioServerSocketChannel;
import io.netty.handler.codec.http.HttpObjectAggregator;
import io.netty.handler.codec.http.HttpServerCodec;
import io.netty.handler.codec.http.websocketx.TextWebSocketFrame;
import io.netty.handler.codec.http.websocketx.WebSocketFrame;
import io.netty.handler.codec.http.websocketx.WebSocketServerProtocolHandler;
import io.netty.util.concurrent.GlobalEventExecutor;
import java.util.concurrent.TimeUnit;

public final class PushServer {
    static final ChannelGroup CLIENTS = new DefaultChannelGroup(GlobalEventExecutor.INSTANCE);

    public static void main(String[] args) throws Exception {
        int port = Integer.parseInt(args[0]);
        long interval = args.length > 1 ? Long.parseLong(args[1]) : 1000;
        EventLoopGroup boss = new NioEventLoopGroup(1);
        EventLoopGroup workers = new NioEventLoopGroup();
        ServerBootstrap bootstrap = new ServerBootstrap()
            .group(boss, workers)
            .channel(NioServerSocketChannel.class)
            .childHandler(new ChannelInitializer<SocketChannel>() {
                @Override
                protected void initChannel(SocketChannel ch) {
                    ch.pipeline().addLast(
                        new HttpServerCodec(),
                        new HttpObjectAggregator(65536),
                        // "/" with checkStartsWith: upgrade on any path.
                        new WebSocketServerProtocolHandler("/", null, false, 65536, false, true),
                        new SimpleChannelInboundHandler<WebSocketFrame>() {
                            @Override
                            protected void channelRead0(ChannelHandlerContext ctx, WebSocketFrame frame) {
                                // Client messages are ignored.
                            }

                            @Override
                            public void userEventTriggered(ChannelHandlerContext ctx, Object event) throws Exception {
                                if (event instanceof WebSocketServerProtocolHandler.HandshakeComplete) {
                                    CLIENTS.add(ctx.channel()); // removed on close by the group
                                }
                                super.userEventTriggered(ctx, event);
                            }
                        });
                }
            });
        bootstrap.bind("127.0.0.1", port).sync();
        System.out.println("listening on 127.0.0.1:" + port);
        boss.scheduleAtFixedRate(
            () -> CLIENTS.writeAndFlush(new TextWebSocketFrame(Long.toString(System.currentTimeMillis()))),
            interval, interval, TimeUnit.MILLISECONDS);
    }
}
