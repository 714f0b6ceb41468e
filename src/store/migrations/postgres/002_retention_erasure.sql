-- membersync PostgreSQL schema v2: retention and erasure (the SQLite store's v11). An event
-- whose raw body (and headers) was dropped after `retention.raw_body_days` keeps its
-- canonical form, outcome, rule and transition; `body_pruned_at` says when the body went.
-- A member whose personal data was erased keeps its id, memberships and history;
-- `erased_at` marks it, and an erased member takes no email or name again. Each erasure is
-- recorded: who, when, what.
ALTER TABLE events ADD COLUMN body_pruned_at BIGINT;
ALTER TABLE members ADD COLUMN erased_at BIGINT;
-- (The index a prune reads by, `events_unpruned`, is made by the first prune: see
-- `store::PRUNABLE_INDEX`.)
CREATE TABLE erasures (
    id          BIGSERIAL PRIMARY KEY,
    tenant      TEXT NOT NULL,
    member_id   TEXT NOT NULL,
    erased_by   TEXT NOT NULL,
    erased_at   BIGINT NOT NULL,
    detail      TEXT NOT NULL
);
CREATE INDEX erasures_member ON erasures (member_id, id);
