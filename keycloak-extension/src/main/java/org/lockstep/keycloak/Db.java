package org.lockstep.keycloak;

import java.util.List;

/**
 * The few SQL operations the outbox needs, inside one transaction. Keycloak runs them as JPA
 * native queries in its own database ({@link JpaDb}); the claim tests run the same statements
 * over JDBC against PostgreSQL. Statements use {@code ?} placeholders and only portable SQL:
 * row limits go through {@code maxRows}, so each database's dialect writes its own LIMIT.
 */
interface Db {

    /** Runs an INSERT, UPDATE or DELETE; returns the number of rows it changed. */
    int update(String sql, Object... params);

    /** Runs a SELECT and returns at most {@code maxRows} rows (0: all), each as its columns. */
    List<Object[]> query(String sql, int maxRows, Object... params);

    /** Runs work against a {@link Db} in one transaction, committed when it returns normally. */
    interface Tx {
        <T> T run(java.util.function.Function<Db, T> work);
    }
}
