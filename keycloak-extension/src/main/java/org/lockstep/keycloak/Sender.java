package org.lockstep.keycloak;

import java.io.IOException;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.time.Duration;
import java.net.URI;
import java.util.ArrayDeque;
import java.util.Collection;
import java.util.LinkedHashMap;
import java.util.Map;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicLong;
import java.util.concurrent.locks.Condition;
import java.util.concurrent.locks.ReentrantLock;

import org.jboss.logging.Logger;

/**
 * The bounded in-memory queue and the one daemon thread that drains it.
 * <ul>
 * <li>Events are kept in order per Lockstep endpoint ({@code {url}/realms/{realm}/events}):
 *     a retrying endpoint holds up only its own events, never another realm's or another
 *     Lockstep's.</li>
 * <li>Full queue (all endpoints together): the oldest queued event is dropped (WARN with the
 *     running count).</li>
 * <li>2xx and 409 (already received): done. Other 4xx: permanent, WARN and drop.</li>
 * <li>5xx, I/O error, timeout: the same event again (same id, fresh timestamp and signature)
 *     after 250 ms, doubling up to 5 s, until it is older than {@code maxAge}; then WARN and
 *     drop.</li>
 * </ul>
 * Nothing survives a restart: the queue lives in memory only.
 */
public final class Sender {

    private static final Logger LOG = Logger.getLogger(Sender.class);
    /** At most one WARN per this interval about overflow drops (the counter says how many). */
    private static final long OVERFLOW_LOG_INTERVAL_NANOS = TimeUnit.SECONDS.toNanos(10);

    /** The events of one endpoint, in order, and the retry state of the first. */
    private static final class Lane {
        final ArrayDeque<Delivery> queue = new ArrayDeque<>();
        long notBeforeNanos;
        long backoffMillis;
        int attempts;
        String failure = "never attempted";
        boolean sending;
    }

    private enum Outcome { DONE, DROPPED, RETRY, STOPPED }

    private final int capacity;
    private final Duration sendTimeout;
    private final long maxAgeNanos;
    private final long initialBackoffMillis;
    private final long maxBackoffMillis;
    private final HttpClient http;

    private final ReentrantLock lock = new ReentrantLock();
    private final Condition changed = lock.newCondition();
    private final Map<URI, Lane> lanes = new LinkedHashMap<>();
    /** Events waiting in a lane (what the capacity bounds). */
    private int size;
    /** Events taken from a lane for an attempt that has not finished (0 or 1: one thread). */
    private int inFlight;
    private boolean running;
    private Thread thread;
    private long lastOverflowLog;

    private final AtomicLong droppedOverflow = new AtomicLong();
    private final AtomicLong droppedRejected = new AtomicLong();
    private final AtomicLong droppedExpired = new AtomicLong();
    private final AtomicLong delivered = new AtomicLong();

    public Sender(int capacity, Duration sendTimeout, Duration maxAge) {
        this(capacity, sendTimeout, maxAge, 250, 5_000);
    }

    Sender(int capacity, Duration sendTimeout, Duration maxAge, long initialBackoffMillis, long maxBackoffMillis) {
        if (capacity < 1) {
            throw new IllegalArgumentException("queue capacity must be at least 1");
        }
        this.capacity = capacity;
        this.sendTimeout = sendTimeout;
        this.maxAgeNanos = maxAge.toNanos();
        this.initialBackoffMillis = initialBackoffMillis;
        this.maxBackoffMillis = maxBackoffMillis;
        this.http = HttpClient.newBuilder()
                .version(HttpClient.Version.HTTP_1_1)
                .connectTimeout(sendTimeout)
                .followRedirects(HttpClient.Redirect.NEVER)
                .build();
    }

    /** Starts the sender thread (idempotent). */
    public void start() {
        lock.lock();
        try {
            if (running) {
                return;
            }
            running = true;
            thread = new Thread(this::run, "lockstep-event-sender");
            thread.setDaemon(true);
            thread.start();
        } finally {
            lock.unlock();
        }
    }

    /**
     * Stops the sender thread, waiting up to {@code wait} for it; events still queued are
     * lost (logged).
     */
    public void stop(Duration wait) {
        Thread t;
        int left;
        lock.lock();
        try {
            if (!running) {
                return;
            }
            running = false;
            t = thread;
            thread = null;
            left = size + inFlight;
            lanes.clear();
            size = 0;
            changed.signalAll();
        } finally {
            lock.unlock();
        }
        t.interrupt();
        try {
            t.join(wait.toMillis());
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
        }
        if (left > 0) {
            LOG.warnf("Lockstep event sender stopped with %d events not sent", left);
        }
    }

    /** Queues events in order; never blocks on the network. */
    public void enqueue(Collection<Delivery> deliveries) {
        lock.lock();
        try {
            for (Delivery d : deliveries) {
                if (size >= capacity) {
                    dropOldest();
                }
                Lane lane = lanes.computeIfAbsent(d.endpoint(), e -> new Lane());
                if (lane.queue.isEmpty() && !lane.sending) {
                    lane.backoffMillis = initialBackoffMillis;
                }
                lane.queue.addLast(d.queuedNow());
                size++;
            }
            changed.signalAll();
        } finally {
            lock.unlock();
        }
    }

    /** Drops the oldest queued event of all endpoints (caller holds the lock). */
    private void dropOldest() {
        Lane oldestLane = null;
        for (Lane lane : lanes.values()) {
            Delivery head = lane.queue.peekFirst();
            if (head != null && (oldestLane == null
                    || head.queuedAtNanos() - oldestLane.queue.getFirst().queuedAtNanos() < 0)) {
                oldestLane = lane;
            }
        }
        if (oldestLane == null) {
            return;
        }
        Delivery oldest = oldestLane.queue.pollFirst();
        size--;
        oldestLane.attempts = 0;
        long n = droppedOverflow.incrementAndGet();
        long now = System.nanoTime();
        if (n == 1 || now - lastOverflowLog >= OVERFLOW_LOG_INTERVAL_NANOS) {
            lastOverflowLog = now;
            LOG.warnf("Lockstep event queue full (capacity %d): dropped the oldest event %s (%s); "
                    + "%d events dropped so far", capacity, oldest.event().id(), oldest.event().type(), n);
        }
    }

    /** Events waiting in a lane, not counting one being sent right now. */
    public int queued() {
        lock.lock();
        try {
            return size;
        } finally {
            lock.unlock();
        }
    }

    /** Events not yet delivered or dropped: the queued ones plus one being sent right now. */
    public int pending() {
        lock.lock();
        try {
            return size + inFlight;
        } finally {
            lock.unlock();
        }
    }

    public long droppedOverflow() {
        return droppedOverflow.get();
    }

    public long droppedRejected() {
        return droppedRejected.get();
    }

    public long droppedExpired() {
        return droppedExpired.get();
    }

    public long delivered() {
        return delivered.get();
    }

    private void run() {
        while (true) {
            Lane lane;
            Delivery next;
            lock.lock();
            try {
                while (true) {
                    if (!running) {
                        return;
                    }
                    lane = null;
                    for (Lane l : lanes.values()) {
                        if (!l.sending && !l.queue.isEmpty()
                                && (lane == null || l.notBeforeNanos - lane.notBeforeNanos < 0)) {
                            lane = l;
                        }
                    }
                    if (lane == null) {
                        changed.awaitUninterruptibly();
                        continue;
                    }
                    long wait = lane.notBeforeNanos - System.nanoTime();
                    if (wait > 0) {
                        changed.awaitNanos(wait);
                        continue;
                    }
                    next = lane.queue.pollFirst();
                    size--;
                    inFlight++;
                    lane.sending = true;
                    break;
                }
            } catch (InterruptedException e) {
                if (!stillRunning()) {
                    return;
                }
                continue;
            } finally {
                lock.unlock();
            }
            Outcome outcome = attempt(next, lane);
            lock.lock();
            try {
                lane.sending = false;
                inFlight--;
                if (!running || outcome == Outcome.STOPPED) {
                    return;
                }
                if (outcome == Outcome.RETRY) {
                    lane.queue.addFirst(next);
                    size++;
                    lane.notBeforeNanos = System.nanoTime() + TimeUnit.MILLISECONDS.toNanos(lane.backoffMillis);
                    lane.backoffMillis = Math.min(lane.backoffMillis * 2, maxBackoffMillis);
                } else {
                    lane.attempts = 0;
                    lane.failure = "never attempted";
                    lane.notBeforeNanos = System.nanoTime();
                    lane.backoffMillis = initialBackoffMillis;
                    if (lane.queue.isEmpty()) {
                        lanes.remove(next.endpoint());
                    }
                }
            } finally {
                lock.unlock();
            }
        }
    }

    /** One attempt at the first event of {@code lane} (no lock held while sending). */
    private Outcome attempt(Delivery d, Lane lane) {
        if (System.nanoTime() - d.queuedAtNanos() >= maxAgeNanos) {
            droppedExpired.incrementAndGet();
            LOG.warnf("Lockstep event %s (%s) for realm %s dropped after %d attempts: older than max-age-ms "
                    + "(last failure: %s)", d.event().id(), d.event().type(), d.event().realm(), lane.attempts,
                    lane.failure);
            return Outcome.DROPPED;
        }
        lane.attempts++;
        int attempt = lane.attempts;
        String failure;
        try {
            int status = send(d);
            if ((status >= 200 && status < 300) || status == 409) {
                delivered.incrementAndGet();
                if (attempt > 1) {
                    LOG.infof("Lockstep event %s (%s) delivered after %d attempts", d.event().id(),
                            d.event().type(), attempt);
                }
                return Outcome.DONE;
            }
            if (status >= 400 && status < 500) {
                droppedRejected.incrementAndGet();
                LOG.warnf("Lockstep refused event %s (%s) for realm %s with HTTP %d; dropped (not retried)",
                        d.event().id(), d.event().type(), d.event().realm(), status);
                return Outcome.DROPPED;
            }
            failure = "HTTP " + status;
        } catch (IOException e) {
            failure = e.getClass().getSimpleName() + (e.getMessage() == null ? "" : ": " + e.getMessage());
        } catch (InterruptedException e) {
            if (!stillRunning()) {
                return Outcome.STOPPED;
            }
            failure = "interrupted";
        }
        lane.failure = failure;
        if (attempt == 1 || attempt % 10 == 0) {
            LOG.warnf("Lockstep event %s (%s) not delivered to %s (%s); retrying (attempt %d)",
                    d.event().id(), d.event().type(), d.endpoint(), failure, attempt);
        }
        return Outcome.RETRY;
    }

    private int send(Delivery d) throws IOException, InterruptedException {
        long timestamp = System.currentTimeMillis() / 1000;
        String id = d.event().id();
        HttpRequest request = HttpRequest.newBuilder(d.endpoint())
                .timeout(sendTimeout)
                .header("Content-Type", "application/json")
                .header("webhook-id", id)
                .header("webhook-timestamp", Long.toString(timestamp))
                .header("webhook-signature", d.signer().sign(id, timestamp, d.body()))
                .POST(HttpRequest.BodyPublishers.ofByteArray(d.body()))
                .build();
        return http.send(request, HttpResponse.BodyHandlers.discarding()).statusCode();
    }

    private boolean stillRunning() {
        lock.lock();
        try {
            return running;
        } finally {
            lock.unlock();
        }
    }
}
