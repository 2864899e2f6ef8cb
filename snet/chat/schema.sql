-- The chat service's tables (MySQL 8 / MariaDB 10.11+). Applied at start-up by every
-- instance under a MySQL user lock (snet.storage.apply_schema): statements must stay
-- idempotent (IF NOT EXISTS) and keep ';' out of strings and comments.

-- One row per message. A dialog is the unordered pair of its two users, stored as
-- (dialog_low, dialog_high) so that both directions list through one index in id order.
-- (sender_id, idempotency_key) is unique: a retried send is stored once.
CREATE TABLE IF NOT EXISTS chat_messages (
    id BIGINT NOT NULL AUTO_INCREMENT,
    sender_id BIGINT UNSIGNED NOT NULL,
    recipient_id BIGINT UNSIGNED NOT NULL,
    dialog_low BIGINT UNSIGNED NOT NULL,
    dialog_high BIGINT UNSIGNED NOT NULL,
    text VARCHAR(4096) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    idempotency_key VARCHAR(128) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    created_at DATETIME(6) NOT NULL COMMENT 'UTC',
    PRIMARY KEY (id),
    UNIQUE KEY uq_chat_messages_sender_key (sender_id, idempotency_key),
    KEY ix_chat_messages_dialog (dialog_low, dialog_high, id),
    KEY ix_chat_messages_unread (recipient_id, sender_id, id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- How far each reader has read each dialog: messages from peer_id to reader_id with an
-- id above last_read_id are unread. last_read_id only ever grows.
CREATE TABLE IF NOT EXISTS chat_reads (
    reader_id BIGINT UNSIGNED NOT NULL,
    peer_id BIGINT UNSIGNED NOT NULL,
    last_read_id BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (reader_id, peer_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- Dialogs whose unread counters in Redis may have missed an update (Redis failed or stalled
-- after a message was committed, or after a read). Every instance settles them from the two
-- tables above and deletes the rows (snet.chat.unread.UnreadRepairs).
CREATE TABLE IF NOT EXISTS chat_unread_repairs (
    id BIGINT NOT NULL AUTO_INCREMENT,
    reader_id BIGINT UNSIGNED NOT NULL,
    peer_id BIGINT UNSIGNED NOT NULL,
    PRIMARY KEY (id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
