-- membersync schema v11: retention and erasure. An event whose raw body (and headers) was
-- dropped after `retention.raw_body_days` keeps its canonical form, outcome, rule and
-- transition; `body_pruned_at` says when the body went. A member whose personal data was
-- erased keeps its id, memberships and history; `erased_at` marks it, and an erased member
-- takes no email or name again. Each erasure is recorded: who, when, what.
ALTER TABLE events ADD COLUMN body_pruned_at INTEGER;
ALTER TABLE members ADD COLUMN erased_at INTEGER;
-- (The index a prune reads by, `events_unpruned`, is made by the first prune: see
-- `store::PRUNABLE_INDEX`.)
CREATE TABLE erasures (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant      TEXT NOT NULL,
    member_id   TEXT NOT NULL,
    erased_by   TEXT NOT NULL,
    erased_at   INTEGER NOT NULL,
    -- JSON: what was removed (fields, events rewritten, leads removed).
    detail      TEXT NOT NULL
);
CREATE INDEX erasures_member ON erasures (member_id, id);
