package org.lockstep.keycloak;

import java.time.Duration;
import java.util.List;
import java.util.Set;
import java.util.concurrent.ConcurrentHashMap;

import org.jboss.logging.Logger;
import org.keycloak.Config;
import org.keycloak.events.EventListenerProvider;
import org.keycloak.events.EventListenerProviderFactory;
import org.keycloak.models.KeycloakSession;
import org.keycloak.models.KeycloakSessionFactory;
import org.keycloak.provider.ProviderConfigProperty;
import org.keycloak.provider.ProviderConfigurationBuilder;

/**
 * The {@code lockstep} event listener: one {@link Sender} (queue and thread) per server, one
 * cheap {@link LockstepEventListenerProvider} per Keycloak session.
 * <p>
 * Options ({@code --spi-events-listener--lockstep--<name>=...}, or
 * {@code KC_SPI_EVENTS_LISTENER__LOCKSTEP__<NAME>}): {@code url}, {@code secret} (defaults for
 * realms without the attributes {@code lockstep.url} / {@code lockstep.secret}),
 * {@code queue-capacity} (10000), {@code send-timeout-ms} (2000), {@code max-age-ms} (24 h).
 */
public class LockstepEventListenerProviderFactory implements EventListenerProviderFactory {

    public static final String ID = "lockstep";

    private static final Logger LOG = Logger.getLogger(LockstepEventListenerProviderFactory.class);
    private static final int DEFAULT_QUEUE_CAPACITY = 10_000;
    private static final long DEFAULT_SEND_TIMEOUT_MS = 2_000;
    private static final long DEFAULT_MAX_AGE_MS = 24L * 60 * 60 * 1000;

    private String defaultUrl;
    private String defaultSecret;
    private Sender sender;
    /** Realms already told (once) that they have no Lockstep URL or secret. */
    private final Set<String> warnedRealms = ConcurrentHashMap.newKeySet();

    @Override
    public EventListenerProvider create(KeycloakSession session) {
        return new LockstepEventListenerProvider(session, this);
    }

    @Override
    public void init(Config.Scope config) {
        defaultUrl = blankToNull(config.get("url"));
        defaultSecret = blankToNull(config.get("secret"));
        int capacity = config.getInt("queue-capacity", DEFAULT_QUEUE_CAPACITY);
        long sendTimeout = config.getLong("send-timeout-ms", DEFAULT_SEND_TIMEOUT_MS);
        long maxAge = config.getLong("max-age-ms", DEFAULT_MAX_AGE_MS);
        if (capacity < 1 || sendTimeout < 1 || maxAge < 1) {
            throw new IllegalArgumentException("lockstep event listener: queue-capacity, send-timeout-ms and "
                    + "max-age-ms must be positive");
        }
        sender = new Sender(capacity, Duration.ofMillis(sendTimeout), Duration.ofMillis(maxAge));
        LOG.infof("Lockstep event listener: default url %s, default secret %s, queue-capacity %d, "
                + "send-timeout-ms %d, max-age-ms %d", defaultUrl == null ? "(none)" : defaultUrl,
                defaultSecret == null ? "(none)" : "(set)", capacity, sendTimeout, maxAge);
    }

    @Override
    public void postInit(KeycloakSessionFactory factory) {
        sender.start();
    }

    @Override
    public void close() {
        if (sender != null) {
            sender.stop(Duration.ofSeconds(5));
        }
    }

    @Override
    public String getId() {
        return ID;
    }

    @Override
    public List<ProviderConfigProperty> getConfigMetadata() {
        return ProviderConfigurationBuilder.create()
                .property().name("url").type(ProviderConfigProperty.STRING_TYPE)
                .helpText("Lockstep base URL for realms without the attribute lockstep.url").add()
                .property().name("secret").type(ProviderConfigProperty.PASSWORD)
                .helpText("Signing secret (whsec_<base64> or plain) for realms without lockstep.secret").add()
                .property().name("queue-capacity").type(ProviderConfigProperty.INTEGER_TYPE)
                .defaultValue(DEFAULT_QUEUE_CAPACITY)
                .helpText("Events held in memory; when full the oldest is dropped").add()
                .property().name("send-timeout-ms").type(ProviderConfigProperty.INTEGER_TYPE)
                .defaultValue(DEFAULT_SEND_TIMEOUT_MS)
                .helpText("Connect and request timeout of each delivery attempt").add()
                .property().name("max-age-ms").type(ProviderConfigProperty.INTEGER_TYPE)
                .defaultValue(DEFAULT_MAX_AGE_MS)
                .helpText("Retries of an event stop this long after it was queued").add()
                .build();
    }

    Sender sender() {
        return sender;
    }

    String defaultUrl() {
        return defaultUrl;
    }

    String defaultSecret() {
        return defaultSecret;
    }

    /** True the first time it is called for a realm id. */
    boolean firstWarning(String realmId) {
        return warnedRealms.add(realmId);
    }

    /** Forgets the warnings, so a realm fixed and broken again is reported again. */
    void clearWarning(String realmId) {
        warnedRealms.remove(realmId);
    }

    static String blankToNull(String s) {
        return s == null || s.isBlank() ? null : s.trim();
    }
}
