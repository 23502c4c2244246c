package org.lockstep.keycloak;

import java.util.ArrayList;
import java.util.List;

import io.micrometer.core.instrument.FunctionCounter;
import io.micrometer.core.instrument.Gauge;
import io.micrometer.core.instrument.Meter;
import io.micrometer.core.instrument.Metrics;

import org.jboss.logging.Logger;

/**
 * The drainer's meters in Micrometer's global registry, which Keycloak's {@code /metrics}
 * (management interface, {@code --metrics-enabled=true}) exports:
 * {@code lockstep_events_waiting}, {@code lockstep_events_delivered_total},
 * {@code lockstep_events_dropped_total{reason=rejected|expired|overflow}} and
 * {@code lockstep_events_attempts_total}.
 */
final class DrainerMetrics {

    private static final Logger LOG = Logger.getLogger(DrainerMetrics.class);

    private final List<Meter> meters = new ArrayList<>();

    private DrainerMetrics() {
    }

    static DrainerMetrics register(Drainer d) {
        DrainerMetrics m = new DrainerMetrics();
        try {
            m.meters.add(Gauge.builder("lockstep.events.waiting", d, Drainer::waiting)
                    .description("Lockstep events in Keycloak's database not yet delivered (all nodes)")
                    .register(Metrics.globalRegistry));
            m.meters.add(FunctionCounter.builder("lockstep.events.delivered", d, Drainer::delivered)
                    .description("Lockstep events this node delivered").register(Metrics.globalRegistry));
            m.meters.add(FunctionCounter.builder("lockstep.events.attempts", d, Drainer::attempts)
                    .description("Delivery attempts of this node").register(Metrics.globalRegistry));
            m.meters.add(FunctionCounter.builder("lockstep.events.dropped", d, Drainer::droppedRejected)
                    .tag("reason", "rejected").description("Lockstep events dropped by this node")
                    .register(Metrics.globalRegistry));
            m.meters.add(FunctionCounter.builder("lockstep.events.dropped", d, Drainer::droppedExpired)
                    .tag("reason", "expired").description("Lockstep events dropped by this node")
                    .register(Metrics.globalRegistry));
            m.meters.add(FunctionCounter.builder("lockstep.events.dropped", d, Drainer::droppedOverflow)
                    .tag("reason", "overflow").description("Lockstep events dropped by this node")
                    .register(Metrics.globalRegistry));
        } catch (LinkageError e) {
            // A Keycloak without Micrometer: the counts still reach the log.
            LOG.infof("Lockstep event listener: no Micrometer (%s); metrics not registered", e.toString());
        }
        return m;
    }

    void close() {
        try {
            for (Meter meter : meters) {
                Metrics.globalRegistry.remove(meter);
            }
        } catch (LinkageError e) {
            // Nothing was registered.
        }
        meters.clear();
    }
}
