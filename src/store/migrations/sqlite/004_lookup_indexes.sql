-- membersync schema v4: lookups the admin API and replay make without a tenant
-- (GET /members?email=, the dry-run comparison) and per membership (sync detail).
CREATE INDEX members_email_any ON members (email_lc);
CREATE INDEX events_membership ON events (membership_id, seq);
