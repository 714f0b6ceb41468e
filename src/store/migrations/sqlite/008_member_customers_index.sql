-- membersync schema v8: a member's provider customer ids, found by member. The primary key
-- reads them by customer id; replay's comparison, resync and a merge of two members read
-- them by member, which without this index scanned the tenant's and provider's rows once
-- per member. Every column, in the order the lookup wants them: it covers it.
CREATE INDEX member_customers_member ON member_customers (member_id, tenant, provider, customer_id);
