package org.lockstep.keycloak;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertNull;
import static org.junit.jupiter.api.Assertions.assertThrows;

import java.nio.charset.StandardCharsets;

import org.junit.jupiter.api.Test;

class MappingTest {

    @Test
    void adminEventsOfKeycloak2656() {
        assertEquals(new AdminAction("SESSION_DELETED", "s1"), AdminAction.of("DELETE", "USER_SESSION", "sessions/s1"));
        assertEquals(new AdminAction("USER_LOGOUT_ALL", "u1"), AdminAction.of("ACTION", "USER", "users/u1/logout"));
        assertEquals(new AdminAction("REALM_LOGOUT_ALL", null), AdminAction.of("ACTION", "REALM", "logout-all"));
        assertEquals(new AdminAction("USER_DELETED", "u1"), AdminAction.of("DELETE", "USER", "users/u1"));
        assertEquals(new AdminAction(AdminAction.USER_UPDATED, "u1"), AdminAction.of("UPDATE", "USER", "users/u1"));
        assertNull(AdminAction.of("CREATE", "USER", "users/u1"));
        assertNull(AdminAction.of("UPDATE", "USER", "users/u1/reset-password"));
        assertNull(AdminAction.of("DELETE", "USER", "users/u1/consents/portal"));
        assertNull(AdminAction.of("ACTION", "USER", "users/u1/impersonation"));
        assertNull(AdminAction.of("DELETE", "CLIENT", "clients/c1"));
        assertNull(AdminAction.of("UPDATE", "REALM", ""));
    }

    @Test
    void jsonOmitsAbsentFieldsAndEscapes() {
        LockstepEvent e = LockstepEvent.of("id-1", "LOGIN", "ac\"me", 1700000000123L)
                .withUser("u1").withSession("s1", 1700000360000L);
        assertEquals("{\"id\":\"id-1\",\"type\":\"LOGIN\",\"realm\":\"ac\\\"me\",\"time\":1700000000123,"
                + "\"userId\":\"u1\",\"sessionId\":\"s1\",\"sessionExpiresAt\":1700000360000}",
                new String(e.toJson(), StandardCharsets.UTF_8));
        LockstepEvent imp = LockstepEvent.of("i", "IMPERSONATE", "r", 1L).withImpersonator("a", "as", "master");
        assertEquals("{\"id\":\"i\",\"type\":\"IMPERSONATE\",\"realm\":\"r\",\"time\":1,\"impersonatorId\":\"a\","
                + "\"impersonatorSessionId\":\"as\",\"impersonatorRealm\":\"master\"}",
                new String(imp.toJson(), StandardCharsets.UTF_8));
        StringBuilder sb = new StringBuilder();
        LockstepEvent.quote(sb, "a\u0001\nb");
        assertEquals("\"a\\u0001\\nb\"", sb.toString());
    }

    @Test
    void endpointIsRealmScoped() {
        assertEquals("http://127.0.0.1:8080/realms/acme/events",
                LockstepEventListenerProvider.endpoint("http://127.0.0.1:8080/", "acme").toString());
        assertEquals("https://l.example/base/realms/my%20realm/events",
                LockstepEventListenerProvider.endpoint("https://l.example/base", "my realm").toString());
        assertThrows(IllegalArgumentException.class, () -> LockstepEventListenerProvider.endpoint("ftp://x", "a"));
        assertThrows(IllegalArgumentException.class, () -> LockstepEventListenerProvider.endpoint("not a url", "a"));
        assertEquals("acme", LockstepEventListenerProvider.realmOfIssuer("http://kc/realms/acme"));
    }
}
