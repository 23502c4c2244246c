package org.lockstep.keycloak;

import java.nio.charset.StandardCharsets;
import java.security.InvalidKeyException;
import java.security.NoSuchAlgorithmException;
import java.util.Base64;

import javax.crypto.Mac;
import javax.crypto.spec.SecretKeySpec;

/**
 * Standard Webhooks signatures: {@code v1,base64(HMAC-SHA256(key, "{id}.{timestamp}.{body}"))}.
 * The key of a secret starting with {@code whsec_} is the base64 decoding of the rest; any
 * other secret is used as its UTF-8 bytes.
 */
public final class Signer {

    private static final String PREFIX = "whsec_";
    private static final String ALGORITHM = "HmacSHA256";

    private final byte[] key;

    private Signer(byte[] key) {
        this.key = key;
    }

    /**
     * The signer of a configured secret.
     *
     * @throws IllegalArgumentException when the secret is empty, or a {@code whsec_} secret is
     *                                  not valid base64 (the message never contains the secret)
     */
    public static Signer of(String secret) {
        if (secret == null || secret.isEmpty()) {
            throw new IllegalArgumentException("the secret is empty");
        }
        byte[] key;
        if (secret.startsWith(PREFIX)) {
            try {
                key = Base64.getDecoder().decode(secret.substring(PREFIX.length()));
            } catch (IllegalArgumentException e) {
                throw new IllegalArgumentException("a whsec_ secret must be base64 after the prefix");
            }
        } else {
            key = secret.getBytes(StandardCharsets.UTF_8);
        }
        if (key.length == 0) {
            throw new IllegalArgumentException("the secret's key is empty");
        }
        return new Signer(key);
    }

    /** The {@code webhook-signature} header value of one attempt. */
    public String sign(String id, long timestamp, byte[] body) {
        try {
            Mac mac = Mac.getInstance(ALGORITHM);
            mac.init(new SecretKeySpec(key, ALGORITHM));
            mac.update((id + "." + timestamp + ".").getBytes(StandardCharsets.UTF_8));
            mac.update(body);
            return "v1," + Base64.getEncoder().encodeToString(mac.doFinal());
        } catch (NoSuchAlgorithmException | InvalidKeyException e) {
            // Every Java SE runtime provides HmacSHA256, and a non-empty key is always valid.
            throw new IllegalStateException("HmacSHA256 unavailable", e);
        }
    }
}
