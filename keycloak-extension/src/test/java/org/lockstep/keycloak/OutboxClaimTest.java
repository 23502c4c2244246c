package org.lockstep.keycloak;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertNotNull;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.util.ArrayList;
import java.util.List;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import java.util.concurrent.TimeUnit;

import org.junit.jupiter.api.AfterEach;
import org.junit.jupiter.api.BeforeEach;
import org.junit.jupiter.api.Test;

/** The claim logic of two nodes (two {@link SqlOutbox}es) on one PostgreSQL database. */
class OutboxClaimTest {

    private static final String URL = "http://127.0.0.1:9/realms/r/events";

    private Pg pg;
    private Outbox node1;
    private Outbox node2;

    @BeforeEach
    void open() throws Exception {
        pg = Pg.open();
        node1 = new SqlOutbox(pg.tx());
        node2 = new SqlOutbox(pg.tx());
    }

    @AfterEach
    void close() throws Exception {
        if (pg != null) {
            pg.close();
        }
    }

    @Test
    void ofManyConcurrentClaimsOnOneHeadExactlyOneWins() throws Exception {
        pg.insert("lane", "e1", URL, System.currentTimeMillis());
        int threads = 16;
        ExecutorService pool = Executors.newFixedThreadPool(threads);
        CountDownLatch go = new CountDownLatch(1);
        List<Future<Outbox.Claim>> claims = new ArrayList<>();
        try {
            for (int i = 0; i < threads; i++) {
                Outbox node = i % 2 == 0 ? node1 : node2;
                String owner = "node" + (i % 2) + ":" + i;
                claims.add(pool.submit(() -> {
                    go.await();
                    long now = System.currentTimeMillis();
                    return node.claim("lane", owner, now, now + 60_000);
                }));
            }
            go.countDown();
            int won = 0;
            for (Future<Outbox.Claim> c : claims) {
                if (c.get(30, TimeUnit.SECONDS).claimed()) {
                    won++;
                }
            }
            assertEquals(1, won, "exactly one claim of the head succeeds");
        } finally {
            pool.shutdownNow();
        }
    }

    @Test
    void onlyTheHeadIsClaimedSoALeasedLaneWaitsForItsHolder() {
        long t = System.currentTimeMillis();
        pg.insert("lane", "a", URL, t);
        pg.insert("lane", "b", URL, t);
        pg.insert("other", "x", URL, t);
        Outbox.Claim a = node1.claim("lane", "n1:1", t, t + 60_000);
        assertTrue(a.claimed());
        assertEquals("a", a.row().eventId());
        // Node 2 does not skip ahead to b: the lane is node 1's until a is done.
        Outbox.Claim blocked = node2.claim("lane", "n2:1", t, t + 60_000);
        assertFalse(blocked.claimed());
        assertEquals(t + 60_000, blocked.readyAt());
        // Other lanes are free.
        assertTrue(node2.claim("other", "n2:2", t, t + 60_000).claimed());
        assertEquals(2, node2.heads(100).size());

        assertTrue(node1.remove(a.row().id(), a.owner()));
        Outbox.Claim b = node2.claim("lane", "n2:3", t, t + 60_000);
        assertTrue(b.claimed());
        assertEquals("b", b.row().eventId());
    }

    @Test
    void aNodeKilledMidSendLosesNothingItsLeaseRunsOut() throws Exception {
        long t = System.currentTimeMillis();
        pg.insert("lane", "a", URL, t);
        Outbox.Claim dying = node1.claim("lane", "n1:1", t, t + 300);
        assertTrue(dying.claimed());
        assertFalse(node2.claim("lane", "n2:1", t + 100, t + 60_000).claimed(), "lease still live");
        // Node 1 is gone (no remove, no retry); after the lease, node 2 takes the same row.
        Outbox.Claim takeover = node2.claim("lane", "n2:2", t + 301, t + 60_000);
        assertTrue(takeover.claimed());
        assertEquals(dying.row().id(), takeover.row().id());
        // Were node 1 only slow, its late remove changes nothing: the row is node 2's.
        assertFalse(node1.remove(dying.row().id(), dying.owner()));
        assertEquals(1, pg.count());
        assertTrue(node2.remove(takeover.row().id(), takeover.owner()));
        assertEquals(0, pg.count());
    }

    @Test
    void aRetryWaitsInPlaceAndKeepsTheLaneInOrder() {
        long t = System.currentTimeMillis();
        pg.insert("lane", "a", URL, t);
        pg.insert("lane", "b", URL, t);
        Outbox.Claim a = node1.claim("lane", "n1:1", t, t + 60_000);
        assertTrue(node1.retryLater(a.row().id(), a.owner(), 1, t + 500, "HTTP 503"));
        Outbox.Claim early = node2.claim("lane", "n2:1", t + 10, t + 60_000);
        assertFalse(early.claimed(), "b must not overtake a");
        assertEquals(t + 500, early.readyAt());
        assertEquals(List.of(new Outbox.Head("lane", t + 500)), node2.heads(100));
        Outbox.Claim again = node2.claim("lane", "n2:2", t + 500, t + 60_000);
        assertTrue(again.claimed());
        assertEquals("a", again.row().eventId());
        assertEquals(1, again.row().attempts());
    }

    @Test
    void boundsRemoveTheOldestBeyondCapacityAndTheExpired() {
        long t = System.currentTimeMillis();
        for (int i = 0; i < 5; i++) {
            pg.insert("lane", "e" + i, URL, t - 10_000 + i);
        }
        assertEquals(2, node1.removeBeyond(3, 100));
        Outbox.Claim head = node1.claim("lane", "n1:1", t, t + 60_000);
        assertNotNull(head.row());
        assertEquals("e2", head.row().eventId(), "the two oldest went");
        // e2 is leased: housekeeping leaves a row being sent alone.
        assertEquals(2, node2.removeOlderThan(t, t));
        assertEquals(new Outbox.Stats(1, t - 10_000 + 2), node2.stats());
    }
}
