package org.lockstep.keycloak;

import java.util.List;

/**
 * The durable queue of events waiting for Lockstep, shared by every Keycloak node on one
 * database. Each call is one short transaction; nothing is held open while a node sends.
 * <p>
 * Events are ordered per lane (a realm). Only the head of a lane (lowest SEQ) is ever
 * claimed, and only while no other claim on it is live, so at most one node sends a lane's
 * events at a time and in order. A claim is a lease: a node killed mid-send leaves a row
 * whose lease runs out, and another node (or the same one restarted) sends it again.
 */
interface Outbox {

    /** The head of a lane and when it may be claimed (epoch ms; lease end or retry time). */
    record Head(String lane, long readyAt) {
    }

    /** A waiting event as stored. */
    record Row(String id, String lane, long seq, String eventId, String eventType, String realmName,
            String endpoint, String body, long createdAt, int attempts) {
    }

    /**
     * What a claim found: {@code row} when this caller now holds the head's lease (with
     * {@code owner}); otherwise {@code row} is null and {@code readyAt} says when to look
     * again ({@link Long#MAX_VALUE}: the lane is empty; 0: lost a race, look again now).
     */
    record Claim(Row row, String owner, long readyAt) {
        static Claim empty() {
            return new Claim(null, null, Long.MAX_VALUE);
        }

        static Claim notBefore(long readyAt) {
            return new Claim(null, null, readyAt);
        }

        boolean claimed() {
            return row != null;
        }
    }

    /** The number of waiting events and the creation time of the oldest (0 when none). */
    record Stats(long waiting, long oldestCreatedAt) {
    }

    /** The head of every lane with waiting events (at most {@code max} lanes). */
    List<Head> heads(int max);

    /** Tries to lease the head of {@code lane} for {@code owner} until {@code leaseUntil}. */
    Claim claim(String lane, String owner, long now, long leaseUntil);

    /** Removes a sent (or dropped) row, if {@code owner} still holds its lease. */
    boolean remove(String id, String owner);

    /** Gives a failed row back: attempt count, when to try again, why it failed. */
    boolean retryLater(String id, String owner, int attempts, long nextAttemptAt, String error);

    /** Removes unleased rows created before {@code createdBefore}; returns how many. */
    int removeOlderThan(long createdBefore, long now);

    /** Removes the oldest rows beyond {@code capacity} (at most {@code max} per call); returns how many. */
    int removeBeyond(long capacity, int max);

    Stats stats();
}
