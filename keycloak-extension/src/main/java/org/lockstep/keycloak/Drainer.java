package org.lockstep.keycloak;

import java.io.IOException;
import java.io.InputStream;
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.net.http.HttpTimeoutException;
import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.util.Set;
import java.util.UUID;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.LinkedBlockingQueue;
import java.util.concurrent.ThreadPoolExecutor;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.TimeoutException;
import java.util.concurrent.atomic.AtomicInteger;
import java.util.concurrent.atomic.AtomicLong;
import java.util.concurrent.locks.Condition;
import java.util.concurrent.locks.ReentrantLock;

import org.jboss.logging.Logger;

/**
 * Sends the events of the {@link Outbox} to Lockstep: one scheduler thread per Keycloak node
 * looks at the head of every lane (a realm) and hands each lane that is due to a worker of a
 * bounded pool; the worker leases the head, posts it, and removes it or gives it back with a
 * retry time, then goes on with the next head of the same lane.
 * <ul>
 * <li>Per-lane isolation: a lane is sent by one worker at a time, in order, and a slow or
 *     dead endpoint only delays its own lane. Every attempt is bounded as a whole
 *     ({@code sendTimeout} from connecting to the response status); the response body is
 *     never read, so an endpoint that trickles its answer costs one worker for at most
 *     {@code sendTimeout}, and between attempts a failing lane holds no worker at all.</li>
 * <li>2xx and 409 (already received): removed. Other 4xx: removed with a WARN (not retried).
 *     5xx, I/O errors, timeouts: retried (same id, fresh timestamp and signature) after
 *     {@code initialBackoff}, doubling up to {@code maxBackoff}, by whichever node gets the
 *     lease next.</li>
 * <li>Bounds: events older than {@code maxAge} and the oldest beyond {@code capacity} are
 *     removed with a WARN saying how many.</li>
 * <li>Cluster: every node runs a drainer on the same table; leases make sure a row is sent by
 *     one node at a time. A node that dies mid-send leaves a lease that expires after
 *     {@code lease}, and the row is sent again (Lockstep answers 409 if it had arrived).</li>
 * </ul>
 */
final class Drainer {

    private static final Logger LOG = Logger.getLogger(Drainer.class);
    /** Heads looked at per scheduling round: more lanes than this wait for the next round. */
    private static final int MAX_LANES = 1_000;
    /** Oldest rows removed per housekeeping round when over capacity. */
    private static final int MAX_OVERFLOW_REMOVALS = 10_000;
    /** At most one WARN per this interval about database errors (they repeat every poll). */
    private static final long ERROR_LOG_INTERVAL_MS = 30_000;

    /** The vault key of a realm's signing secret ({@code ${vault.lockstep-secret}}). */
    static final String VAULT_KEY = "lockstep-secret";

    /** Where the signing secret of a realm comes from (vault or provider option). */
    interface Secrets {
        /** The secret for the realm with this id, or null when it has none. */
        String secretFor(String realmId);
    }

    /** Tunables; {@link #defaults} are what Keycloak runs with unless configured. */
    record Options(Duration sendTimeout, Duration maxAge, long capacity, int workers, Duration poll,
            Duration lease, Duration initialBackoff, Duration maxBackoff, Duration housekeeping,
            Duration logInterval) {

        static Options defaults(Duration sendTimeout, Duration maxAge, long capacity, int workers, Duration poll) {
            // The lease outlives any attempt by far: a live node never loses a row it is sending.
            Duration lease = sendTimeout.multipliedBy(2).plusSeconds(30);
            return new Options(sendTimeout, maxAge, capacity, workers, poll, lease, Duration.ofMillis(250),
                    Duration.ofSeconds(5), Duration.ofSeconds(5), Duration.ofSeconds(60));
        }
    }

    private final Outbox outbox;
    private final Secrets secrets;
    private final Options options;
    private final HttpClient http;
    /** This node in lease owners and logs. */
    private final String node = UUID.randomUUID().toString().substring(0, 8);

    private final ReentrantLock lock = new ReentrantLock();
    private final Condition changed = lock.newCondition();
    private boolean wakeUp;
    private volatile boolean running;
    private Thread scheduler;
    private ThreadPoolExecutor pool;
    /** Lanes a worker of this node is draining now. */
    private final Set<String> active = ConcurrentHashMap.newKeySet();
    /** Realms already told (once) that they have no usable secret. */
    private final Set<String> warnedRealms = ConcurrentHashMap.newKeySet();

    private final AtomicLong delivered = new AtomicLong();
    private final AtomicLong droppedRejected = new AtomicLong();
    private final AtomicLong droppedExpired = new AtomicLong();
    private final AtomicLong droppedOverflow = new AtomicLong();
    private final AtomicLong attempts = new AtomicLong();
    private volatile long waiting;
    private long lastWaitingLog;
    private long lastErrorLog;

    Drainer(Outbox outbox, Secrets secrets, Options options) {
        this.outbox = outbox;
        this.secrets = secrets;
        this.options = options;
        this.http = HttpClient.newBuilder()
                .version(HttpClient.Version.HTTP_1_1)
                .connectTimeout(options.sendTimeout())
                .followRedirects(HttpClient.Redirect.NEVER)
                .build();
    }

    /** Starts the scheduler and the worker pool (idempotent). */
    void start() {
        lock.lock();
        try {
            if (running) {
                return;
            }
            running = true;
            AtomicInteger n = new AtomicInteger();
            pool = new ThreadPoolExecutor(options.workers(), options.workers(), 30, TimeUnit.SECONDS,
                    new LinkedBlockingQueue<>(), r -> {
                        Thread t = new Thread(r, "lockstep-event-sender-" + n.incrementAndGet());
                        t.setDaemon(true);
                        return t;
                    });
            pool.allowCoreThreadTimeOut(true);
            scheduler = new Thread(this::schedule, "lockstep-event-scheduler");
            scheduler.setDaemon(true);
            scheduler.start();
        } finally {
            lock.unlock();
        }
        LOG.infof("Lockstep event drainer started (node %s, %d workers)", node, options.workers());
    }

    /** Stops sending; what is still waiting stays in the table for the next start (or another node). */
    void stop(Duration wait) {
        Thread t;
        ThreadPoolExecutor p;
        lock.lock();
        try {
            if (!running) {
                return;
            }
            running = false;
            t = scheduler;
            p = pool;
            changed.signalAll();
        } finally {
            lock.unlock();
        }
        t.interrupt();
        p.shutdownNow();
        try {
            t.join(wait.toMillis());
            p.awaitTermination(wait.toMillis(), TimeUnit.MILLISECONDS);
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
        }
        if (waiting > 0) {
            LOG.infof("Lockstep event drainer stopped; %d events wait in the database for the next start", waiting);
        }
    }

    /** Looks at the table now rather than at the next poll (a local transaction added events). */
    void wake() {
        lock.lock();
        try {
            wakeUp = true;
            changed.signalAll();
        } finally {
            lock.unlock();
        }
    }

    long delivered() {
        return delivered.get();
    }

    long droppedRejected() {
        return droppedRejected.get();
    }

    long droppedExpired() {
        return droppedExpired.get();
    }

    long droppedOverflow() {
        return droppedOverflow.get();
    }

    long attempts() {
        return attempts.get();
    }

    /** Events waiting in the table (every node's), as of the last housekeeping round. */
    long waiting() {
        return waiting;
    }

    String node() {
        return node;
    }

    private void schedule() {
        long nextHousekeeping = 0;
        while (running) {
            long now = System.currentTimeMillis();
            long nextRound = now + options.poll().toMillis();
            try {
                if (now >= nextHousekeeping) {
                    housekeeping(now);
                    nextHousekeeping = now + options.housekeeping().toMillis();
                }
                for (Outbox.Head head : outbox.heads(MAX_LANES)) {
                    if (active.contains(head.lane())) {
                        continue;
                    }
                    if (head.readyAt() <= now) {
                        active.add(head.lane());
                        pool.execute(() -> drain(head.lane()));
                    } else {
                        nextRound = Math.min(nextRound, head.readyAt());
                    }
                }
            } catch (RuntimeException e) {
                databaseError("looking for events to send", e);
            }
            nextRound = Math.min(nextRound, nextHousekeeping);
            lock.lock();
            try {
                while (running && !wakeUp) {
                    long wait = nextRound - System.currentTimeMillis();
                    if (wait <= 0) {
                        break;
                    }
                    changed.await(wait, TimeUnit.MILLISECONDS);
                }
                wakeUp = false;
            } catch (InterruptedException e) {
                if (!running) {
                    return;
                }
            } finally {
                lock.unlock();
            }
        }
    }

    /** Sends the lane's events in order until it is empty, waits for a retry, or is someone else's. */
    private void drain(String lane) {
        try {
            int lostRaces = 0;
            while (running) {
                long now = System.currentTimeMillis();
                Outbox.Claim claim = outbox.claim(lane, node + ":" + UUID.randomUUID(), now,
                        now + options.lease().toMillis());
                if (!claim.claimed()) {
                    // readyAt 0: another node removed or leased the head between our read and
                    // our update; look once more, then leave the lane to that node.
                    if (claim.readyAt() == 0 && ++lostRaces < 3) {
                        continue;
                    }
                    return;
                }
                lostRaces = 0;
                deliver(claim);
            }
        } catch (RuntimeException e) {
            databaseError("sending the events of realm " + lane, e);
        } finally {
            active.remove(lane);
            // The scheduler computes the lane's next round (a retry time) afresh.
            wake();
        }
    }

    private void deliver(Outbox.Claim claim) {
        Outbox.Row row = claim.row();
        long now = System.currentTimeMillis();
        if (now - row.createdAt() >= options.maxAge().toMillis()) {
            outbox.remove(row.id(), claim.owner());
            droppedExpired.incrementAndGet();
            LOG.warnf("Lockstep event %s (%s) for realm %s dropped after %d attempts: older than max-age-ms",
                    row.eventId(), row.eventType(), row.realmName(), row.attempts());
            return;
        }
        int attempt = row.attempts() + 1;
        String failure;
        String secret = secrets.secretFor(row.lane());
        Signer signer = null;
        if (secret != null) {
            try {
                signer = Signer.of(secret);
            } catch (IllegalArgumentException e) {
                // Reported below like a missing secret; the message never shows the secret.
            }
        }
        if (signer == null) {
            failure = "no signing secret";
            if (warnedRealms.add(row.lane())) {
                LOG.warnf("Lockstep event listener: realm %s has no usable signing secret (vault key %s or "
                        + "the provider option secret); its events wait until it has one or max-age-ms",
                        row.realmName(), VAULT_KEY);
            }
        } else {
            warnedRealms.remove(row.lane());
            attempts.incrementAndGet();
            try {
                int status = send(URI.create(row.endpoint()), row.eventId(),
                        row.body().getBytes(StandardCharsets.UTF_8), signer);
                if ((status >= 200 && status < 300) || status == 409) {
                    outbox.remove(row.id(), claim.owner());
                    delivered.incrementAndGet();
                    if (attempt > 1) {
                        LOG.infof("Lockstep event %s (%s) delivered after %d attempts", row.eventId(),
                                row.eventType(), attempt);
                    }
                    return;
                }
                if (status >= 400 && status < 500) {
                    outbox.remove(row.id(), claim.owner());
                    droppedRejected.incrementAndGet();
                    LOG.warnf("Lockstep refused event %s (%s) for realm %s with HTTP %d; dropped (not retried)",
                            row.eventId(), row.eventType(), row.realmName(), status);
                    return;
                }
                failure = "HTTP " + status;
            } catch (IOException e) {
                failure = e.getClass().getSimpleName() + (e.getMessage() == null ? "" : ": " + e.getMessage());
            }
        }
        long backoff = Math.min(options.maxBackoff().toMillis(),
                options.initialBackoff().toMillis() << Math.min(attempt - 1, 20));
        outbox.retryLater(row.id(), claim.owner(), attempt, System.currentTimeMillis() + backoff, failure);
        if (attempt == 1 || attempt % 10 == 0) {
            LOG.warnf("Lockstep event %s (%s) not delivered to %s (%s); retrying (attempt %d)", row.eventId(),
                    row.eventType(), row.endpoint(), failure, attempt);
        }
    }

    /**
     * One signed POST; the status code. The whole exchange (connect, request, response
     * headers) must finish within {@code sendTimeout}; the body is not read, and closing it
     * unread closes the connection, so nothing the endpoint does afterwards can hold us.
     */
    int send(URI endpoint, String id, byte[] body, Signer signer) throws IOException {
        long timestamp = System.currentTimeMillis() / 1000;
        HttpRequest request = HttpRequest.newBuilder(endpoint)
                .timeout(options.sendTimeout())
                .header("Content-Type", "application/json")
                .header("webhook-id", id)
                .header("webhook-timestamp", Long.toString(timestamp))
                .header("webhook-signature", signer.sign(id, timestamp, body))
                .POST(HttpRequest.BodyPublishers.ofByteArray(body))
                .build();
        CompletableFuture<HttpResponse<InputStream>> exchange =
                http.sendAsync(request, HttpResponse.BodyHandlers.ofInputStream());
        HttpResponse<InputStream> response;
        try {
            response = exchange.get(options.sendTimeout().toMillis(), TimeUnit.MILLISECONDS);
        } catch (TimeoutException e) {
            exchange.cancel(true);
            throw new HttpTimeoutException("no answer within " + options.sendTimeout().toMillis() + " ms");
        } catch (InterruptedException e) {
            exchange.cancel(true);
            Thread.currentThread().interrupt();
            throw new IOException("interrupted");
        } catch (ExecutionException e) {
            Throwable cause = e.getCause();
            if (cause instanceof IOException io) {
                throw io;
            }
            throw new IOException(cause);
        }
        response.body().close();
        return response.statusCode();
    }

    /** Counts the table, and removes what is past max-age or beyond capacity (with a WARN). */
    private void housekeeping(long now) {
        int expired = outbox.removeOlderThan(now - options.maxAge().toMillis(), now);
        if (expired > 0) {
            droppedExpired.addAndGet(expired);
            LOG.warnf("Lockstep event listener: dropped %d events older than max-age-ms (%d ms) that were never "
                    + "delivered", expired, options.maxAge().toMillis());
        }
        int overflow = outbox.removeBeyond(options.capacity(), MAX_OVERFLOW_REMOVALS);
        if (overflow > 0) {
            droppedOverflow.addAndGet(overflow);
            LOG.warnf("Lockstep event listener: more than queue-capacity (%d) events waiting; dropped the %d "
                    + "oldest", options.capacity(), overflow);
        }
        Outbox.Stats stats = outbox.stats();
        long before = waiting;
        waiting = stats.waiting();
        if (stats.waiting() > 0 && (before == 0 || now - lastWaitingLog >= options.logInterval().toMillis())) {
            lastWaitingLog = now;
            LOG.infof("Lockstep events waiting to be sent: %d (oldest %d s)", stats.waiting(),
                    Math.max(0, now - stats.oldestCreatedAt()) / 1000);
        } else if (stats.waiting() == 0 && before > 0) {
            LOG.infof("Lockstep events waiting to be sent: 0");
        }
    }

    private void databaseError(String what, RuntimeException e) {
        long now = System.currentTimeMillis();
        synchronized (this) {
            if (now - lastErrorLog < ERROR_LOG_INTERVAL_MS) {
                LOG.debugf(e, "Lockstep event drainer: database error %s", what);
                return;
            }
            lastErrorLog = now;
        }
        LOG.warnf(e, "Lockstep event drainer: database error %s; trying again", what);
    }

}
