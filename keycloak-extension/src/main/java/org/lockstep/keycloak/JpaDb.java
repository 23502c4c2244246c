package org.lockstep.keycloak;

import java.util.ArrayList;
import java.util.List;
import java.util.function.Function;

import jakarta.persistence.EntityManager;
import jakarta.persistence.Query;

import org.keycloak.connections.jpa.JpaConnectionProvider;
import org.keycloak.models.KeycloakSessionFactory;
import org.keycloak.models.utils.KeycloakModelUtils;

/** {@link Db} over the entity manager of a Keycloak session: Keycloak's own database and pool. */
final class JpaDb implements Db {

    private final EntityManager em;

    JpaDb(EntityManager em) {
        this.em = em;
    }

    /** Each {@link Db.Tx#run} is one Keycloak job transaction of its own session. */
    static Db.Tx transactions(KeycloakSessionFactory factory) {
        return new Db.Tx() {
            @Override
            public <T> T run(Function<Db, T> work) {
                return KeycloakModelUtils.runJobInTransactionWithResult(factory, session -> work.apply(
                        new JpaDb(session.getProvider(JpaConnectionProvider.class).getEntityManager())));
            }
        };
    }

    @Override
    public int update(String sql, Object... params) {
        return bind(em.createNativeQuery(ordinal(sql)), params).executeUpdate();
    }

    @Override
    public List<Object[]> query(String sql, int maxRows, Object... params) {
        Query q = bind(em.createNativeQuery(ordinal(sql)), params);
        if (maxRows > 0) {
            q.setMaxResults(maxRows);
        }
        List<?> rows = q.getResultList();
        List<Object[]> out = new ArrayList<>(rows.size());
        for (Object row : rows) {
            // A one-column native query yields the value itself, not a one-element array.
            out.add(row instanceof Object[] columns ? columns : new Object[] {row});
        }
        return out;
    }

    private static Query bind(Query q, Object[] params) {
        for (int i = 0; i < params.length; i++) {
            q.setParameter(i + 1, params[i]);
        }
        return q;
    }

    /** {@code ?} → {@code ?1, ?2, ...}: JPA defines only numbered positional parameters. */
    static String ordinal(String sql) {
        StringBuilder out = new StringBuilder(sql.length() + 8);
        int n = 0;
        for (int i = 0; i < sql.length(); i++) {
            char c = sql.charAt(i);
            out.append(c);
            if (c == '?') {
                out.append(++n);
            }
        }
        return out.toString();
    }
}
