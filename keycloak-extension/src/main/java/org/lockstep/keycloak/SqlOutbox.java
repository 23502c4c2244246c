package org.lockstep.keycloak;

import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Map;

/**
 * {@link Outbox} in SQL that every database Keycloak supports runs: the claim is an
 * optimistic compare-and-set on {@code LEASE_UNTIL} of the lane's head, so two nodes that
 * read the same head race on one UPDATE and exactly one of them changes a row (the database
 * serialises the two UPDATEs on the row lock and re-checks the condition for the second).
 */
final class SqlOutbox implements Outbox {

    private static final String COLUMNS = "ID, LANE, SEQ, EVENT_ID, EVENT_TYPE, REALM_NAME, ENDPOINT, BODY, "
            + "CREATED_AT, ATTEMPTS, NEXT_ATTEMPT_AT, LEASE_UNTIL";

    private final Db.Tx tx;

    SqlOutbox(Db.Tx tx) {
        this.tx = tx;
    }

    @Override
    public List<Head> heads(int max) {
        return tx.run(db -> {
            // One pass over the (LANE, SEQ) index for the heads, then one lookup per lane: a
            // correlated MIN per row would cost a lookup per waiting row on every poll.
            List<Object[]> rows = db.query("SELECT e.LANE, e.SEQ, e.ID, e.NEXT_ATTEMPT_AT, e.LEASE_UNTIL "
                    + "FROM LOCKSTEP_EVENT e JOIN (SELECT LANE, MIN(SEQ) AS HEAD FROM LOCKSTEP_EVENT GROUP BY LANE) h "
                    + "ON e.LANE = h.LANE AND e.SEQ = h.HEAD ORDER BY e.SEQ", max);
            // Two nodes can write the same SEQ into one lane (same microsecond): the head is
            // then the lower id, as in claim().
            Map<String, Object[]> firstByLane = new HashMap<>();
            List<String> order = new ArrayList<>();
            for (Object[] r : rows) {
                String lane = (String) r[0];
                Object[] seen = firstByLane.get(lane);
                if (seen == null) {
                    order.add(lane);
                    firstByLane.put(lane, r);
                } else if (((String) r[2]).compareTo((String) seen[2]) < 0) {
                    firstByLane.put(lane, r);
                }
            }
            List<Head> heads = new ArrayList<>(order.size());
            for (String lane : order) {
                Object[] r = firstByLane.get(lane);
                heads.add(new Head(lane, Math.max(num(r[3]), num(r[4]))));
            }
            return heads;
        });
    }

    @Override
    public Claim claim(String lane, String owner, long now, long leaseUntil) {
        return tx.run(db -> {
            List<Object[]> rows = db.query("SELECT " + COLUMNS + " FROM LOCKSTEP_EVENT WHERE LANE = ? "
                    + "ORDER BY SEQ, ID", 1, lane);
            if (rows.isEmpty()) {
                return Claim.empty();
            }
            Object[] r = rows.get(0);
            long nextAttemptAt = num(r[10]);
            long currentLease = num(r[11]);
            long readyAt = Math.max(nextAttemptAt, currentLease);
            if (readyAt > now) {
                return Claim.notBefore(readyAt);
            }
            int changed = db.update("UPDATE LOCKSTEP_EVENT SET LEASE_OWNER = ?, LEASE_UNTIL = ? "
                    + "WHERE ID = ? AND LEASE_UNTIL = ?", owner, leaseUntil, r[0], currentLease);
            if (changed != 1) {
                return Claim.notBefore(0);
            }
            Row row = new Row((String) r[0], (String) r[1], num(r[2]), (String) r[3], (String) r[4], (String) r[5],
                    (String) r[6], (String) r[7], num(r[8]), (int) num(r[9]));
            return new Claim(row, owner, 0);
        });
    }

    @Override
    public boolean remove(String id, String owner) {
        return tx.run(db -> db.update("DELETE FROM LOCKSTEP_EVENT WHERE ID = ? AND LEASE_OWNER = ?", id, owner)) == 1;
    }

    @Override
    public boolean retryLater(String id, String owner, int attempts, long nextAttemptAt, String error) {
        String e = error.length() > 255 ? error.substring(0, 255) : error;
        return tx.run(db -> db.update("UPDATE LOCKSTEP_EVENT SET ATTEMPTS = ?, NEXT_ATTEMPT_AT = ?, "
                + "LEASE_OWNER = NULL, LEASE_UNTIL = 0, LAST_ERROR = ? WHERE ID = ? AND LEASE_OWNER = ?",
                attempts, nextAttemptAt, e, id, owner)) == 1;
    }

    @Override
    public int removeOlderThan(long createdBefore, long now) {
        return tx.run(db -> db.update("DELETE FROM LOCKSTEP_EVENT WHERE CREATED_AT < ? AND LEASE_UNTIL <= ?",
                createdBefore, now));
    }

    @Override
    public int removeBeyond(long capacity, int max) {
        return tx.run(db -> {
            long waiting = num(db.query("SELECT COUNT(*) FROM LOCKSTEP_EVENT", 1).get(0)[0]);
            long excess = Math.min(waiting - capacity, max);
            if (excess <= 0) {
                return 0;
            }
            int removed = 0;
            for (Object[] r : db.query("SELECT ID FROM LOCKSTEP_EVENT ORDER BY SEQ, ID", (int) excess)) {
                removed += db.update("DELETE FROM LOCKSTEP_EVENT WHERE ID = ?", r[0]);
            }
            return removed;
        });
    }

    @Override
    public Stats stats() {
        return tx.run(db -> {
            Object[] r = db.query("SELECT COUNT(*), MIN(CREATED_AT) FROM LOCKSTEP_EVENT", 1).get(0);
            return new Stats(num(r[0]), r[1] == null ? 0 : num(r[1]));
        });
    }

    /** Databases return COUNT and BIGINT columns as Long, BigInteger or BigDecimal. */
    private static long num(Object o) {
        return o == null ? 0 : ((Number) o).longValue();
    }
}
