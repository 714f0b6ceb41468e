-- membersync schema v9: events parked for "a membership of the member they name" (park
-- key '') found by that member. They were read for every membership a tenant's provider
-- created or tied to a payment, all of them, with their bodies: a store holding a few
-- thousand such events that never found their member read them all on each of those
-- events. Now each lookup reads only the events naming that member's customer ids or
-- email, through these two indexes (the expressions are the ones the lookup compares;
-- `lower` folds ASCII only, as the release check's comparison does; the customer id is
-- cast to TEXT so that it compares with `member_customers.customer_id` through the index).
CREATE INDEX events_parked_customer
    ON events (tenant, provider, CAST(json_extract(canonical, '$.member.provider_customer_id') AS TEXT))
    WHERE park_key = '';
CREATE INDEX events_parked_email
    ON events (tenant, provider, lower(json_extract(canonical, '$.member.email')))
    WHERE park_key = '';
