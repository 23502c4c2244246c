package org.lockstep.keycloak;

import java.nio.charset.StandardCharsets;

/**
 * One event of the wire contract with Lockstep: the JSON body of
 * {@code POST {url}/realms/{realm}/events}. Absent (null) fields are omitted.
 *
 * @param id                    Keycloak's event id; the {@code webhook-id} of every attempt
 * @param type                  LOGIN, CODE_TO_TOKEN, ... (see the README)
 * @param realm                 realm name
 * @param time                  event time, epoch ms
 * @param sessionExpiresAt      epoch ms when the user session expires, or null
 */
public record LockstepEvent(
        String id,
        String type,
        String realm,
        long time,
        String userId,
        String sessionId,
        String clientId,
        Long sessionExpiresAt,
        String impersonatorId,
        String impersonatorSessionId,
        String impersonatorRealm) {

    /** An event with only the common fields set. */
    public static LockstepEvent of(String id, String type, String realm, long time) {
        return new LockstepEvent(id, type, realm, time, null, null, null, null, null, null, null);
    }

    public LockstepEvent withUser(String userId) {
        return new LockstepEvent(id, type, realm, time, userId, sessionId, clientId, sessionExpiresAt,
                impersonatorId, impersonatorSessionId, impersonatorRealm);
    }

    public LockstepEvent withSession(String sessionId, Long sessionExpiresAt) {
        return new LockstepEvent(id, type, realm, time, userId, sessionId, clientId, sessionExpiresAt,
                impersonatorId, impersonatorSessionId, impersonatorRealm);
    }

    public LockstepEvent withClient(String clientId) {
        return new LockstepEvent(id, type, realm, time, userId, sessionId, clientId, sessionExpiresAt,
                impersonatorId, impersonatorSessionId, impersonatorRealm);
    }

    public LockstepEvent withImpersonator(String id, String sessionId, String realm) {
        return new LockstepEvent(this.id, type, this.realm, time, userId, this.sessionId, clientId,
                sessionExpiresAt, id, sessionId, realm);
    }

    /** The JSON body, UTF-8, fields in contract order. */
    public byte[] toJson() {
        StringBuilder out = new StringBuilder(256).append('{');
        field(out, "id", id);
        field(out, "type", type);
        field(out, "realm", realm);
        out.append(",\"time\":").append(time);
        field(out, "userId", userId);
        field(out, "sessionId", sessionId);
        field(out, "clientId", clientId);
        if (sessionExpiresAt != null) {
            out.append(",\"sessionExpiresAt\":").append(sessionExpiresAt.longValue());
        }
        field(out, "impersonatorId", impersonatorId);
        field(out, "impersonatorSessionId", impersonatorSessionId);
        field(out, "impersonatorRealm", impersonatorRealm);
        return out.append('}').toString().getBytes(StandardCharsets.UTF_8);
    }

    private static void field(StringBuilder out, String name, String value) {
        if (value == null) {
            return;
        }
        if (out.length() > 1) {
            out.append(',');
        }
        out.append('"').append(name).append("\":");
        quote(out, value);
    }

    /** A JSON string literal (RFC 8259: quote, backslash and control characters escaped). */
    static void quote(StringBuilder out, String s) {
        out.append('"');
        for (int i = 0; i < s.length(); i++) {
            char c = s.charAt(i);
            switch (c) {
                case '"' -> out.append("\\\"");
                case '\\' -> out.append("\\\\");
                case '\n' -> out.append("\\n");
                case '\r' -> out.append("\\r");
                case '\t' -> out.append("\\t");
                case '\b' -> out.append("\\b");
                case '\f' -> out.append("\\f");
                default -> {
                    if (c < 0x20) {
                        out.append(String.format("\\u%04x", (int) c));
                    } else {
                        out.append(c);
                    }
                }
            }
        }
        out.append('"');
    }
}
