-- One unique index on (id_externo, dedupe_key) replaces UNIQUE (dedupe_key) plus the index on
-- id_externo: it serves lookups by id_externo (its prefix) and deduplication alike, and every
-- insert now updates one index ordered by message id instead of also one ordered by a random
-- hash (measured: the random-hash index doubled the worker's time per event). The dedupe key
-- hashes the message id (or Infobip's eventId, unique per event), so uniqueness is unchanged.
-- SQLite cannot drop a column's UNIQUE constraint in place: the table is rebuilt, ids kept.
CREATE TABLE email_callback_new (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    status           TEXT     NOT NULL,
    email            TEXT,
    data_recebimento DATETIME NOT NULL,
    id_externo       TEXT     NOT NULL,
    qj_contact_id    BIGINT,
    event_at         DATETIME,
    status_name      TEXT,
    error_name       TEXT,
    error_permanent  BOOLEAN,
    bulk_id          TEXT,
    event_id         TEXT,
    url              TEXT,
    country          TEXT,
    city             TEXT,
    callback_data    TEXT,
    raw              TEXT     NOT NULL,
    dedupe_key       TEXT     NOT NULL
);
INSERT INTO email_callback_new SELECT * FROM email_callback;
-- Keep AUTOINCREMENT's high-water mark, so ids of deleted rows are never reused.
INSERT INTO sqlite_sequence (name, seq)
    SELECT 'email_callback_new', seq FROM sqlite_sequence WHERE name = 'email_callback';
DROP TABLE email_callback;
ALTER TABLE email_callback_new RENAME TO email_callback;
CREATE UNIQUE INDEX email_callback_id_externo_dedupe_key ON email_callback (id_externo, dedupe_key);
CREATE INDEX email_callback_qj_contact_id ON email_callback (qj_contact_id);
