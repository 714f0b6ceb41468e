-- membersync schema v7: console sessions ended by logging out before their time, kept until
-- they would have expired, so a logged-out cookie stays refused across a restart (and on
-- every process sharing the database).
CREATE TABLE console_logouts (
    nonce TEXT PRIMARY KEY,
    until INTEGER NOT NULL
);
