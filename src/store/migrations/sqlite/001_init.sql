-- membersync schema v1. Times are unix seconds (UTC).
CREATE TABLE members (
    id          TEXT PRIMARY KEY,
    tenant      TEXT NOT NULL,
    email       TEXT,
    email_lc    TEXT,
    name        TEXT,
    flags       TEXT NOT NULL DEFAULT '[]',
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
);
CREATE INDEX members_email ON members (tenant, email_lc);

CREATE TABLE member_customers (
    tenant      TEXT NOT NULL,
    provider    TEXT NOT NULL,
    customer_id TEXT NOT NULL,
    member_id   TEXT NOT NULL REFERENCES members (id),
    PRIMARY KEY (tenant, provider, customer_id)
);

CREATE TABLE memberships (
    id                   TEXT PRIMARY KEY,
    tenant               TEXT NOT NULL,
    member_id            TEXT NOT NULL REFERENCES members (id),
    provider             TEXT NOT NULL,
    key                  TEXT NOT NULL,
    subscription_id      TEXT,
    product_id           TEXT,
    plan_id              TEXT,
    status               TEXT,
    state                TEXT NOT NULL,
    period_end           INTEGER,
    grace_until          INTEGER,
    access_until         INTEGER,
    cancel_at_period_end INTEGER NOT NULL DEFAULT 0,
    access_levels        TEXT NOT NULL DEFAULT '[]',
    flags                TEXT NOT NULL DEFAULT '[]',
    last_event_at        INTEGER,
    last_event_id        TEXT,
    last_reconciled_at   INTEGER,
    sync_status          TEXT NOT NULL DEFAULT 'never_reconciled',
    created_at           INTEGER NOT NULL,
    updated_at           INTEGER NOT NULL,
    UNIQUE (tenant, provider, key)
);
CREATE INDEX memberships_member ON memberships (member_id);

CREATE TABLE events (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant          TEXT NOT NULL,
    provider        TEXT NOT NULL,
    event_id        TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    event_type      TEXT NOT NULL,
    kind            TEXT,
    source          TEXT NOT NULL,
    received_at     INTEGER NOT NULL,
    occurred_at     INTEGER,
    member_id       TEXT,
    membership_id   TEXT,
    status          TEXT NOT NULL,
    reason          TEXT,
    raw             BLOB NOT NULL,
    headers         TEXT NOT NULL DEFAULT '[]',
    canonical       TEXT,
    outcome         TEXT NOT NULL,
    deliveries      INTEGER NOT NULL DEFAULT 1,
    UNIQUE (tenant, provider, idempotency_key)
);
CREATE INDEX events_status ON events (status, seq);
CREATE INDEX events_member ON events (member_id, seq);
CREATE INDEX events_event_id ON events (event_id);

CREATE TABLE leads (
    tenant       TEXT NOT NULL,
    email_lc     TEXT NOT NULL,
    email        TEXT NOT NULL,
    name         TEXT,
    provider     TEXT NOT NULL,
    event_id     TEXT NOT NULL,
    captured_at  INTEGER NOT NULL,
    converted_at INTEGER,
    member_id    TEXT,
    PRIMARY KEY (tenant, email_lc)
);

CREATE TABLE timers (
    membership_id TEXT NOT NULL REFERENCES memberships (id),
    name          TEXT NOT NULL,
    tenant        TEXT NOT NULL,
    due_at        INTEGER NOT NULL,
    set_by_event  TEXT NOT NULL,
    PRIMARY KEY (membership_id, name)
);
CREATE INDEX timers_due ON timers (due_at);
