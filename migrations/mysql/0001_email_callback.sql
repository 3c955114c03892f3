-- One row per Infobip event. The first five columns are the seed's, under its names.
-- MySQL/MariaDB cannot index TEXT whole: id_externo is indexed on a prefix, dedupe_key is a hash.
-- A binary collation would make sqlx read TEXT as BLOB, hence unicode_ci (lookups by id_externo
-- ignore case there; Infobip ids are lowercase).
CREATE TABLE email_callback (
    id               BIGINT      NOT NULL AUTO_INCREMENT PRIMARY KEY,
    status           TEXT        NOT NULL,
    email            TEXT,
    data_recebimento DATETIME(6) NOT NULL,
    id_externo       TEXT        NOT NULL,
    qj_contact_id    BIGINT,
    event_at         DATETIME(6),
    status_name      TEXT,
    error_name       TEXT,
    error_permanent  BOOLEAN,
    bulk_id          TEXT,
    event_id         TEXT,
    url              MEDIUMTEXT,
    country          TEXT,
    city             TEXT,
    callback_data    JSON,
    raw              JSON        NOT NULL,
    dedupe_key       CHAR(64)    NOT NULL,
    UNIQUE KEY email_callback_dedupe_key (dedupe_key),
    KEY email_callback_id_externo (id_externo(191)),
    KEY email_callback_qj_contact_id (qj_contact_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_unicode_ci;
