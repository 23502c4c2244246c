package org.lockstep.keycloak;

import java.net.URI;

/**
 * One event on its way to one Lockstep endpoint: everything the sender thread needs, read
 * from the Keycloak session before the request ended.
 *
 * @param endpoint    {@code {url}/realms/{realm}/events}
 * @param queuedAtNanos {@link System#nanoTime()} when it was queued (for {@code max-age-ms})
 */
public record Delivery(LockstepEvent event, byte[] body, URI endpoint, Signer signer, long queuedAtNanos) {

    public static Delivery of(LockstepEvent event, URI endpoint, Signer signer) {
        return new Delivery(event, event.toJson(), endpoint, signer, System.nanoTime());
    }

    /** The same delivery, its age counted from now (when it enters the queue). */
    Delivery queuedNow() {
        return new Delivery(event, body, endpoint, signer, System.nanoTime());
    }
}
