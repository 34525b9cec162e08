-- idgate audit store, version 1. Applied by `idgate audit migrate` or `[audit] postgres_migrate`.
-- One row per audit event; typed columns for what people filter on, the full event as jsonb.
CREATE TABLE audit_events (
    seq          bigint GENERATED ALWAYS AS IDENTITY,
    event_id     uuid        PRIMARY KEY,
    time         timestamptz NOT NULL,
    kind         text        NOT NULL,
    outcome      text,
    reason       text,
    db_user      text,
    client_user  text,
    tenant       text,
    object_id    text,
    client_addr  inet,
    client_port  integer,
    pool         text,
    target       text,
    session_id   uuid        NOT NULL,
    event        jsonb       NOT NULL,
    inserted_at  timestamptz NOT NULL DEFAULT now()
);

CREATE UNIQUE INDEX audit_events_seq_idx       ON audit_events (seq);
CREATE INDEX audit_events_time_idx             ON audit_events (time);
CREATE INDEX audit_events_user_time_idx        ON audit_events (db_user, time);
CREATE INDEX audit_events_tenant_time_idx      ON audit_events (tenant, time);
CREATE INDEX audit_events_object_time_idx      ON audit_events (object_id, time);
CREATE INDEX audit_events_client_time_idx      ON audit_events (client_addr, time);
CREATE INDEX audit_events_pool_time_idx        ON audit_events (pool, time);
CREATE INDEX audit_events_session_idx          ON audit_events (session_id);
CREATE INDEX audit_events_failures_idx         ON audit_events (time, reason) WHERE outcome = 'failure';
CREATE INDEX audit_events_kind_time_idx        ON audit_events (kind, time);

COMMENT ON TABLE audit_events IS 'idgate audit trail: one row per event, idempotent on event_id';
