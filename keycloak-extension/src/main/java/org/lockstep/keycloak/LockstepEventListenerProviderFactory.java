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
 * The {@code lockstep} event listener: one {@link Drainer} per server, one cheap
 * {@link LockstepEventListenerProvider} per Keycloak session.
 * <p>
 * Options ({@code --spi-events-listener--lockstep--<name>=...}, or
 * {@code KC_SPI_EVENTS_LISTENER__LOCKSTEP__<NAME>}): {@code url} (default for realms without
 * the attribute {@code lockstep.url}), {@code secret} (for realms without the vault key
 * {@code lockstep-secret}), {@code queue-capacity} (100000), {@code send-timeout-ms} (2000),
 * {@code max-age-ms} (24 h), {@code workers} (8), {@code poll-interval-ms} (1000).
 */
public class LockstepEventListenerProviderFactory implements EventListenerProviderFactory {

    public static final String ID = "lockstep";

    private static final Logger LOG = Logger.getLogger(LockstepEventListenerProviderFactory.class);
    private static final long DEFAULT_QUEUE_CAPACITY = 100_000;
    private static final long DEFAULT_SEND_TIMEOUT_MS = 2_000;
    private static final long DEFAULT_MAX_AGE_MS = 24L * 60 * 60 * 1000;
    private static final int DEFAULT_WORKERS = 8;
    private static final long DEFAULT_POLL_MS = 1_000;

    private String defaultUrl;
    private String defaultSecret;
    private Drainer.Options options;
    private Drainer drainer;
    private DrainerMetrics metrics;
    private KeycloakSecrets secrets;
    /** Realms already told (once) that they have no Lockstep URL or secret. */
    private final Set<String> warnedRealms = ConcurrentHashMap.newKeySet();
    /** Realms already told (once) that their attribute lockstep.secret is ignored. */
    private final Set<String> warnedAttribute = ConcurrentHashMap.newKeySet();

    @Override
    public EventListenerProvider create(KeycloakSession session) {
        return new LockstepEventListenerProvider(session, this);
    }

    @Override
    public void init(Config.Scope config) {
        defaultUrl = blankToNull(config.get("url"));
        defaultSecret = blankToNull(config.get("secret"));
        long capacity = config.getLong("queue-capacity", DEFAULT_QUEUE_CAPACITY);
        long sendTimeout = config.getLong("send-timeout-ms", DEFAULT_SEND_TIMEOUT_MS);
        long maxAge = config.getLong("max-age-ms", DEFAULT_MAX_AGE_MS);
        int workers = config.getInt("workers", DEFAULT_WORKERS);
        long poll = config.getLong("poll-interval-ms", DEFAULT_POLL_MS);
        if (capacity < 1 || sendTimeout < 1 || maxAge < 1 || workers < 1 || poll < 1) {
            throw new IllegalArgumentException("lockstep event listener: queue-capacity, send-timeout-ms, "
                    + "max-age-ms, workers and poll-interval-ms must be positive");
        }
        options = Drainer.Options.defaults(Duration.ofMillis(sendTimeout), Duration.ofMillis(maxAge), capacity,
                workers, Duration.ofMillis(poll));
        LOG.infof("Lockstep event listener: default url %s, default secret %s, queue-capacity %d, "
                + "send-timeout-ms %d, max-age-ms %d, workers %d, poll-interval-ms %d",
                defaultUrl == null ? "(none)" : defaultUrl, defaultSecret == null ? "(none)" : "(set)", capacity,
                sendTimeout, maxAge, workers, poll);
    }

    @Override
    public void postInit(KeycloakSessionFactory factory) {
        secrets = new KeycloakSecrets(factory, defaultSecret);
        drainer = new Drainer(new SqlOutbox(JpaDb.transactions(factory)), secrets, options);
        metrics = DrainerMetrics.register(drainer);
        drainer.start();
    }

    @Override
    public void close() {
        if (drainer != null) {
            drainer.stop(Duration.ofSeconds(5));
        }
        if (metrics != null) {
            metrics.close();
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
                .helpText("Signing secret (whsec_<base64> or plain) for realms without the vault key "
                        + "lockstep-secret").add()
                .property().name("queue-capacity").type(ProviderConfigProperty.INTEGER_TYPE)
                .defaultValue(DEFAULT_QUEUE_CAPACITY)
                .helpText("Events kept in the database table; beyond it the oldest are dropped").add()
                .property().name("send-timeout-ms").type(ProviderConfigProperty.INTEGER_TYPE)
                .defaultValue(DEFAULT_SEND_TIMEOUT_MS)
                .helpText("Bound on a whole delivery attempt: connect, request and response status").add()
                .property().name("max-age-ms").type(ProviderConfigProperty.INTEGER_TYPE)
                .defaultValue(DEFAULT_MAX_AGE_MS)
                .helpText("Events not delivered this long after they happened are dropped").add()
                .property().name("workers").type(ProviderConfigProperty.INTEGER_TYPE)
                .defaultValue(DEFAULT_WORKERS)
                .helpText("Realms sent to at the same time by this node").add()
                .property().name("poll-interval-ms").type(ProviderConfigProperty.INTEGER_TYPE)
                .defaultValue(DEFAULT_POLL_MS)
                .helpText("How often the table is looked at for events of other nodes and retries").add()
                .build();
    }

    Drainer drainer() {
        return drainer;
    }

    KeycloakSecrets secrets() {
        return secrets;
    }

    String defaultUrl() {
        return defaultUrl;
    }

    /** True the first time it is called for a realm id. */
    boolean firstWarning(String realmId) {
        return warnedRealms.add(realmId);
    }

    /** True the first time a realm is found with the attribute lockstep.secret. */
    boolean firstAttributeWarning(String realmId) {
        return warnedAttribute.add(realmId);
    }

    /** Forgets the warnings, so a realm fixed and broken again is reported again. */
    void clearWarning(String realmId) {
        warnedRealms.remove(realmId);
    }

    static String blankToNull(String s) {
        return s == null || s.isBlank() ? null : s.trim();
    }
}
