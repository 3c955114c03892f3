-- One row per Infobip event. The first five columns are the seed's, under its names.
CREATE TABLE email_callback (
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
    dedupe_key       TEXT     NOT NULL UNIQUE
);
CREATE INDEX email_callback_id_externo ON email_callback (id_externo);
CREATE INDEX email_callback_qj_contact_id ON email_callback (qj_contact_id);
