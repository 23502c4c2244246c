package org.lockstep.keycloak;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.io.IOException;
import java.io.InputStream;
import java.io.OutputStream;
import java.net.InetAddress;
import java.net.InetSocketAddress;
import java.net.ServerSocket;
import java.net.Socket;
import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.util.ArrayList;
import java.util.Collections;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicInteger;
import java.util.function.BooleanSupplier;

import com.sun.net.httpserver.HttpExchange;
import com.sun.net.httpserver.HttpServer;
import org.junit.jupiter.api.AfterEach;
import org.junit.jupiter.api.BeforeEach;
import org.junit.jupiter.api.Test;

/** Drainers against a loopback receiver, on the outbox in PostgreSQL. */
class DrainerTest {

    /** What the receiver saw: lane (realm path segment), id, timestamp, signature, body. */
    record Seen(String lane, String id, long timestamp, String signature, String body) {
    }

    interface Responder {
        int status(Seen seen, int requestNumber) throws InterruptedException;
    }

    private static final String SECRET = "test-secret";

    private Pg pg;
    private HttpServer server;
    private final List<Seen> seen = Collections.synchronizedList(new ArrayList<>());
    private final AtomicInteger requests = new AtomicInteger();
    private final Map<String, AtomicInteger> inFlight = new ConcurrentHashMap<>();
    private final AtomicInteger maxInFlightPerLane = new AtomicInteger();
    private volatile Responder responder = (s, n) -> 204;
    private final List<Drainer> drainers = new ArrayList<>();
    private final List<AutoCloseable> closers = new ArrayList<>();

    @BeforeEach
    void start() throws Exception {
        pg = Pg.open();
        server = HttpServer.create(new InetSocketAddress(InetAddress.getLoopbackAddress(), 0), 0);
        server.setExecutor(java.util.concurrent.Executors.newCachedThreadPool());
        server.createContext("/", this::handle);
        server.start();
    }

    @AfterEach
    void stop() throws Exception {
        for (Drainer d : drainers) {
            d.stop(Duration.ofSeconds(2));
        }
        if (server != null) {
            server.stop(0);
        }
        for (AutoCloseable c : closers) {
            c.close();
        }
        if (pg != null) {
            pg.close();
        }
    }

    private void handle(HttpExchange ex) throws IOException {
        String body = new String(ex.getRequestBody().readAllBytes(), StandardCharsets.UTF_8);
        String lane = ex.getRequestURI().getPath().split("/")[2];
        Seen s = new Seen(lane, ex.getRequestHeaders().getFirst("webhook-id"),
                Long.parseLong(ex.getRequestHeaders().getFirst("webhook-timestamp")),
                ex.getRequestHeaders().getFirst("webhook-signature"), body);
        seen.add(s);
        AtomicInteger busy = inFlight.computeIfAbsent(lane, l -> new AtomicInteger());
        maxInFlightPerLane.accumulateAndGet(busy.incrementAndGet(), Math::max);
        int status;
        try {
            status = responder.status(s, requests.incrementAndGet());
        } catch (InterruptedException e) {
            status = 500;
        } finally {
            busy.decrementAndGet();
        }
        ex.sendResponseHeaders(status, -1);
        ex.close();
    }

    private String endpoint(String lane) {
        return "http://127.0.0.1:" + server.getAddress().getPort() + "/realms/" + lane + "/events";
    }

    private Drainer drainer(Duration sendTimeout, Duration maxAge, Duration lease) {
        Drainer.Options o = new Drainer.Options(sendTimeout, maxAge, 10_000, 4, Duration.ofMillis(50), lease,
                Duration.ofMillis(10), Duration.ofMillis(40), Duration.ofMillis(100), Duration.ofSeconds(60));
        Drainer d = new Drainer(new SqlOutbox(pg.tx()), realmId -> SECRET, o);
        drainers.add(d);
        return d;
    }

    private Drainer drainer() {
        return drainer(Duration.ofSeconds(2), Duration.ofMinutes(1), Duration.ofSeconds(30));
    }

    private static void await(BooleanSupplier condition, Duration within, String what) throws InterruptedException {
        long deadline = System.nanoTime() + within.toNanos();
        while (!condition.getAsBoolean()) {
            assertTrue(System.nanoTime() < deadline, "timed out waiting for " + what);
            Thread.sleep(10);
        }
    }

    private List<String> ids(String lane) {
        synchronized (seen) {
            return seen.stream().filter(s -> s.lane().equals(lane)).map(Seen::id).toList();
        }
    }

    @Test
    void twoDrainersOnOneDatabaseSendEveryEventOnceInOrderPerRealm() throws Exception {
        responder = (s, n) -> {
            Thread.sleep(n % 3);
            return 204;
        };
        Map<String, List<String>> expected = new HashMap<>();
        for (int i = 0; i < 40; i++) {
            for (String lane : List.of("r1", "r2", "r3", "r4")) {
                String id = lane + "-" + i;
                pg.insert(lane, id, endpoint(lane), System.currentTimeMillis());
                expected.computeIfAbsent(lane, l -> new ArrayList<>()).add(id);
            }
        }
        Drainer a = drainer();
        Drainer b = drainer();
        a.start();
        b.start();
        await(() -> pg.count() == 0, Duration.ofSeconds(30), "the table to drain");
        for (String lane : expected.keySet()) {
            assertEquals(expected.get(lane), ids(lane), "each event once, in order, for " + lane);
        }
        assertEquals(1, maxInFlightPerLane.get(), "never two sends of one realm at once");
        assertEquals(160, a.delivered() + b.delivered());
        for (Seen s : seen) {
            assertEquals(Signer.of(SECRET).sign(s.id(), s.timestamp(), s.body().getBytes(StandardCharsets.UTF_8)),
                    s.signature());
        }
    }

    @Test
    void aDrainerStoppedMidSendLeavesTheEventToTheOther() throws Exception {
        CountDownLatch arrived = new CountDownLatch(1);
        CountDownLatch release = new CountDownLatch(1);
        responder = (s, n) -> {
            if (n == 1) {
                arrived.countDown();
                release.await(10, TimeUnit.SECONDS);
                return 503;
            }
            return 204;
        };
        pg.insert("r1", "e1", endpoint("r1"), System.currentTimeMillis());
        pg.insert("r1", "e2", endpoint("r1"), System.currentTimeMillis());
        Drainer dying = drainer(Duration.ofSeconds(5), Duration.ofMinutes(1), Duration.ofMillis(800));
        dying.start();
        assertTrue(arrived.await(10, TimeUnit.SECONDS));
        // The node dies mid-send: no answer recorded, the lease stays until it runs out.
        dying.stop(Duration.ofSeconds(2));
        Drainer survivor = drainer(Duration.ofSeconds(5), Duration.ofMinutes(1), Duration.ofMillis(800));
        survivor.start();
        await(() -> pg.count() == 0, Duration.ofSeconds(10), "the survivor to send both");
        release.countDown();
        assertEquals(List.of("e1", "e1", "e2"), ids("r1"));
        assertEquals(2, survivor.delivered());
    }

    @Test
    void retriesKeepOrderAndIdAndResign() throws Exception {
        responder = (s, n) -> n <= 2 ? 503 : 204;
        for (String id : List.of("a", "b", "c")) {
            pg.insert("r", id, endpoint("r"), System.currentTimeMillis());
        }
        Drainer d = drainer();
        d.start();
        await(() -> d.delivered() == 3, Duration.ofSeconds(10), "3 deliveries");
        assertEquals(List.of("a", "a", "a", "b", "c"), ids("r"));
        List<Long> timestamps = seen.stream().map(Seen::timestamp).toList();
        assertTrue(timestamps.stream().allMatch(t -> Math.abs(t - System.currentTimeMillis() / 1000) < 60));
    }

    @Test
    void permanentRejectionAndDuplicateAreNotRetried() throws Exception {
        responder = (s, n) -> switch (s.id()) {
            case "bad" -> 400;
            case "dup" -> 409;
            default -> 200;
        };
        for (String id : List.of("bad", "dup", "ok")) {
            pg.insert("r", id, endpoint("r"), System.currentTimeMillis());
        }
        Drainer d = drainer();
        d.start();
        await(() -> d.delivered() == 2 && d.droppedRejected() == 1, Duration.ofSeconds(10), "all three handled");
        assertEquals(List.of("bad", "dup", "ok"), ids("r"));
        assertEquals(0, pg.count());
    }

    @Test
    void givesUpAfterMaxAge() throws Exception {
        responder = (s, n) -> 500;
        pg.insert("r", "doomed", endpoint("r"), System.currentTimeMillis());
        Drainer d = drainer(Duration.ofSeconds(2), Duration.ofMillis(2_000), Duration.ofSeconds(30));
        d.start();
        await(() -> d.droppedExpired() == 1, Duration.ofSeconds(10), "the event to expire");
        assertTrue(seen.size() >= 3, "retried several times: " + seen.size());
        assertEquals(0, pg.count());
    }

    /** A server that accepts, reads the request and then answers one byte every 200 ms. */
    private String trickler(boolean headersFirst) throws IOException {
        ServerSocket socket = new ServerSocket(0, 50, InetAddress.getLoopbackAddress());
        closers.add(socket);
        Thread t = new Thread(() -> {
            while (!socket.isClosed()) {
                try {
                    Socket s = socket.accept();
                    Thread w = new Thread(() -> trickle(s, headersFirst));
                    w.setDaemon(true);
                    w.start();
                } catch (IOException e) {
                    return;
                }
            }
        });
        t.setDaemon(true);
        t.start();
        return "http://127.0.0.1:" + socket.getLocalPort() + "/realms/slow/events";
    }

    private static void trickle(Socket s, boolean headersFirst) {
        try (s) {
            InputStream in = s.getInputStream();
            byte[] buf = new byte[8192];
            in.read(buf);
            OutputStream out = s.getOutputStream();
            byte[] answer = ("HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + "x".repeat(100_000))
                    .getBytes(StandardCharsets.US_ASCII);
            int i = 0;
            if (headersFirst) {
                int headers = answer.length - 100_000;
                out.write(answer, 0, headers);
                out.flush();
                i = headers;
            }
            for (; i < answer.length; i++) {
                out.write(answer[i]);
                out.flush();
                Thread.sleep(200);
            }
        } catch (IOException | InterruptedException e) {
            // The client gave up: what the test wants.
        }
    }

    @Test
    void anEndpointTricklingItsAnswerStallsOnlyItsOwnRealm() throws Exception {
        String slowHeaders = trickler(false);
        String slowBody = trickler(true);
        long t = System.currentTimeMillis();
        pg.insert("slowheaders", "h1", slowHeaders, t);
        pg.insert("slowbody", "b1", slowBody, t);
        pg.insert("slowbody", "b2", slowBody, t);
        Drainer d = drainer(Duration.ofMillis(700), Duration.ofMinutes(1), Duration.ofSeconds(30));
        d.start();
        Thread.sleep(100);
        long started = System.nanoTime();
        for (int i = 0; i < 5; i++) {
            pg.insert("fast", "f" + i, endpoint("fast"), System.currentTimeMillis());
        }
        d.wake();
        await(() -> ids("fast").size() == 5, Duration.ofSeconds(2), "the fast realm's events");
        long fastMillis = (System.nanoTime() - started) / 1_000_000;
        // A body that trickles is never read: the status line is the answer.
        await(() -> d.delivered() == 7, Duration.ofSeconds(3), "the trickling-body realm's events");
        // Headers that trickle: every attempt ends at the send timeout and is retried.
        await(() -> d.attempts() >= 7 + 3, Duration.ofSeconds(5), "bounded attempts at the trickling headers");
        assertEquals(1, pg.count(), "only the trickling-headers event still waits");
        assertTrue(fastMillis < 1_500, "the fast realm waited " + fastMillis + " ms");
    }
}
