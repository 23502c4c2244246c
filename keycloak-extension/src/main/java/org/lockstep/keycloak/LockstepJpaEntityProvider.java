package org.lockstep.keycloak;

import java.util.List;

import org.keycloak.connections.jpa.entityprovider.JpaEntityProvider;

/** Adds the {@code LOCKSTEP_EVENT} table (entity and Liquibase changelog) to Keycloak's database. */
public class LockstepJpaEntityProvider implements JpaEntityProvider {

    static final String CHANGELOG = "META-INF/lockstep-changelog.xml";

    @Override
    @SuppressWarnings("removal")
    public List<Class<?>> getEntities() {
        return List.of(OutboxEntity.class);
    }

    @Override
    public String getChangelogLocation() {
        return CHANGELOG;
    }

    @Override
    public String getFactoryId() {
        return LockstepJpaEntityProviderFactory.ID;
    }

    @Override
    public void close() {
    }
}
