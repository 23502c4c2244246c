-- Back-channel logout (issue 6): ids of logout tokens already used, kept for the replay
-- window and written in the transaction of the logout they caused.
CREATE TABLE logout_tokens (
    realm    TEXT    NOT NULL,
    jti      TEXT    NOT NULL,
    until_ms INTEGER NOT NULL,
    PRIMARY KEY (realm, jti)
);
CREATE INDEX logout_tokens_until_idx ON logout_tokens (until_ms);
