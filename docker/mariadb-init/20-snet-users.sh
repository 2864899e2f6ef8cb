# Sourced once, on an empty data directory, by the MariaDB image's entry point (the official
# one or docker/mariadb-entrypoint.sh), which provides docker_process_sql (SQL as root).
#
# One database and one user per service, each user with rights on its own database only:
# snet_server on `snet` (the monolith: users, tokens, friendships, posts), snet_chat on
# `snet_chat` (dialog messages). Enough to run the services' CREATE TABLE IF NOT EXISTS at
# start and their queries; no DROP, no GRANT, nothing on the other database. The passwords
# come from the files `snet-init secrets` wrote (compose.yml mounts them read-only here);
# they are hex, so they need no quoting.
snet_mysql_secrets=/run/secrets/snet-mysql
snet_rights="SELECT, INSERT, UPDATE, DELETE, CREATE, ALTER, INDEX, REFERENCES"
docker_process_sql <<SQL
CREATE DATABASE IF NOT EXISTS \`snet\` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci;
CREATE DATABASE IF NOT EXISTS \`snet_chat\` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci;
CREATE USER 'snet_server'@'%' IDENTIFIED BY '$(cat "${snet_mysql_secrets}/server-password")';
CREATE USER 'snet_chat'@'%' IDENTIFIED BY '$(cat "${snet_mysql_secrets}/chat-password")';
GRANT ${snet_rights} ON \`snet\`.* TO 'snet_server'@'%';
GRANT ${snet_rights} ON \`snet_chat\`.* TO 'snet_chat'@'%';
SQL
unset snet_mysql_secrets snet_rights
