package org.lockstep.keycloak;

import java.net.URI;
import java.net.URLEncoder;
import java.nio.charset.StandardCharsets;
import java.util.Map;

import org.jboss.logging.Logger;
import org.keycloak.Token;
import org.keycloak.connections.jpa.JpaConnectionProvider;
import org.keycloak.events.Event;
import org.keycloak.events.EventListenerProvider;
import org.keycloak.events.admin.AdminEvent;
import org.keycloak.models.AbstractKeycloakTransaction;
import org.keycloak.models.KeycloakSession;
import org.keycloak.models.KeycloakTransactionManager;
import org.keycloak.models.RealmModel;
import org.keycloak.models.UserModel;
import org.keycloak.models.UserSessionModel;
import org.keycloak.models.utils.KeycloakModelUtils;
import org.keycloak.models.utils.SessionExpirationUtils;
import org.keycloak.representations.AccessToken;

/**
 * Turns the Keycloak events of one Keycloak session into Lockstep events.
 * <p>
 * Everything an event needs from Keycloak (session expiry, the user's enabled flag, the
 * impersonating admin's session, the realm's Lockstep URL) is read here, on the request
 * thread, while the session is open, and the event is written to the outbox table
 * ({@link OutboxEntity}) in the request's own transaction: a rolled back request leaves no
 * row, a committed one survives any crash. The {@link Drainer} sends it; the network is
 * never touched on this thread.
 */
public class LockstepEventListenerProvider implements EventListenerProvider {

    private static final Logger LOG = Logger.getLogger(LockstepEventListenerProvider.class);

    /** Realm attribute that overrides the provider's {@code url} option. */
    public static final String URL_ATTRIBUTE = "lockstep.url";
    /** No longer read (secrets do not belong in attributes); its presence is reported once. */
    public static final String SECRET_ATTRIBUTE = "lockstep.secret";
    /** Column sizes of LOCKSTEP_EVENT (BODY, ENDPOINT). */
    static final int MAX_BODY_CHARS = 4000;
    static final int MAX_ENDPOINT_CHARS = 2048;

    /** {@code Details.IMPERSONATOR_REALM}, {@code Details.IMPERSONATOR} and {@code Details.REASON}. */
    private static final String IMPERSONATOR_REALM = "impersonator_realm";
    private static final String IMPERSONATOR = "impersonator";
    private static final String REASON = "reason";

    private final KeycloakSession session;
    private final LockstepEventListenerProviderFactory factory;
    /** Whether this session's transaction already wakes the drainer when it commits. */
    private boolean enlisted;

    LockstepEventListenerProvider(KeycloakSession session, LockstepEventListenerProviderFactory factory) {
        this.session = session;
        this.factory = factory;
    }

    @Override
    public void onEvent(Event event) {
        if (event.getError() != null || event.getType() == null) {
            return;
        }
        String type = switch (event.getType()) {
            case LOGIN, CODE_TO_TOKEN, REFRESH_TOKEN, LOGOUT, REVOKE_GRANT, IMPERSONATE -> event.getType().name();
            // Keycloak 26.5 reports sessions it removes on its own (expiry, periodic clean-up)
            // as USER_SESSION_DELETED with reason "user_session_expired".
            case USER_SESSION_DELETED -> "SESSION_EXPIRED";
            default -> null;
        };
        if (type == null) {
            return;
        }
        RealmModel realm = session.realms().getRealm(event.getRealmId());
        if (realm == null) {
            return;
        }
        LockstepEvent out = LockstepEvent.of(event.getId(), type, realm.getName(), event.getTime())
                .withUser(event.getUserId())
                .withClient(event.getClientId());
        switch (event.getType()) {
            case LOGIN, CODE_TO_TOKEN, REFRESH_TOKEN, IMPERSONATE ->
                    out = out.withSession(event.getSessionId(), sessionExpiresAt(realm, event.getSessionId()));
            default -> out = out.withSession(event.getSessionId(), null);
        }
        if (event.getType() == org.keycloak.events.EventType.USER_SESSION_DELETED) {
            Map<String, String> details = event.getDetails();
            LOG.debugf("user session %s removed by Keycloak (reason %s)", event.getSessionId(),
                    details == null ? null : details.get(REASON));
        }
        if (event.getType() == org.keycloak.events.EventType.IMPERSONATE) {
            out = withImpersonator(out, event);
        }
        submit(realm, out);
    }

    @Override
    public void onEvent(AdminEvent event, boolean includeRepresentation) {
        if (event.getError() != null) {
            return;
        }
        AdminAction action = AdminAction.of(
                event.getOperationType() == null ? null : event.getOperationType().name(),
                event.getResourceTypeAsString(), event.getResourcePath());
        if (action == null) {
            return;
        }
        RealmModel realm = session.realms().getRealm(event.getRealmId());
        if (realm == null) {
            return;
        }
        String type = action.type();
        if (AdminAction.USER_UPDATED.equals(type)) {
            UserModel user = session.users().getUserById(realm, action.id());
            if (user == null || user.isEnabled()) {
                return;
            }
            type = "USER_DISABLED";
        }
        LockstepEvent out = LockstepEvent.of(event.getId(), type, realm.getName(), event.getTime());
        switch (type) {
            case "SESSION_DELETED" -> out = out.withSession(action.id(), null);
            case "REALM_LOGOUT_ALL" -> { }
            default -> out = out.withUser(action.id());
        }
        submit(realm, out);
    }

    /**
     * min(start + SSO Session Max, last refresh + SSO Session Idle) in epoch ms, with the
     * remember-me (or offline) variants, computed by Keycloak's own
     * {@link SessionExpirationUtils}; null when the session cannot be found.
     */
    private Long sessionExpiresAt(RealmModel realm, String sessionId) {
        if (sessionId == null) {
            return null;
        }
        try {
            UserSessionModel us = session.getContext().getUserSession();
            if (us == null || !sessionId.equals(us.getId())) {
                us = session.sessions().getUserSession(realm, sessionId);
            }
            if (us == null) {
                return null;
            }
            boolean offline = us.isOffline();
            long max = SessionExpirationUtils.calculateUserSessionMaxLifespanTimestamp(offline, us.isRememberMe(),
                    us.getStarted() * 1000L, realm);
            long idle = SessionExpirationUtils.calculateUserSessionIdleTimestamp(offline, us.isRememberMe(),
                    us.getLastSessionRefresh() * 1000L, realm);
            // A non-positive lifespan means "no limit" (offline sessions without max lifespan).
            if (max <= us.getStarted() * 1000L) {
                return idle;
            }
            return Math.min(max, idle);
        } catch (RuntimeException e) {
            LOG.debugf(e, "cannot read the expiry of user session %s", sessionId);
            return null;
        }
    }

    /**
     * The impersonating admin: the bearer token of this admin request, which Keycloak has
     * verified itself ({@code AdminRoot.authenticateRealmAdminRequest}:
     * {@code AppAuthManager.BearerTokenAuthenticator}, then {@code context.setBearerToken}).
     * It is not re-verified here on purpose: when the admin impersonates in its own realm,
     * Keycloak has already ended the admin's session in this request, so a second
     * verification would fail.
     */
    private LockstepEvent withImpersonator(LockstepEvent out, Event event) {
        Map<String, String> details = event.getDetails();
        String realmName = details == null ? null : details.get(IMPERSONATOR_REALM);
        String username = details == null ? null : details.get(IMPERSONATOR);
        String adminId = null;
        String adminSid = null;
        Token token = session.getContext().getBearerToken();
        if (token instanceof AccessToken at) {
            String issuerRealm = realmOfIssuer(at.getIssuer());
            if (realmName == null || realmName.equals(issuerRealm)) {
                realmName = issuerRealm;
                adminId = at.getSubject();
                adminSid = at.getSessionId();
            } else {
                LOG.warnf("IMPERSONATE event %s: the request's token is from realm %s, the event names %s; "
                        + "impersonator session not sent", event.getId(), issuerRealm, realmName);
            }
        } else {
            LOG.warnf("IMPERSONATE event %s: no verified bearer token in the request; impersonator session not sent",
                    event.getId());
        }
        if (adminId == null && realmName != null && username != null) {
            RealmModel adminRealm = session.realms().getRealmByName(realmName);
            UserModel admin = adminRealm == null ? null : session.users().getUserByUsername(adminRealm, username);
            adminId = admin == null ? null : admin.getId();
        }
        return out.withImpersonator(adminId, adminSid, realmName);
    }

    /** The realm name at the end of an issuer URL ({@code .../realms/{name}}). */
    static String realmOfIssuer(String issuer) {
        if (issuer == null) {
            return null;
        }
        int slash = issuer.lastIndexOf('/');
        return URLDecoderSafe.decode(issuer.substring(slash + 1));
    }

    /**
     * Checks that the realm can send (URL and secret) and writes the event into the outbox
     * table in this request's transaction: it exists exactly when the event does.
     */
    private void submit(RealmModel realm, LockstepEvent event) {
        String url = LockstepEventListenerProviderFactory.blankToNull(realm.getAttribute(URL_ATTRIBUTE));
        if (url == null) {
            url = factory.defaultUrl();
        }
        if (realm.getAttribute(SECRET_ATTRIBUTE) != null && factory.firstAttributeWarning(realm.getId())) {
            LOG.warnf("Lockstep event listener: realm %s has the attribute %s, which is ignored: realm exports "
                    + "and representations show attributes to their readers, and the secret forges events. Put "
                    + "the secret in Keycloak's vault (key %s) or the provider option secret, and remove the "
                    + "attribute", realm.getName(), SECRET_ATTRIBUTE, Drainer.VAULT_KEY);
        }
        String secret = factory.secrets().secretFor(session, realm);
        if (url == null || secret == null) {
            if (factory.firstWarning(realm.getId())) {
                LOG.warnf("Lockstep event listener: realm %s has no %s; its events are not sent (set the realm "
                        + "attribute %s or the provider option url; the secret in the vault key %s or the "
                        + "provider option secret)", realm.getName(),
                        url == null && secret == null ? "URL and no secret" : url == null ? "URL" : "secret",
                        URL_ATTRIBUTE, Drainer.VAULT_KEY);
            }
            return;
        }
        URI endpoint;
        try {
            Signer.of(secret);
            endpoint = endpoint(url, realm.getName());
        } catch (IllegalArgumentException e) {
            if (factory.firstWarning(realm.getId())) {
                LOG.warnf("Lockstep event listener: realm %s has an unusable Lockstep configuration (%s); its "
                        + "events are not sent", realm.getName(), e.getMessage());
            }
            return;
        }
        factory.clearWarning(realm.getId());
        String body = new String(event.toJson(), StandardCharsets.UTF_8);
        if (body.length() > MAX_BODY_CHARS || endpoint.toString().length() > MAX_ENDPOINT_CHARS) {
            LOG.warnf("Lockstep event %s (%s) of realm %s is too large to store (%d characters); not sent",
                    event.id(), event.type(), realm.getName(), body.length());
            return;
        }
        store(OutboxEntity.of(realm.getId(), event, endpoint.toString(), body));
    }

    private void store(OutboxEntity row) {
        KeycloakTransactionManager tm = session.getTransactionManager();
        if (tm == null || !tm.isActive()) {
            // No request transaction to join (already completed): a transaction of its own.
            KeycloakModelUtils.runJobInTransaction(session.getKeycloakSessionFactory(),
                    s -> s.getProvider(JpaConnectionProvider.class).getEntityManager().persist(row));
            factory.drainer().wake();
            return;
        }
        session.getProvider(JpaConnectionProvider.class).getEntityManager().persist(row);
        if (enlisted) {
            return;
        }
        enlisted = true;
        tm.enlistAfterCompletion(new AbstractKeycloakTransaction() {
            @Override
            protected void commitImpl() {
                // Sent within milliseconds instead of at the next poll.
                factory.drainer().wake();
            }

            @Override
            protected void rollbackImpl() {
                LOG.debugf("transaction rolled back: its Lockstep events were not stored");
            }
        });
    }

    /** {@code {url}/realms/{realm}/events}, the realm name as one path segment. */
    static URI endpoint(String url, String realmName) {
        String base = url;
        while (base.endsWith("/")) {
            base = base.substring(0, base.length() - 1);
        }
        String segment = URLEncoder.encode(realmName, StandardCharsets.UTF_8).replace("+", "%20");
        URI uri = URI.create(base + "/realms/" + segment + "/events");
        if (uri.getScheme() == null || !(uri.getScheme().equals("http") || uri.getScheme().equals("https"))
                || uri.getHost() == null) {
            throw new IllegalArgumentException("the Lockstep URL must be an absolute http(s) URL");
        }
        return uri;
    }

    @Override
    public void close() {
    }

    /** URL decoding that never throws (a malformed issuer yields the raw text). */
    private static final class URLDecoderSafe {
        static String decode(String s) {
            try {
                return java.net.URLDecoder.decode(s, StandardCharsets.UTF_8);
            } catch (IllegalArgumentException e) {
                return s;
            }
        }
    }
}
