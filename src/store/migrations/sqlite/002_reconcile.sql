-- membersync schema v2: reconciliation detail per membership. `memberships` keeps
-- `last_reconciled_at` and `sync_status`; the rest lives here so v1 rows stay as they are.
CREATE TABLE membership_sync (
    membership_id   TEXT PRIMARY KEY REFERENCES memberships (id),
    -- The last time the provider was asked (answered or not): the schedule's order.
    attempted_at    INTEGER NOT NULL,
    -- What the last comparison found ("in sync", or what differed and what was done).
    detail          TEXT,
    -- When drift was last found and corrected, and what changed.
    drift_at        INTEGER,
    drift           TEXT,
    -- The last provider error (5xx, timeout, bad JSON) and when.
    last_error      TEXT,
    last_error_at   INTEGER
);
CREATE INDEX membership_sync_attempted ON membership_sync (attempted_at);
