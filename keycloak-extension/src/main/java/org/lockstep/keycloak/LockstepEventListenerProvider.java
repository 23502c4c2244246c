package org.lockstep.keycloak;

import java.net.URI;
import java.net.URLEncoder;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;

import org.jboss.logging.Logger;
import org.keycloak.Token;
import org.keycloak.events.Event;
import org.keycloak.events.EventListenerProvider;
import org.keycloak.events.admin.AdminEvent;
import org.keycloak.models.AbstractKeycloakTransaction;
import org.keycloak.models.KeycloakSession;
import org.keycloak.models.KeycloakTransactionManager;
import org.keycloak.models.RealmModel;
import org.keycloak.models.UserModel;
import org.keycloak.models.UserSessionModel;
import org.keycloak.models.utils.SessionExpirationUtils;
import org.keycloak.representations.AccessToken;

/**
 * Turns the Keycloak events of one Keycloak session into Lockstep events.
 * <p>
 * Everything an event needs from Keycloak (session expiry, the user's enabled flag, the
 * impersonating admin's session, the realm's Lockstep URL and secret) is read here, on the
 * request thread, while the session is open. The events are handed to the {@link Sender}
 * only when Keycloak's transaction commits (an after-completion transaction), so a rolled
 * back request sends nothing; the network is never touched on this thread.
 */
public class LockstepEventListenerProvider implements EventListenerProvider {

    private static final Logger LOG = Logger.getLogger(LockstepEventListenerProvider.class);

    /** Realm attributes that override the provider's {@code url} and {@code secret} options. */
    public static final String URL_ATTRIBUTE = "lockstep.url";
    public static final String SECRET_ATTRIBUTE = "lockstep.secret";

    /** {@code Details.IMPERSONATOR_REALM}, {@code Details.IMPERSONATOR} and {@code Details.REASON}. */
    private static final String IMPERSONATOR_REALM = "impersonator_realm";
    private static final String IMPERSONATOR = "impersonator";
    private static final String REASON = "reason";

    private final KeycloakSession session;
    private final LockstepEventListenerProviderFactory factory;
    /** Events of this Keycloak session waiting for its transaction to commit. */
    private final List<Delivery> pending = new ArrayList<>();
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

    /** Resolves the realm's endpoint and key now, and queues the event after the commit. */
    private void submit(RealmModel realm, LockstepEvent event) {
        String url = LockstepEventListenerProviderFactory.blankToNull(realm.getAttribute(URL_ATTRIBUTE));
        String secret = LockstepEventListenerProviderFactory.blankToNull(realm.getAttribute(SECRET_ATTRIBUTE));
        if (url == null) {
            url = factory.defaultUrl();
        }
        if (secret == null) {
            secret = factory.defaultSecret();
        }
        if (url == null || secret == null) {
            if (factory.firstWarning(realm.getId())) {
                LOG.warnf("Lockstep event listener: realm %s has no %s; its events are not sent (set the realm "
                        + "attributes %s and %s, or the provider options url and secret)", realm.getName(),
                        url == null && secret == null ? "URL and no secret" : url == null ? "URL" : "secret",
                        URL_ATTRIBUTE, SECRET_ATTRIBUTE);
            }
            return;
        }
        Signer signer;
        URI endpoint;
        try {
            signer = Signer.of(secret);
            endpoint = endpoint(url, realm.getName());
        } catch (IllegalArgumentException e) {
            if (factory.firstWarning(realm.getId())) {
                LOG.warnf("Lockstep event listener: realm %s has an unusable Lockstep configuration (%s); its "
                        + "events are not sent", realm.getName(), e.getMessage());
            }
            return;
        }
        factory.clearWarning(realm.getId());
        pending.add(Delivery.of(event, endpoint, signer));
        enlist();
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

    private void enlist() {
        if (enlisted) {
            return;
        }
        KeycloakTransactionManager tm = session.getTransactionManager();
        if (tm == null || !tm.isActive()) {
            // No transaction to wait for (already completed): what was read is final.
            flush();
            return;
        }
        enlisted = true;
        tm.enlistAfterCompletion(new AbstractKeycloakTransaction() {
            @Override
            protected void commitImpl() {
                flush();
            }

            @Override
            protected void rollbackImpl() {
                if (!pending.isEmpty()) {
                    LOG.debugf("transaction rolled back: %d Lockstep events not sent", pending.size());
                }
                pending.clear();
                enlisted = false;
            }
        });
    }

    private void flush() {
        if (!pending.isEmpty()) {
            factory.sender().enqueue(new ArrayList<>(pending));
            pending.clear();
        }
        enlisted = false;
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
