package org.lockstep.keycloak;

import static org.junit.jupiter.api.Assumptions.assumeTrue;

import java.net.URI;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.ArrayList;
import java.util.List;
import java.util.UUID;
import java.util.function.Function;

/**
 * A schema of its own in the test PostgreSQL ({@code LOCKSTEP_TEST_DATABASE_URL}, as
 * {@code scripts/test.sh} sets it: {@code postgres://user[:password]@host:port/db}), with the
 * {@code LOCKSTEP_EVENT} table of the changelog. Tests that need it are skipped, saying why,
 * when the variable is unset.
 */
final class Pg implements AutoCloseable {

    static final String ENV = "LOCKSTEP_TEST_DATABASE_URL";

    /** The changelog's table in PostgreSQL types (ChangelogTest checks the column names). */
    static final String DDL = "CREATE TABLE LOCKSTEP_EVENT (ID VARCHAR(36) PRIMARY KEY, LANE VARCHAR(36) NOT NULL, "
            + "SEQ BIGINT NOT NULL, EVENT_ID VARCHAR(255) NOT NULL, EVENT_TYPE VARCHAR(64) NOT NULL, "
            + "REALM_NAME VARCHAR(255) NOT NULL, ENDPOINT VARCHAR(2048) NOT NULL, BODY VARCHAR(4000) NOT NULL, "
            + "CREATED_AT BIGINT NOT NULL, ATTEMPTS INT DEFAULT 0 NOT NULL, NEXT_ATTEMPT_AT BIGINT DEFAULT 0 NOT NULL, "
            + "LEASE_OWNER VARCHAR(64), LEASE_UNTIL BIGINT DEFAULT 0 NOT NULL, LAST_ERROR VARCHAR(255))";

    private final java.util.Queue<Connection> idle = new java.util.concurrent.ConcurrentLinkedQueue<>();
    private final java.util.Queue<Connection> all = new java.util.concurrent.ConcurrentLinkedQueue<>();
    private final String jdbcUrl;
    private final String adminUrl;
    private final String schema;

    private Pg(String adminUrl, String schema) {
        this.adminUrl = adminUrl;
        this.schema = schema;
        this.jdbcUrl = adminUrl + (adminUrl.contains("?") ? "&" : "?") + "currentSchema=" + schema;
    }

    /** A fresh schema with the table; the calling test is skipped without a database. */
    static Pg open() throws SQLException {
        String url = System.getenv(ENV);
        assumeTrue(url != null && !url.isBlank(), ENV + " is not set: the outbox tests against PostgreSQL are "
                + "skipped (scripts/test.sh sets it; or `bash scripts/pg.sh start` and export "
                + ENV + "=$(bash scripts/pg.sh url))");
        Pg pg = new Pg(jdbc(url), "lockstep_junit_" + UUID.randomUUID().toString().replace("-", "").substring(0, 12));
        try (Connection c = DriverManager.getConnection(pg.adminUrl); Statement s = c.createStatement()) {
            s.execute("CREATE SCHEMA " + pg.schema);
            s.execute("SET search_path TO " + pg.schema);
            s.execute(DDL);
            s.execute("CREATE INDEX IDX_LOCKSTEP_EVENT_LANE ON LOCKSTEP_EVENT (LANE, SEQ)");
        }
        return pg;
    }

    /** {@code postgres://user:pw@host:port/db} → a JDBC URL with user and password parameters. */
    static String jdbc(String url) {
        URI u = URI.create(url.trim());
        StringBuilder out = new StringBuilder("jdbc:postgresql://").append(u.getHost());
        if (u.getPort() > 0) {
            out.append(':').append(u.getPort());
        }
        out.append(u.getPath() == null || u.getPath().isEmpty() ? "/postgres" : u.getPath());
        String info = u.getUserInfo();
        if (info != null) {
            int colon = info.indexOf(':');
            out.append("?user=").append(colon < 0 ? info : info.substring(0, colon));
            if (colon >= 0) {
                out.append("&password=").append(info.substring(colon + 1));
            }
        }
        return out.toString();
    }

    /**
     * Transactions on pooled JDBC connections, as Keycloak's job transactions are (a new
     * connection per transaction costs tens of milliseconds on a busy machine).
     */
    Db.Tx tx() {
        return new Db.Tx() {
            @Override
            public <T> T run(Function<Db, T> work) {
                Connection c = idle.poll();
                try {
                    if (c == null) {
                        c = DriverManager.getConnection(jdbcUrl);
                        c.setAutoCommit(false);
                        all.add(c);
                    }
                    try {
                        T result = work.apply(new JdbcDb(c));
                        c.commit();
                        return result;
                    } catch (RuntimeException e) {
                        c.rollback();
                        throw e;
                    } finally {
                        idle.add(c);
                    }
                } catch (SQLException e) {
                    throw new IllegalStateException(e);
                }
            }
        };
    }

    /** Inserts a row as the extension's entity would. */
    void insert(String lane, String eventId, String endpoint, long createdAt) {
        tx().run(db -> db.update("INSERT INTO LOCKSTEP_EVENT (ID, LANE, SEQ, EVENT_ID, EVENT_TYPE, REALM_NAME, "
                + "ENDPOINT, BODY, CREATED_AT) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", UUID.randomUUID().toString(), lane,
                OutboxEntity.nextSeq(), eventId, "LOGIN", lane, endpoint,
                new String(LockstepEvent.of(eventId, "LOGIN", lane, createdAt).toJson(),
                        java.nio.charset.StandardCharsets.UTF_8), createdAt));
    }

    long count() {
        return ((Number) tx().run(db -> db.query("SELECT COUNT(*) FROM LOCKSTEP_EVENT", 1)).get(0)[0]).longValue();
    }

    @Override
    public void close() throws SQLException {
        for (Connection c : all) {
            c.close();
        }
        try (Connection c = DriverManager.getConnection(adminUrl); Statement s = c.createStatement()) {
            s.execute("DROP SCHEMA " + schema + " CASCADE");
        }
    }

    /** {@link Db} over one JDBC connection. */
    static final class JdbcDb implements Db {
        private final Connection c;

        JdbcDb(Connection c) {
            this.c = c;
        }

        @Override
        public int update(String sql, Object... params) {
            try (PreparedStatement ps = c.prepareStatement(sql)) {
                bind(ps, params);
                return ps.executeUpdate();
            } catch (SQLException e) {
                throw new IllegalStateException(e);
            }
        }

        @Override
        public List<Object[]> query(String sql, int maxRows, Object... params) {
            try (PreparedStatement ps = c.prepareStatement(sql)) {
                bind(ps, params);
                ps.setMaxRows(maxRows);
                List<Object[]> out = new ArrayList<>();
                try (ResultSet rs = ps.executeQuery()) {
                    int n = rs.getMetaData().getColumnCount();
                    while (rs.next()) {
                        Object[] row = new Object[n];
                        for (int i = 0; i < n; i++) {
                            row[i] = rs.getObject(i + 1);
                        }
                        out.add(row);
                    }
                }
                return out;
            } catch (SQLException e) {
                throw new IllegalStateException(e);
            }
        }

        private static void bind(PreparedStatement ps, Object[] params) throws SQLException {
            for (int i = 0; i < params.length; i++) {
                ps.setObject(i + 1, params[i]);
            }
        }
    }
}
