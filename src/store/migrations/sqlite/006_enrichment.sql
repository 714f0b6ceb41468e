-- membersync schema v6: what an enrichment fetched for an event (Stripe's checkout line
-- items), stored with it so that replay and re-derivation read the same products without
-- asking the provider again, and `explain` can say where they came from.
ALTER TABLE events ADD COLUMN enrichment TEXT;
