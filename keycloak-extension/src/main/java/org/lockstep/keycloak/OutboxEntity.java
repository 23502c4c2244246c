package org.lockstep.keycloak;

import java.util.UUID;
import java.util.concurrent.atomic.AtomicLong;

import jakarta.persistence.Column;
import jakarta.persistence.Entity;
import jakarta.persistence.Id;
import jakarta.persistence.Table;

/**
 * One event waiting for Lockstep: a row of {@code LOCKSTEP_EVENT} in Keycloak's database,
 * written in the transaction of the request that produced the event (so it exists exactly
 * when the event happened) and deleted once Lockstep has it. The columns are created by
 * {@code META-INF/lockstep-changelog.xml}; {@link SqlOutbox} claims and removes rows.
 */
@Entity
@Table(name = "LOCKSTEP_EVENT")
public class OutboxEntity {

    /** Last {@link #nextSeq()} value handed out by this JVM. */
    private static final AtomicLong LAST_SEQ = new AtomicLong();

    @Id
    @Column(name = "ID", length = 36)
    private String id;

    /** The ordering lane: the realm id. Events of a lane are sent one at a time, in SEQ order. */
    @Column(name = "LANE", length = 36, nullable = false)
    private String lane;

    @Column(name = "SEQ", nullable = false)
    private long seq;

    @Column(name = "EVENT_ID", nullable = false)
    private String eventId;

    @Column(name = "EVENT_TYPE", length = 64, nullable = false)
    private String eventType;

    @Column(name = "REALM_NAME", nullable = false)
    private String realmName;

    @Column(name = "ENDPOINT", length = 2048, nullable = false)
    private String endpoint;

    @Column(name = "BODY", length = 4000, nullable = false)
    private String body;

    @Column(name = "CREATED_AT", nullable = false)
    private long createdAt;

    @Column(name = "ATTEMPTS", nullable = false)
    private int attempts;

    @Column(name = "NEXT_ATTEMPT_AT", nullable = false)
    private long nextAttemptAt;

    @Column(name = "LEASE_OWNER", length = 64)
    private String leaseOwner;

    @Column(name = "LEASE_UNTIL", nullable = false)
    private long leaseUntil;

    @Column(name = "LAST_ERROR")
    private String lastError;

    protected OutboxEntity() {
    }

    /** A new row for {@code event}, to be sent to {@code endpoint}, ordered in the lane {@code realmId}. */
    static OutboxEntity of(String realmId, LockstepEvent event, String endpoint, String body) {
        OutboxEntity e = new OutboxEntity();
        e.id = UUID.randomUUID().toString();
        e.lane = realmId;
        e.seq = nextSeq();
        e.eventId = event.id();
        e.eventType = event.type();
        e.realmName = event.realm();
        e.endpoint = endpoint;
        e.body = body;
        e.createdAt = System.currentTimeMillis();
        return e;
    }

    /**
     * Microseconds since the epoch, strictly increasing within this JVM: events of one node
     * keep their order even within a millisecond, and nodes with synchronised clocks
     * interleave their events by time. No database sequence, so every database Keycloak
     * supports takes the same changelog.
     */
    static long nextSeq() {
        long now = System.currentTimeMillis() * 1000;
        return LAST_SEQ.updateAndGet(prev -> Math.max(prev + 1, now));
    }

    public String getId() {
        return id;
    }

    public String getLane() {
        return lane;
    }

    public long getSeq() {
        return seq;
    }

    public String getEventId() {
        return eventId;
    }

    public String getBody() {
        return body;
    }
}
