-- One unique index on (id_externo, dedupe_key) replaces UNIQUE (dedupe_key) plus the index on
-- id_externo: it serves lookups by id_externo (its prefix) and deduplication alike, and every
-- insert now updates one index ordered by message id instead of also one ordered by a random
-- hash. The dedupe key hashes the message id (or Infobip's eventId, unique per event), so
-- uniqueness is unchanged.
ALTER TABLE email_callback
    ADD UNIQUE KEY email_callback_id_externo_dedupe_key (id_externo(191), dedupe_key),
    DROP INDEX email_callback_dedupe_key,
    DROP INDEX email_callback_id_externo;
