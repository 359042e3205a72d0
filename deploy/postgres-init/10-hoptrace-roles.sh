#!/bin/sh
# First start of the postgres container (docker-entrypoint-initdb.d), run as the cluster's
# superuser ($POSTGRES_USER, which nothing else logs in as): the owner role hoptrace (no
# superuser, no CREATEDB/CREATEROLE: it only owns its database), its database hoptrace, and
# the dashboard's read-only role hoptrace_ro, which can read the tables the owner creates later
# (default privileges). Passwords come from .env: HOPTRACE_DB_PASSWORD (owner) and
# HOPTRACE_RO_PASSWORD. A password that is empty or still the .env.example placeholder
# ("change-me...") is refused: the container's first start fails, and nothing is created.
# HOPTRACE_DB_OWNER / HOPTRACE_DB_NAME / HOPTRACE_RO_ROLE rename the roles and the database
# (the service URLs in docker-compose.yml must then name them too).
set -eu
owner="${HOPTRACE_DB_OWNER:-hoptrace}"
db="${HOPTRACE_DB_NAME:-hoptrace}"
ro="${HOPTRACE_RO_ROLE:-hoptrace_ro}"
for var in POSTGRES_PASSWORD HOPTRACE_DB_PASSWORD HOPTRACE_RO_PASSWORD; do
  eval "value=\${$var:-}"
  case "$value" in
    "")
      echo "hoptrace: $var is empty; set it in .env" >&2
      exit 1
      ;;
    *change-me*)
      echo "hoptrace: $var is still the .env.example placeholder; set a real secret in .env" >&2
      exit 1
      ;;
  esac
done
psql -v ON_ERROR_STOP=1 -v owner="$owner" -v owner_password="$HOPTRACE_DB_PASSWORD" \
  -v db="$db" -v ro="$ro" -v ro_password="$HOPTRACE_RO_PASSWORD" \
  --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<'SQL'
SELECT format('CREATE ROLE %I LOGIN PASSWORD %L NOSUPERUSER NOCREATEDB NOCREATEROLE',
              :'owner', :'owner_password')
WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'owner') \gexec
SELECT format('CREATE DATABASE %I OWNER %I', :'db', :'owner')
WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = :'db') \gexec
SELECT format('CREATE ROLE %I LOGIN PASSWORD %L', :'ro', :'ro_password')
WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'ro') \gexec
ALTER ROLE :"ro" SET default_transaction_read_only = on;
GRANT CONNECT ON DATABASE :"db" TO :"ro";
\connect :"db"
GRANT USAGE ON SCHEMA public TO :"ro";
GRANT SELECT ON ALL TABLES IN SCHEMA public TO :"ro";
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner" IN SCHEMA public GRANT SELECT ON TABLES TO :"ro";
SQL
