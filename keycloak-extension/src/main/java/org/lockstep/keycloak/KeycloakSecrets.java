package org.lockstep.keycloak;

import java.util.Map;
import java.util.Optional;
import java.util.concurrent.ConcurrentHashMap;

import org.keycloak.models.KeycloakSession;
import org.keycloak.models.KeycloakSessionFactory;
import org.keycloak.models.RealmModel;
import org.keycloak.models.utils.KeycloakModelUtils;
import org.keycloak.vault.VaultStringSecret;

/**
 * A realm's signing secret: Keycloak's vault first (key {@value Drainer#VAULT_KEY}, looked
 * up for that realm, so each realm can have its own), else the provider option
 * {@code secret}. Never a realm attribute: realm representations and exports show attributes
 * to anyone who may read the realm, and the secret lets its holder forge any event.
 * <p>
 * Lookups are remembered for 30 s: every event would otherwise read the vault, and the file
 * vault logs a WARN each time a realm has no file.
 */
final class KeycloakSecrets implements Drainer.Secrets {

    private static final String VAULT_EXPRESSION = "${vault." + Drainer.VAULT_KEY + "}";
    private static final long CACHE_MILLIS = 30_000;

    private record Cached(String secret, long at) {
    }

    private final KeycloakSessionFactory factory;
    private final String defaultSecret;
    private final Map<String, Cached> cache = new ConcurrentHashMap<>();

    KeycloakSecrets(KeycloakSessionFactory factory, String defaultSecret) {
        this.factory = factory;
        this.defaultSecret = defaultSecret;
    }

    /** On the drainer's threads: a short job transaction of its own. */
    @Override
    public String secretFor(String realmId) {
        Cached c = cache.get(realmId);
        if (c != null && System.currentTimeMillis() - c.at() < CACHE_MILLIS) {
            return c.secret();
        }
        String secret = KeycloakModelUtils.runJobInTransactionWithResult(factory,
                session -> lookup(session, session.realms().getRealm(realmId)));
        cache.put(realmId, new Cached(secret, System.currentTimeMillis()));
        return secret;
    }

    /** On a request thread, with that request's session. */
    String secretFor(KeycloakSession session, RealmModel realm) {
        Cached c = cache.get(realm.getId());
        if (c != null && System.currentTimeMillis() - c.at() < CACHE_MILLIS) {
            return c.secret();
        }
        String secret = lookup(session, realm);
        cache.put(realm.getId(), new Cached(secret, System.currentTimeMillis()));
        return secret;
    }

    private String lookup(KeycloakSession session, RealmModel realm) {
        if (realm != null) {
            RealmModel previous = session.getContext().getRealm();
            // The vault resolves keys for the context's realm (files: "<realm>_<key>").
            session.getContext().setRealm(realm);
            try (VaultStringSecret vaulted = session.vault().getStringSecret(VAULT_EXPRESSION)) {
                Optional<String> value = vaulted.get();
                if (value.isPresent() && !value.get().isBlank()) {
                    return value.get().trim();
                }
            } finally {
                session.getContext().setRealm(previous);
            }
        }
        return defaultSecret;
    }
}
