package org.lockstep.keycloak;

import java.io.IOException;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.time.Duration;
import java.util.ArrayDeque;
import java.util.Collection;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicLong;
import java.util.concurrent.locks.Condition;
import java.util.concurrent.locks.ReentrantLock;

import org.jboss.logging.Logger;

/**
 * The bounded in-memory queue and the one daemon thread that drains it, in order.
 * <ul>
 * <li>Full queue: the oldest queued event is dropped (WARN with the running count).</li>
 * <li>2xx and 409 (already received): done. Other 4xx: permanent, WARN and drop.</li>
 * <li>5xx, I/O error, timeout: the same event again (same id, fresh timestamp and signature)
 *     after 250 ms, doubling up to 5 s, until it is older than {@code maxAge}; then WARN and
 *     drop. Events behind it wait, so order is kept.</li>
 * </ul>
 * Nothing survives a restart: the queue lives in memory only.
 */
public final class Sender {

    private static final Logger LOG = Logger.getLogger(Sender.class);
    /** At most one WARN per this interval about overflow drops (the counter says how many). */
    private static final long OVERFLOW_LOG_INTERVAL_NANOS = TimeUnit.SECONDS.toNanos(10);

    private final int capacity;
    private final Duration sendTimeout;
    private final long maxAgeNanos;
    private final long initialBackoffMillis;
    private final long maxBackoffMillis;
    private final HttpClient http;

    private final ReentrantLock lock = new ReentrantLock();
    private final Condition changed = lock.newCondition();
    private final ArrayDeque<Delivery> queue = new ArrayDeque<>();
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
            left = queue.size();
            queue.clear();
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
                if (queue.size() >= capacity) {
                    Delivery oldest = queue.pollFirst();
                    long n = droppedOverflow.incrementAndGet();
                    long now = System.nanoTime();
                    if (n == 1 || now - lastOverflowLog >= OVERFLOW_LOG_INTERVAL_NANOS) {
                        lastOverflowLog = now;
                        LOG.warnf("Lockstep event queue full (capacity %d): dropped the oldest event %s (%s); "
                                + "%d events dropped so far", capacity, oldest == null ? "-" : oldest.event().id(),
                                oldest == null ? "-" : oldest.event().type(), n);
                    }
                }
                queue.addLast(d.queuedNow());
            }
            changed.signalAll();
        } finally {
            lock.unlock();
        }
    }

    public int queued() {
        lock.lock();
        try {
            return queue.size();
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
            Delivery next;
            lock.lock();
            try {
                while (running && queue.isEmpty()) {
                    changed.awaitUninterruptibly();
                }
                if (!running) {
                    return;
                }
                next = queue.pollFirst();
            } finally {
                lock.unlock();
            }
            if (!deliver(next)) {
                return;
            }
        }
    }

    /** Sends one event until it is done or dropped; false when the sender was stopped. */
    private boolean deliver(Delivery d) {
        long backoff = initialBackoffMillis;
        int attempt = 0;
        String failure = "never attempted";
        while (true) {
            if (System.nanoTime() - d.queuedAtNanos() >= maxAgeNanos) {
                droppedExpired.incrementAndGet();
                LOG.warnf("Lockstep event %s (%s) for realm %s dropped after %d attempts: older than max-age-ms "
                        + "(last failure: %s)", d.event().id(), d.event().type(), d.event().realm(), attempt, failure);
                return true;
            }
            attempt++;
            try {
                int status = send(d);
                if ((status >= 200 && status < 300) || status == 409) {
                    delivered.incrementAndGet();
                    if (attempt > 1) {
                        LOG.infof("Lockstep event %s (%s) delivered after %d attempts", d.event().id(),
                                d.event().type(), attempt);
                    }
                    return true;
                }
                if (status >= 400 && status < 500) {
                    droppedRejected.incrementAndGet();
                    LOG.warnf("Lockstep refused event %s (%s) for realm %s with HTTP %d; dropped (not retried)",
                            d.event().id(), d.event().type(), d.event().realm(), status);
                    return true;
                }
                failure = "HTTP " + status;
            } catch (IOException e) {
                failure = e.getClass().getSimpleName() + (e.getMessage() == null ? "" : ": " + e.getMessage());
            } catch (InterruptedException e) {
                if (!stillRunning()) {
                    return false;
                }
                failure = "interrupted";
            }
            if (attempt == 1 || attempt % 10 == 0) {
                LOG.warnf("Lockstep event %s (%s) not delivered to %s (%s); retrying (attempt %d)",
                        d.event().id(), d.event().type(), d.endpoint(), failure, attempt);
            }
            if (!pause(backoff)) {
                return false;
            }
            backoff = Math.min(backoff * 2, maxBackoffMillis);
        }
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

    /** Waits {@code millis} unless stopped first; false when stopped. */
    private boolean pause(long millis) {
        long deadline = System.nanoTime() + TimeUnit.MILLISECONDS.toNanos(millis);
        lock.lock();
        try {
            while (running) {
                long left = deadline - System.nanoTime();
                if (left <= 0) {
                    return true;
                }
                try {
                    changed.awaitNanos(left);
                } catch (InterruptedException e) {
                    return running;
                }
            }
            return false;
        } finally {
            lock.unlock();
        }
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
