-- membersync schema v3: ordering. A membership remembers the lifecycle rank of the event
-- that last changed it (ties in time are ordered by rank, not arrival); an event that
-- arrived before its membership existed is parked under the key it waits for.
ALTER TABLE memberships ADD COLUMN last_event_rank INTEGER NOT NULL DEFAULT 0;
ALTER TABLE events ADD COLUMN park_key TEXT;
CREATE INDEX events_parked ON events (tenant, provider, park_key) WHERE park_key IS NOT NULL;
