#!/bin/sh
# First start of the postgres container (docker-entrypoint-initdb.d): the dashboard's read-only
# role hoptrace_ro. Its password comes from HOPTRACE_RO_PASSWORD (.env); tables the owner role
# ($POSTGRES_USER) creates later are readable by it through default privileges.
set -eu
psql -v ON_ERROR_STOP=1 -v ro_password="$HOPTRACE_RO_PASSWORD" -v db="$POSTGRES_DB" \
  -v owner="$POSTGRES_USER" --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<'SQL'
SELECT format('CREATE ROLE hoptrace_ro LOGIN PASSWORD %L', :'ro_password')
WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'hoptrace_ro') \gexec
ALTER ROLE hoptrace_ro SET default_transaction_read_only = on;
GRANT CONNECT ON DATABASE :"db" TO hoptrace_ro;
GRANT USAGE ON SCHEMA public TO hoptrace_ro;
GRANT SELECT ON ALL TABLES IN SCHEMA public TO hoptrace_ro;
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner" IN SCHEMA public GRANT SELECT ON TABLES TO hoptrace_ro;
SQL
