-- membersync schema v10: reconcile work leased per membership. Each replica's schedule (or
-- a `membersync reconcile` beside `serve`) takes the memberships it will ask by leasing
-- them until a time; another takes only those without a lease in force, so a membership
-- is asked once per pass however many ask, and one leased by a process that died is
-- taken again once its lease has run out.
CREATE TABLE reconcile_leases (
    membership_id TEXT PRIMARY KEY REFERENCES memberships (id),
    locked_until  INTEGER NOT NULL
);
