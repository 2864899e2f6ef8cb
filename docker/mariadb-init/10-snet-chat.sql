-- The chat service's own database beside the monolith's (MARIADB_DATABASE, `snet`), for the
-- same user. Run once, by the MariaDB image's entry point, on an empty data directory.
CREATE DATABASE IF NOT EXISTS `snet_chat` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci;
GRANT ALL PRIVILEGES ON `snet_chat`.* TO 'snet'@'%';
