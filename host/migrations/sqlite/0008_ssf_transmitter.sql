-- Lockstep as a Shared Signals transmitter. Signing keys are shared by every instance of one
-- database: the first instance to start without a usable key generates one, a rotation
-- retires the current key of an algorithm (it stays published until `retired_at` plus the
-- overlap) and a new one signs from then on. Private keys never leave this table except to
-- sign.
CREATE TABLE ssf_signing_keys (
    kid         TEXT    PRIMARY KEY,
    alg         TEXT    NOT NULL CHECK (alg IN ('ES256', 'RS256')),
    private_der BLOB   NOT NULL,
    public_jwk  TEXT    NOT NULL,
    created_at  INTEGER NOT NULL,
    retired_at  INTEGER
);

-- Receiver streams, per realm. `config` is the stream as JSON (delivery, events, status,
-- subjects, a verification SET waiting for a poll); the stream's deliveries are rows of
-- `deliveries` whose target (`connector`) is `ssf:<stream_id>`.
CREATE TABLE ssf_streams (
    stream_id  TEXT    PRIMARY KEY,
    realm      TEXT    NOT NULL,
    config     TEXT    NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE INDEX ssf_streams_realm_idx ON ssf_streams (realm, created_at);
