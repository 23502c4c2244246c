package org.lockstep.keycloak;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;

import java.nio.charset.StandardCharsets;

import org.junit.jupiter.api.Test;

class SignerTest {

    /**
     * The Standard Webhooks example, checked independently with
     * {@code openssl dgst -sha256 -mac HMAC -macopt hexkey:<base64-decoded key> -binary | base64}.
     */
    @Test
    void whsecSecretIsBase64DecodedKey() {
        Signer signer = Signer.of("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
        byte[] body = "{\"test\": 2432232314}".getBytes(StandardCharsets.UTF_8);
        assertEquals("v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
                signer.sign("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330L, body));
    }

    /** {@code printf '%s' 'evt-1.1700000000.{"id":"evt-1"}' | openssl dgst -sha256 -hmac plain-secret -binary | base64} */
    @Test
    void plainSecretIsUtf8Key() {
        Signer signer = Signer.of("plain-secret");
        byte[] body = "{\"id\":\"evt-1\"}".getBytes(StandardCharsets.UTF_8);
        assertEquals("v1,ZGgqdDH4ZIoMb/H0e8NjIr+WzDCFTsrmikju9YVZRPA=", signer.sign("evt-1", 1700000000L, body));
    }

    @Test
    void badSecretsAreRefusedWithoutEchoingThem() {
        IllegalArgumentException e = assertThrows(IllegalArgumentException.class, () -> Signer.of("whsec_%%%not-base64"));
        assertEquals(false, e.getMessage().contains("not-base64"));
        assertThrows(IllegalArgumentException.class, () -> Signer.of(""));
        assertThrows(IllegalArgumentException.class, () -> Signer.of("whsec_"));
    }
}
