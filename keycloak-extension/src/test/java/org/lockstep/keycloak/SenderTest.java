package org.lockstep.keycloak;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.io.IOException;
import java.net.InetAddress;
import java.net.InetSocketAddress;
import java.net.URI;
import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.util.ArrayList;
import java.util.Collections;
import java.util.List;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicInteger;

import com.sun.net.httpserver.HttpExchange;
import com.sun.net.httpserver.HttpServer;
import org.junit.jupiter.api.AfterEach;
import org.junit.jupiter.api.BeforeEach;
import org.junit.jupiter.api.Test;

class SenderTest {

    /** What the server saw: id, timestamp, signature, body of every request. */
    record Seen(String id, long timestamp, String signature, String body) {
    }

    interface Responder {
        int status(Seen seen, int requestNumber) throws InterruptedException;
    }

    private HttpServer server;
    private final List<Seen> seen = Collections.synchronizedList(new ArrayList<>());
    private final AtomicInteger requests = new AtomicInteger();
    private volatile Responder responder = (s, n) -> 204;
    private final Signer signer = Signer.of("test-secret");

    @BeforeEach
    void start() throws IOException {
        server = HttpServer.create(new InetSocketAddress(InetAddress.getLoopbackAddress(), 0), 0);
        server.createContext("/", this::handle);
        server.start();
    }

    @AfterEach
    void stop() {
        server.stop(0);
    }

    private void handle(HttpExchange ex) throws IOException {
        String body = new String(ex.getRequestBody().readAllBytes(), StandardCharsets.UTF_8);
        Seen s = new Seen(ex.getRequestHeaders().getFirst("webhook-id"),
                Long.parseLong(ex.getRequestHeaders().getFirst("webhook-timestamp")),
                ex.getRequestHeaders().getFirst("webhook-signature"), body);
        seen.add(s);
        int status;
        try {
            status = responder.status(s, requests.incrementAndGet());
        } catch (InterruptedException e) {
            status = 500;
        }
        ex.sendResponseHeaders(status, -1);
        ex.close();
    }

    private URI endpoint() {
        return URI.create("http://127.0.0.1:" + server.getAddress().getPort() + "/realms/r/events");
    }

    private Delivery delivery(String id) {
        return Delivery.of(LockstepEvent.of(id, "LOGIN", "r", 1L), endpoint(), signer);
    }

    private static void await(java.util.function.BooleanSupplier condition) throws InterruptedException {
        long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(10);
        while (!condition.getAsBoolean()) {
            assertTrue(System.nanoTime() < deadline, "timed out");
            Thread.sleep(10);
        }
    }

    @Test
    void retriesKeepOrderAndIdAndResign() throws Exception {
        // The first event fails twice (503), then everything succeeds.
        responder = (s, n) -> n <= 2 ? 503 : 204;
        Sender sender = new Sender(100, Duration.ofSeconds(2), Duration.ofMinutes(1), 10, 40);
        sender.start();
        try {
            sender.enqueue(List.of(delivery("a"), delivery("b"), delivery("c")));
            await(() -> sender.delivered() == 3);
        } finally {
            sender.stop(Duration.ofSeconds(2));
        }
        List<String> ids = seen.stream().map(Seen::id).toList();
        assertEquals(List.of("a", "a", "a", "b", "c"), ids);
        for (Seen s : seen) {
            assertEquals(signer.sign(s.id(), s.timestamp(), s.body().getBytes(StandardCharsets.UTF_8)), s.signature());
            assertTrue(s.body().contains("\"id\":\"" + s.id() + "\""));
        }
    }

    @Test
    void permanentRejectionAndDuplicateAreNotRetried() throws Exception {
        responder = (s, n) -> switch (s.id()) {
            case "bad" -> 400;
            case "dup" -> 409;
            default -> 200;
        };
        Sender sender = new Sender(100, Duration.ofSeconds(2), Duration.ofMinutes(1), 10, 40);
        sender.start();
        try {
            sender.enqueue(List.of(delivery("bad"), delivery("dup"), delivery("ok")));
            await(() -> sender.delivered() == 2 && sender.droppedRejected() == 1);
        } finally {
            sender.stop(Duration.ofSeconds(2));
        }
        assertEquals(List.of("bad", "dup", "ok"), seen.stream().map(Seen::id).toList());
    }

    @Test
    void fullQueueDropsTheOldest() throws Exception {
        // Hold the first request until the queue has overflowed.
        CountDownLatch release = new CountDownLatch(1);
        CountDownLatch firstArrived = new CountDownLatch(1);
        responder = (s, n) -> {
            if (n == 1) {
                firstArrived.countDown();
                release.await(10, TimeUnit.SECONDS);
            }
            return 204;
        };
        Sender sender = new Sender(2, Duration.ofSeconds(5), Duration.ofMinutes(1), 10, 40);
        sender.start();
        try {
            sender.enqueue(List.of(delivery("in-flight")));
            assertTrue(firstArrived.await(10, TimeUnit.SECONDS));
            sender.enqueue(List.of(delivery("1"), delivery("2"), delivery("3"), delivery("4")));
            assertEquals(2, sender.queued());
            assertEquals(2, sender.droppedOverflow());
            release.countDown();
            await(() -> sender.delivered() == 3);
        } finally {
            sender.stop(Duration.ofSeconds(2));
        }
        assertEquals(List.of("in-flight", "3", "4"), seen.stream().map(Seen::id).toList());
    }

    @Test
    void givesUpAfterMaxAge() throws Exception {
        responder = (s, n) -> 500;
        Sender sender = new Sender(10, Duration.ofSeconds(2), Duration.ofMillis(600), 10, 20);
        sender.start();
        try {
            sender.enqueue(List.of(delivery("doomed")));
            await(() -> sender.droppedExpired() == 1);
            responder = (s, n) -> 204;
            sender.enqueue(List.of(delivery("next")));
            await(() -> sender.delivered() == 1);
        } finally {
            sender.stop(Duration.ofSeconds(2));
        }
        assertTrue(seen.size() >= 3, "retried several times: " + seen.size());
        assertEquals("next", seen.get(seen.size() - 1).id());
    }

    @Test
    void unreachableEndpointIsRetriedNotFatal() throws Exception {
        Sender sender = new Sender(10, Duration.ofMillis(300), Duration.ofMillis(400), 10, 20);
        sender.start();
        try {
            // Port 9 on loopback: connection refused.
            sender.enqueue(List.of(Delivery.of(LockstepEvent.of("x", "LOGIN", "r", 1L),
                    URI.create("http://127.0.0.1:9/realms/r/events"), signer)));
            await(() -> sender.droppedExpired() == 1);
            sender.enqueue(List.of(delivery("after")));
            await(() -> sender.delivered() == 1);
        } finally {
            sender.stop(Duration.ofSeconds(2));
        }
    }

    @Test
    void aDeadEndpointHoldsUpOnlyItsOwnEvents() throws Exception {
        Sender sender = new Sender(100, Duration.ofMillis(300), Duration.ofMinutes(1), 10, 40);
        sender.start();
        try {
            // Port 9 on loopback refuses: that lane keeps retrying while the live one delivers.
            sender.enqueue(List.of(Delivery.of(LockstepEvent.of("stuck", "LOGIN", "dead", 1L),
                    URI.create("http://127.0.0.1:9/realms/dead/events"), signer)));
            sender.enqueue(List.of(delivery("a"), delivery("b")));
            await(() -> sender.delivered() == 2);
            // The stuck event may be mid-attempt (taken from its lane) right now: pending counts it.
            assertEquals(1, sender.pending());
            assertEquals(0, sender.droppedExpired() + sender.droppedOverflow() + sender.droppedRejected());
        } finally {
            sender.stop(Duration.ofSeconds(2));
        }
        assertEquals(List.of("a", "b"), seen.stream().map(Seen::id).toList());
    }
}
