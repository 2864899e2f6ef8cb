-- The monolith's tables (MySQL 8 / MariaDB 10.11+). Applied at start-up by every instance
-- under a MySQL user lock (snet.storage.apply_schema): statements must stay idempotent
-- (IF NOT EXISTS) and keep ';' out of strings and comments.

-- One row per user. Names use a case-insensitive collation: the search is a prefix search
-- on both names (LIKE 'prefix%'), served by ix_users_names, whose trailing id lets the
-- matching rows be read in the index alone before they are sorted by id.
-- password_hash is "scrypt$N$r$p$salt$hash" (base64 parts): the parameters travel with it.
CREATE TABLE IF NOT EXISTS users (
    id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
    first_name VARCHAR(100) NOT NULL,
    second_name VARCHAR(100) NOT NULL,
    birthdate DATE NOT NULL,
    biography VARCHAR(2000) NOT NULL DEFAULT '',
    city VARCHAR(100) NOT NULL DEFAULT '',
    password_hash VARCHAR(255) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    created_at DATETIME(6) NOT NULL COMMENT 'UTC',
    PRIMARY KEY (id),
    KEY ix_users_names (first_name, second_name, id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

-- Bearer tokens, stored only as their SHA-256: a copy of this table lets no one in.
CREATE TABLE IF NOT EXISTS user_tokens (
    token_hash BINARY(32) NOT NULL,
    user_id BIGINT UNSIGNED NOT NULL,
    created_at DATETIME(6) NOT NULL COMMENT 'UTC',
    expires_at DATETIME(6) NOT NULL COMMENT 'UTC',
    PRIMARY KEY (token_hash),
    KEY ix_user_tokens_user (user_id, expires_at),
    CONSTRAINT fk_user_tokens_user FOREIGN KEY (user_id) REFERENCES users (id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- "user_id follows friend_id": friend_id's posts show in user_id's feed. One direction only,
-- as in the original OTUS project. ix_friendships_followers lists an author's followers in
-- id order, which the feed fan-out pages through.
CREATE TABLE IF NOT EXISTS friendships (
    user_id BIGINT UNSIGNED NOT NULL,
    friend_id BIGINT UNSIGNED NOT NULL,
    created_at DATETIME(6) NOT NULL COMMENT 'UTC',
    PRIMARY KEY (user_id, friend_id),
    KEY ix_friendships_followers (friend_id, user_id),
    CONSTRAINT fk_friendships_user FOREIGN KEY (user_id) REFERENCES users (id),
    CONSTRAINT fk_friendships_friend FOREIGN KEY (friend_id) REFERENCES users (id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- Posts. Ids grow with time, so "newest first" is "highest id first" everywhere, the feed
-- cache's sorted sets included. ix_posts_author serves the feed rebuild.
CREATE TABLE IF NOT EXISTS posts (
    id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
    author_id BIGINT UNSIGNED NOT NULL,
    text TEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    created_at DATETIME(6) NOT NULL COMMENT 'UTC',
    updated_at DATETIME(6) NOT NULL COMMENT 'UTC',
    PRIMARY KEY (id),
    KEY ix_posts_author (author_id, id),
    CONSTRAINT fk_posts_author FOREIGN KEY (author_id) REFERENCES users (id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
